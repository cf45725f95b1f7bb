"""Checking an artifact against its manifest: the quick check on every reuse, and ``verify``.

:func:`check_artifact` looks at one artifact folder and returns a :class:`CheckReport`:

- ``status``: "complete" (a ``manifest.json`` whose digest matches), "broken" (a manifest
  that is not JSON, has no digest or fails it), "invalidated" (shards dropped for repair,
  ``manifest.invalid.json``), "partial" (never finished: files but no manifest) or "absent";
- for a complete one, ``problems``: every listed shard and side file is present with the
  manifest's size; every shard's Parquet footer is readable and its row count equals the
  manifest's; each upstream artifact still has the content digest recorded when this one
  was built (else this one is *stale*: its upstream was recomputed into other bytes, or is
  being repaired);
- with ``full=True`` (``verify``) each file is also re-hashed against its sha256, and the
  footer is read from the hashed bytes (one read per file).

The quick check (``full=False``) reads footers and a few small JSON files: milliseconds for
a demo artifact (see ``benchmarks/``), so a stage runs it on every reuse. It does not see
flipped bytes inside a shard; those are caught by the readers that hash whole shards as they
read them (:meth:`storage.store.Artifact.read_table`), by the page CRCs that memory-mapped
random-access readers check (:mod:`storage.shards`), and by ``verify``.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import ManifestError
from storage.fs import LocalFS, filesystem_for, is_tmp_name
from storage.locks import LOCK_NAME, ArtifactLock
from storage.manifest import (INVALID_MANIFEST, MANIFEST, content_digest, is_complete,
                              load_manifest, stage_of)

ROOT_MARKERS = (MANIFEST, INVALID_MANIFEST, LOCK_NAME, "_progress")


@dataclass
class Problem:
    """One thing that does not match: ``what`` is "shard", "file", "manifest" or "upstream"."""

    what: str
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.what} {self.name}: {self.reason}"


@dataclass
class CheckReport:
    """What :func:`check_artifact` found; ``ok`` means safe to reuse as it is."""

    path: str
    status: str = "complete"
    problems: list[Problem] = field(default_factory=list)
    shards_checked: int = 0
    files_checked: int = 0
    upstreams_checked: int = 0
    full: bool = False
    seconds: float = 0.0
    writer: dict[str, Any] | None = None        # the live lock's holder, if any
    artifact: Any = None                        # the Artifact, set by ArtifactStore.check

    @property
    def ok(self) -> bool:
        return self.status == "complete" and not self.problems

    @property
    def bad_shards(self) -> list[str]:
        """Names of the shards that are missing, truncated or altered."""
        return [p.name for p in self.problems if p.what == "shard"]

    @property
    def bad_files(self) -> list[str]:
        return [p.name for p in self.problems if p.what == "file"]

    @property
    def stale(self) -> bool:
        """An upstream artifact changed (repaired, replaced, broken) since this one was built."""
        return any(p.what == "upstream" for p in self.problems)

    @property
    def action(self) -> str:
        """What a stage should do: "reuse"; "repair" (recompute exactly ``bad_shards`` and
        ``bad_files``: ``store.writer(..., invalidate=report.bad_shards + report.bad_files)``);
        "recompute" (the whole artifact: ``store.writer(..., replace=True)``); "resume" (a
        partial or invalidated artifact: a plain writer finishes it); "compute" (absent)."""
        if self.ok:
            return "reuse"
        if self.status == "complete":
            return "recompute" if self.stale else "repair"
        return {"broken": "recompute", "absent": "compute"}.get(self.status, "resume")

    def summary(self) -> str:
        """One line: what was checked and, if anything failed, what."""
        checks = "sha256, rows, digest" if self.full else "sizes, rows, digest"
        head = (f"checked: {self.shards_checked} shards, {self.files_checked} side files, "
                f"{self.upstreams_checked} upstream digests; {checks}; "
                f"{self.seconds * 1000:.1f} ms")
        if self.ok:
            return head
        return f"{self.status.upper()}, {head}; " + "; ".join(str(p) for p in self.problems)

    def details(self) -> str:
        """Several lines for ``verify``: the artifact, OK or FAILED, each problem."""
        verdict = "OK" if self.ok else f"FAILED ({self.status})"
        head = (f"{self.path}: {verdict} ({self.shards_checked} shards, {self.files_checked} "
                f"files, {self.upstreams_checked} upstream digests checked)")
        return "\n".join([head, *(f"  {p}" for p in self.problems)])


VerifyReport = CheckReport


def _check_shard(fs: LocalFS, path: str, rec: dict[str, Any], full: bool) -> str | None:
    size = int(rec["bytes"])
    if not fs.exists(path):
        return "missing"
    actual = fs.size(path)
    if actual != size:
        kind = "truncated" if actual < size else "size differs"
        return f"{kind}: {actual} bytes, manifest says {size}"
    try:
        if full:
            buf = fs.read_buffer(path)
            if hashlib.sha256(buf).hexdigest() != rec["sha256"]:
                return "sha256 differs from the manifest (altered)"
            rows = pq.ParquetFile(pa.BufferReader(buf)).metadata.num_rows
        else:
            rows = fs.parquet_file(path).metadata.num_rows
    except Exception as e:  # noqa: BLE001 - any failure to parse the footer means damaged
        return f"Parquet footer unreadable ({type(e).__name__}: {e})"
    if rows != int(rec["rows"]):
        return f"holds {rows} rows, manifest says {rec['rows']}"
    return None


def _check_file(fs: LocalFS, path: str, rec: dict[str, Any], full: bool) -> str | None:
    if not fs.isfile(path):
        return "missing"
    actual, size = fs.size(path), int(rec["bytes"])
    if actual != size:
        kind = "truncated" if actual < size else "size differs"
        return f"{kind}: {actual} bytes, manifest says {size}"
    if full and fs.sha256(path) != rec["sha256"]:
        return "sha256 differs from the manifest (altered)"
    return None


def store_root_of(artifact_dir: str) -> str:
    """``<root>`` of ``<root>/<stage>/<fingerprint>``."""
    return artifact_dir.rstrip("/").rsplit("/", 2)[0] or "/"


def upstream_digest(fs: LocalFS, root: str, key: str, fp: str) -> tuple[str | None, str]:
    """The content digest of the complete upstream artifact ``key`` (``stage`` or
    ``stage[variant]``) with fingerprint ``fp``, or None and why not ("absent", "broken: ...",
    "not complete")."""
    path = fs.join(root, stage_of(key), fp)
    try:
        manifest = load_manifest(fs, path)
    except ManifestError as e:
        return None, f"broken: {e}"
    if is_complete(manifest):
        return content_digest(manifest), "complete"
    if manifest is None and not fs.exists(path):
        return None, "absent"
    return None, "not complete (invalidated for repair, or being rewritten)"


def _check_upstreams(fs: LocalFS, path: str, manifest: dict[str, Any],
                     report: CheckReport) -> None:
    root = store_root_of(path)
    upstream = manifest.get("upstream", {})
    for key, recorded in sorted(manifest.get("upstream_digests", {}).items()):
        fp = upstream.get(key)
        if fp is None:
            continue
        report.upstreams_checked += 1
        current, state = upstream_digest(fs, root, key, fp)
        if state == "absent":
            continue                # removed by gc: nothing says it changed
        if current != recorded:
            why = (f"its content changed since this artifact was built (recorded digest "
                   f"{recorded[:12]}, now {current[:12]}): it was recomputed into other bytes"
                   if current else f"it is {state}")
            report.problems.append(Problem("upstream", f"{key}/{fp}", f"{why}; this artifact "
                                           "is stale and must be recomputed"))


def _status_without_manifest(fs: LocalFS, path: str) -> tuple[str, str]:
    if fs.exists(fs.join(path, INVALID_MANIFEST)):
        return "invalidated", ("invalidated (manifest.invalid.json): rerun its stage to "
                               "recompute the dropped shards")
    names = [n for n in fs.listdir(path) if n != LOCK_NAME + ".takeover"]
    if not names:
        return "absent", "no artifact here"
    return "partial", f"no {MANIFEST}: never finished (a run was interrupted or is running)"


def check_artifact(fs: LocalFS, path: str, *, full: bool = False) -> CheckReport:
    """Check the artifact folder ``path`` (see the module doc); never raises for bad data."""
    t0 = time.perf_counter()
    report = CheckReport(path=fs.url(path), full=full)
    try:
        manifest = load_manifest(fs, path)
    except ManifestError as e:
        report.status = "broken"
        report.problems.append(Problem("manifest", MANIFEST, str(e)))
        manifest = None
    if manifest is None and report.status != "broken":
        report.status, reason = _status_without_manifest(fs, path)
        report.problems.append(Problem("manifest", MANIFEST, reason))
    elif manifest is not None and not is_complete(manifest):
        report.status = "broken"
        report.problems.append(Problem("manifest", MANIFEST,
                                       f"status is {manifest.get('status')!r}, not complete"))
    if report.status in ("partial", "invalidated"):
        report.writer = ArtifactLock(fs, path, "").live_holder()
    if report.status == "complete":
        for rec in manifest.get("shards", []):
            report.shards_checked += 1
            reason = _check_shard(fs, fs.join(path, rec["name"] + ".parquet"), rec, full)
            if reason:
                report.problems.append(Problem("shard", rec["name"], reason))
        for rec in manifest.get("files", []):
            report.files_checked += 1
            reason = _check_file(fs, fs.join(path, *rec["path"].split("/")), rec, full)
            if reason:
                report.problems.append(Problem("file", rec["path"], reason))
        _check_upstreams(fs, path, manifest, report)
    report.seconds = time.perf_counter() - t0
    return report


def verify_dir(fs: LocalFS, artifact_dir: str) -> CheckReport:
    """The full check: :func:`check_artifact` with every file re-hashed."""
    return check_artifact(fs, artifact_dir, full=True)


def verify(artifact_path: str | os.PathLike) -> CheckReport:
    """Re-hash every shard and side file of the artifact at ``artifact_path`` (a local folder
    or an fsspec URL) against its manifest; missing, truncated or altered ones are named."""
    fs, path = filesystem_for(artifact_path)
    return verify_dir(fs, path)


def looks_like_artifact(fs: LocalFS, path: str) -> bool:
    """Whether ``path`` holds an artifact's own files (a manifest, a lock, shards...)."""
    names = fs.listdir(path)
    return any(n in ROOT_MARKERS or (n.endswith(".parquet") and not is_tmp_name(n))
               for n in names)
