"""The manifest: ``manifest.json``, written last into an artifact folder; its commit point.

Fields (``MANIFEST_FORMAT`` 1)::

    format        1
    status        "complete"
    stage, fingerprint, version, params, upstream
    shards        [{name, kind, rows, bytes, sha256, info?}]   sorted by name
    files         [{path, bytes, sha256}]                       sorted by path
    schemas       {kind: {string, fields: [{name, type, nullable}]}}
    rows, bytes   totals over shards (bytes: shards + files)
    info          the stage's own summary (counts kept/filtered, timings...)
    libraries     {python, torch, pyarrow, transformers, cot2align, ...} (those installed)
    timings       {started, finished (ISO 8601 UTC), seconds}; of the session that finished it
    resumed       {shards_reused, files_reused} when the session resumed earlier work
    writer        {host, pid}

An artifact whose shards are invalidated keeps its old manifest as ``manifest.invalid.json``
(so it no longer counts as complete); the resumed writer reuses its records for the shards
that are still good.
"""
from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

from storage.fs import LocalFS

MANIFEST_FORMAT = 1
MANIFEST = "manifest.json"
INVALID_MANIFEST = "manifest.invalid.json"
LIBRARIES = ("torch", "pyarrow", "transformers", "cot2align", "numpy", "fsspec", "safetensors")


def read_manifest(fs: LocalFS, artifact_dir: str, name: str = MANIFEST) -> dict[str, Any] | None:
    """The parsed manifest, or None when absent or unreadable (a torn write is impossible
    locally, since it is renamed into place, but a hand-edited one may be)."""
    try:
        return json.loads(fs.read_bytes(fs.join(artifact_dir, name)).decode("utf-8"))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
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
