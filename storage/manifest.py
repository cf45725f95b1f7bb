"""The manifest: ``manifest.json``, written last into an artifact folder; its commit point.

Fields (``MANIFEST_FORMAT`` 2)::

    format        2
    status        "complete"
    stage, fingerprint, version, params, upstream
    upstream_digests  {key: content digest of that upstream artifact when this one was opened}
    shards        [{name, kind, rows, bytes, sha256, info?}]   sorted by name
    files         [{path, bytes, sha256}]                       sorted by path
    schemas       {kind: {string, fields: [{name, type, nullable}]}}
    rows, bytes   totals over shards (bytes: shards + files)
    info          the stage's own summary (counts kept/filtered, timings...)
    libraries     {python, torch, pyarrow, transformers, cot2align, ...} (those installed)
    timings       {started, finished (ISO 8601 UTC), seconds}; of the session that finished it
    resumed       {shards_reused, files_reused} when the session resumed earlier work
    writer        {host, pid}
    digest        sha256 of the canonical JSON of every other field

The digest makes a hand edit (a dropped shard entry, changed ``rows``) or a damaged manifest
visible: :func:`load_manifest` raises :class:`~storage.errors.ManifestError` for it instead
of returning a manifest that lies. A manifest without a digest (format 1, written before
digests existed) is refused the same way: its stage is recomputed.

``upstream_digests`` make the artifacts built from an upstream whose bytes changed since (a
``--force`` rerun that came out different) visibly stale (see
:func:`storage.verify.check_artifact`). They hold :func:`content_digest`, which covers what
the artifact *holds* (fingerprint, version, params, each shard's and file's name, size,
rows and sha256), not when or by whom it was written: a rerun that writes the same bytes
leaves its downstream valid. Repairs go further (see :meth:`storage.store.ArtifactStore.
invalidate_shards`): they set aside every artifact built from the repaired one.

An artifact whose shards are invalidated keeps its old manifest as ``manifest.invalid.json``
(so it no longer counts as complete, and ``inspect`` still shows what it was); the records of
the shards that stay go to the ``_progress/`` journal, from which the next writer resumes.
"""
from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from storage.errors import ManifestError
from storage.fingerprint import FingerprintError, canonical_json
from storage.fs import LocalFS

MANIFEST_FORMAT = 2
MANIFEST = "manifest.json"
INVALID_MANIFEST = "manifest.invalid.json"
DIGEST = "digest"
LIBRARIES = ("torch", "pyarrow", "transformers", "cot2align", "numpy", "fsspec", "safetensors")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of the manifest without its ``digest`` field."""
    body = {k: v for k, v in manifest.items() if k != DIGEST}
    return hashlib.sha256(canonical_json(body, "manifest").encode("utf-8")).hexdigest()


def content_digest(manifest: dict[str, Any]) -> str:
    """sha256 (hex) of what a complete artifact holds: fingerprint, version, params and the
    (name, kind, rows, bytes, sha256) of each shard and (path, bytes, sha256) of each file."""
    body = {
        "fingerprint": manifest.get("fingerprint"), "version": manifest.get("version"),
        "params": manifest.get("params"),
        "shards": [{k: d[k] for k in ("name", "kind", "rows", "bytes", "sha256")}
                   for d in manifest.get("shards", [])],
        "files": [{k: d[k] for k in ("path", "bytes", "sha256")} for d in manifest.get("files", [])],
    }
    return hashlib.sha256(canonical_json(body, "manifest").encode("utf-8")).hexdigest()


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest as written: indented JSON, its ``digest`` (re)computed and last."""
    body = {k: v for k, v in manifest.items() if k != DIGEST}
    return json.dumps({**body, DIGEST: manifest_digest(body)}, indent=2).encode("utf-8")


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    """The manifest in ``data`` after checking its digest; :class:`ManifestError` naming
    ``where`` when it is not JSON, has no digest, or its digest does not match."""
    fix = (f"do not trust it. Repair: `cot2align verify --repair {where.rsplit('/', 1)[0]}` "
           "sets it aside, then rerun its stage to recompute the artifact")
    try:
        manifest = json.loads(data.decode("utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"{where} is not readable JSON ({e}): {fix}") from None
    if DIGEST not in manifest:
        raise ManifestError(f"{where} has no content digest (format {manifest.get('format')}, "
                            f"written before digests existed, or the field was removed): {fix}")
    try:
        actual = manifest_digest(manifest)
    except FingerprintError as e:
        raise ManifestError(f"{where} holds a value that is not plain JSON ({e}): {fix}") from None
    if actual != manifest[DIGEST]:
        raise ManifestError(f"{where} does not match its digest (recorded {manifest[DIGEST]}, "
                            f"content hashes to {actual}): it was edited or damaged; {fix}")
    return manifest


def load_manifest(fs: LocalFS, artifact_dir: str, name: str = MANIFEST) -> dict[str, Any] | None:
    """The checked manifest, or None when there is none; :class:`ManifestError` when one is
    there but cannot be trusted (see :func:`parse_manifest`)."""
    path = fs.join(artifact_dir, name)
    try:
        data = fs.read_bytes(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    return parse_manifest(data, fs.url(path))


def read_manifest(fs: LocalFS, artifact_dir: str, name: str = MANIFEST) -> dict[str, Any] | None:
    """The parsed manifest without any check, or None when absent or unreadable: for display
    only (``inspect`` of a broken artifact); everything that trusts it uses
    :func:`load_manifest`."""
    try:
        return json.loads(fs.read_bytes(fs.join(artifact_dir, name)).decode("utf-8"))
    except (FileNotFoundError, IsADirectoryError, ValueError, UnicodeDecodeError):
        return None


def is_complete(manifest: dict[str, Any] | None) -> bool:
    return bool(manifest) and manifest.get("status") == "complete"


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries that shape the bytes, as installed."""
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def utc_iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


def parse_iso(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def stage_of(key: str) -> str:
    """The stage (the store folder) of a stage-instance key: ``tokenize`` -> ``tokenize``,
    ``distill[sft,seed=0]`` -> ``distill``. Keys are made by the stage registry
    (``tasks.registry.StageKey``); this is all the store needs to know of them."""
    return key.split("[", 1)[0]
