"""The artifact store: each stage's output at ``<root>/<stage>/<fingerprint>/``.

Writing::

    store = ArtifactStore("./artifacts")            # or "s3://bucket/prefix", "memory://x"
    fp = fingerprint("tokenize", params, {"generate": gen_fp}, version=1)
    with store.writer("tokenize", fp, params=params, upstream={...}, version=1) as w:
        if w.complete:                               # another run finished it while we waited
            return w.artifact
        for i, rows in enumerate(chunks):
            name = f"student-{i:05d}"
            if name in w.done_shards():              # whole shards of a crashed run are kept
                continue
            w.write_shard(name, table_of(rows))
        w.write_file("vocab.json", data)
        w.info["kept"] = n_kept
    art = store.get("tokenize", fp)                  # None unless complete

The ``with`` block holds the artifact's lock (:mod:`storage.locks`); a clean exit writes the
manifest (:mod:`storage.manifest`) last, via a temporary name and a rename: that is the
commit point. An exception leaves no manifest, releases the lock and keeps the shards already
renamed into place for the next run to resume from.

Corruption: :func:`verify` names bad shards; :meth:`ArtifactStore.invalidate_shards` removes
them and sets the manifest aside, so that the stage's next run recomputes those alone.

Runs and garbage: :meth:`ArtifactStore.record_run` remembers the fingerprints of each config's
latest run under ``<root>/_runs/``; artifacts none of them reference are garbage, listed by
:meth:`ArtifactStore.garbage` and removed only by :meth:`ArtifactStore.remove`.
"""
from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import ArtifactCompleteError, StoreError
from storage.fingerprint import FingerprintError, canonical_json, fingerprint
from storage.fs import LocalFS, filesystem_for, is_tmp_name
from storage.locks import LOCK_NAME, ArtifactLock
from storage.manifest import (INVALID_MANIFEST, MANIFEST, MANIFEST_FORMAT, is_complete,
                              library_versions, parse_iso, read_manifest, utc_iso)
from storage.shards import (DEFAULT_ROW_GROUP_ROWS, PROGRESS_DIR, FileRecord, ShardRecord,
                            ShardWriter, as_table, check_name, kind_of, schema_description)
from storage.verify import VerifyReport, verify, verify_dir

__all__ = [
    "ArtifactStore", "ArtifactWriter", "Artifact", "StoreEntry", "ShardRecord", "FileRecord",
    "VerifyReport", "StoreError", "fingerprint", "verify", "open_artifact",
]

RUNS_DIR = "_runs"
FILES_PROGRESS = "_files.json"
DEFAULT_ROOT = "./artifacts"
_STAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_stage_fp(stage: str, fp: str) -> None:
    if not isinstance(stage, str) or not _STAGE.match(stage):
        raise StoreError(f"stage name {stage!r} is not allowed: letters, digits, '_', '-', '.' "
                         "(not starting with '_', which is reserved for the store's own folders)")
    if not isinstance(fp, str) or not _STAGE.match(fp):
        raise StoreError(f"fingerprint {fp!r} is not allowed: use the hex string of fingerprint()")


def _native_path(fs: LocalFS, path: str) -> Path | str:
    return Path(path) if fs.is_local else fs.url(path)


# ---------------------------------------------------------------------------------------
# Reading


class Artifact:
    """A complete artifact: its manifest, its shards and its side files."""

    def __init__(self, fs: LocalFS, artifact_dir: str, manifest: dict[str, Any]) -> None:
        self.fs = fs
        self.dir = artifact_dir
        self.manifest = manifest
        self.shards = [ShardRecord.from_dict(d) for d in manifest.get("shards", [])]
        self.files = [FileRecord.from_dict(d) for d in manifest.get("files", [])]
        self._by_name = {s.name: s for s in self.shards}

    # What it is ------------------------------------------------------------------------
    @property
    def path(self) -> Path | str:
        """The folder: a ``Path`` on a local store, a URL string on an fsspec store."""
        return _native_path(self.fs, self.dir)

    @property
    def url(self) -> str:
        return self.fs.url(self.dir)

    stage = property(lambda self: self.manifest["stage"])
    fingerprint = property(lambda self: self.manifest["fingerprint"])
    version = property(lambda self: self.manifest.get("version"))
    params = property(lambda self: self.manifest.get("params", {}))
    upstream = property(lambda self: self.manifest.get("upstream", {}))
    info = property(lambda self: self.manifest.get("info", {}))

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def kinds(self) -> list[str]:
        return sorted({s.kind for s in self.shards})

    def shards_of(self, kind: str) -> list[ShardRecord]:
        return [s for s in self.shards if s.kind == kind]

    def shard(self, name: str) -> ShardRecord:
        try:
            return self._by_name[name]
        except KeyError:
            raise StoreError(f"artifact {self.url} has no shard {name!r}; it has "
                             f"{[s.name for s in self.shards]}") from None

    def schema(self, kind: str) -> pa.Schema:
        shards = self.shards_of(kind)
        if not shards:
            raise StoreError(f"artifact {self.url} has no shards of kind {kind!r} "
                             f"(kinds: {self.kinds()})")
        return self.parquet_file(shards[0].name).schema_arrow

    # Shards ----------------------------------------------------------------------------
    def shard_path(self, name: str) -> Path | str:
        return _native_path(self.fs, self.fs.join(self.dir, self.shard(name).filename))

    def parquet_file(self, name: str) -> pq.ParquetFile:
        """The shard opened for reading (memory-mapped on a local store)."""
        return self.fs.parquet_file(self.fs.join(self.dir, self.shard(name).filename))

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        return self.parquet_file(name).read(columns=columns)

    def read_kind(self, kind: str, columns: list[str] | None = None) -> pa.Table:
        """All shards of one kind, concatenated in name order."""
        tables = [self.read_table(s.name, columns) for s in self.shards_of(kind)]
        if not tables:
            raise StoreError(f"artifact {self.url} has no shards of kind {kind!r} "
                             f"(kinds: {self.kinds()})")
        return pa.concat_tables(tables)

    def iter_batches(self, names: Iterable[str] | None = None, *, kind: str | None = None,
                     batch_size: int = 1024,
                     columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Stream record batches over the named shards (default: all, or those of ``kind``)."""
        if names is None:
            names = [s.name for s in (self.shards_of(kind) if kind else self.shards)]
        for name in names:
            yield from self.parquet_file(name).iter_batches(batch_size=batch_size,
                                                            columns=columns)

    # Side files ------------------------------------------------------------------------
    def has_file(self, relpath: str) -> bool:
        return any(f.path == relpath or f.path.startswith(relpath.rstrip("/") + "/")
                   for f in self.files)

    def file_path(self, relpath: str) -> Path | str:
        """Where a side file (or a registered folder) lies: a local path or a URL."""
        if not self.has_file(relpath):
            raise StoreError(f"artifact {self.url} has no side file {relpath!r}; it has "
                             f"{[f.path for f in self.files]}")
        return _native_path(self.fs, self.fs.join(self.dir, *relpath.split("/")))

    def read_file(self, relpath: str) -> bytes:
        self.file_path(relpath)
        return self.fs.read_bytes(self.fs.join(self.dir, *relpath.split("/")))

    def verify(self) -> VerifyReport:
        return verify_dir(self.fs, self.dir)

    def __repr__(self) -> str:
        return (f"Artifact({self.stage}/{self.fingerprint}, {len(self.shards)} shards, "
                f"{self.rows} rows, {len(self.files)} files)")


def open_artifact(path: str | os.PathLike) -> Artifact:
    """The complete artifact at a folder path or URL; StoreError if it is not complete."""
    fs, p = filesystem_for(path)
    manifest = read_manifest(fs, p)
    if not is_complete(manifest):
        raise StoreError(f"{fs.url(p)} is not a complete artifact (no complete {MANIFEST})")
    return Artifact(fs, p, manifest)


# ---------------------------------------------------------------------------------------
# Writing


class ArtifactWriter:
    """The open side of one artifact; made by :meth:`ArtifactStore.writer`, used in ``with``."""

    def __init__(self, store: "ArtifactStore", stage: str, fp: str, *, params: dict[str, Any],
                 upstream: dict[str, str], version: int, lock_timeout: float,
                 invalidate: Iterable[str] = ()) -> None:
        _check_stage_fp(stage, fp)
        try:
            canonical_json(params, "params")
            canonical_json(upstream, "upstream")
        except FingerprintError as e:
            raise StoreError(f"cannot record the params of {stage}/{fp}: {e}") from e
        self.store = store
        self.fs = store.fs
        self.stage, self.fingerprint = stage, fp
        self.params, self.upstream, self.version = params, upstream, version
        self.dir = store.artifact_dir(stage, fp)
        self.label = f"{stage}/{fp} in {store.root}"
        self.info: dict[str, Any] = {}
        self.complete = False
        self.artifact: Artifact | None = None
        self._lock = ArtifactLock(self.fs, self.dir, self.label, timeout=lock_timeout)
        self._invalidate = list(invalidate)
        self._shards: dict[str, ShardRecord] = {}      # whole shards on disk, by name
        self._reused: set[str] = set()
        self._files: dict[str, FileRecord] = {}
        self._reused_files: set[str] = set()
        self._staging: str | None = None
        self._started = 0.0

    @property
    def path(self) -> Path | str:
        return _native_path(self.fs, self.dir)

    # Opening and resuming --------------------------------------------------------------
    def __enter__(self) -> "ArtifactWriter":
        self.store.check_writable()
        self._started = time.time()
        self.fs.makedirs(self.dir)
        self._lock.acquire()
        try:
            if self._invalidate:
                self.store._invalidate(self.dir, self._invalidate)
            manifest = read_manifest(self.fs, self.dir)
            if is_complete(manifest):
                self.complete = True
                self.artifact = Artifact(self.fs, self.dir, manifest)
                self._shards = {s.name: s for s in self.artifact.shards}
                return self
            self._resume()
        except BaseException:
            self._lock.release()
            raise
        return self

    def _resume(self) -> None:
        """Keep whole shards and registered files of an earlier run; drop everything else."""
        fs = self.fs
        old = read_manifest(fs, self.dir, INVALID_MANIFEST) or {}
        known = {d["name"]: ShardRecord.from_dict(d) for d in old.get("shards", [])}
        progress_dir = fs.join(self.dir, PROGRESS_DIR)
        for entry in fs.listdir(progress_dir):
            if entry.endswith(".json") and entry != FILES_PROGRESS and not is_tmp_name(entry):
                try:
                    rec = ShardRecord.from_dict(json.loads(fs.read_bytes(
                        fs.join(progress_dir, entry))))
                    known[rec.name] = rec
                except (ValueError, KeyError):
                    pass
        old_files = {d["path"]: FileRecord.from_dict(d) for d in old.get("files", [])}
        try:
            for d in json.loads(fs.read_bytes(fs.join(progress_dir, FILES_PROGRESS))):
                old_files[d["path"]] = FileRecord.from_dict(d)
        except (FileNotFoundError, ValueError, KeyError):
            pass
        for entry in fs.listdir(self.dir):
            full = fs.join(self.dir, entry)
            if is_tmp_name(entry):                      # a killed writer's partial file
                fs.remove(full)
                continue
            if not entry.endswith(".parquet"):
                continue
            name = entry[: -len(".parquet")]
            try:
                rows = fs.parquet_file(full).metadata.num_rows
            except Exception:  # noqa: BLE001 - any unreadable footer means "not whole"
                fs.remove(full)
                continue
            rec = known.get(name)
            size = fs.size(full)
            if rec is None or rec.bytes != size or rec.rows != rows:
                rec = ShardRecord(name=name, kind=rec.kind if rec else kind_of(name), rows=rows,
                                  bytes=size, sha256=fs.sha256(full),
                                  info=rec.info if rec else {})
            self._shards[name] = rec
            self._reused.add(name)
        for relpath, rec in old_files.items():
            full = fs.join(self.dir, *relpath.split("/"))
            if fs.isfile(full) and fs.size(full) == rec.bytes:
                self._files[relpath] = rec
                self._reused_files.add(relpath)
        for entry in fs.listdir(progress_dir):
            if is_tmp_name(entry):
                fs.remove(fs.join(progress_dir, entry))

    def _check_open(self) -> None:
        if self.complete:
            raise ArtifactCompleteError(
                f"artifact {self.label} is already complete (another run finished it); "
                "check `w.complete` after entering the writer and return `w.artifact`")

    # Shards ----------------------------------------------------------------------------
    def done_shards(self) -> list[str]:
        """Names of the shards already whole on disk (from this run or a crashed earlier one)."""
        return sorted(self._shards)

    def has_shard(self, name: str) -> bool:
        return name in self._shards

    def read_shard(self, name: str) -> pa.Table:
        """A whole shard already written (by this run or a crashed earlier one), read back."""
        if name not in self._shards:
            raise StoreError(f"artifact {self.label} has no whole shard {name!r} yet")
        return self.fs.parquet_file(self.fs.join(self.dir, self._shards[name].filename)).read()

    def shard_records(self) -> list[ShardRecord]:
        """Records (rows, bytes, sha256, info) of the whole shards so far, by name."""
        return [self._shards[n] for n in sorted(self._shards)]

    def open_shard(self, name: str, schema: pa.Schema, *, kind: str | None = None,
                   **parquet_options: Any) -> ShardWriter:
        """A :class:`ShardWriter` for streaming row groups into one shard (committed on close)."""
        self._check_open()
        check_name(name)
        return ShardWriter(self.fs, self.dir, name, schema, kind=kind, options=parquet_options,
                           on_commit=self._on_commit)

    def _on_commit(self, record: ShardRecord) -> None:
        self._shards[record.name] = record
        self._reused.discard(record.name)

    def write_shard(self, name: str, data: pa.Table | pa.RecordBatch | Iterable[pa.RecordBatch],
                    *, row_group_size: int = DEFAULT_ROW_GROUP_ROWS,
                    schema: pa.Schema | None = None, kind: str | None = None,
                    info: dict[str, Any] | None = None, **parquet_options: Any) -> ShardRecord:
        """Write one whole shard atomically (row groups of ``row_group_size`` rows)."""
        table = as_table(data, schema)
        with self.open_shard(name, table.schema, kind=kind, **parquet_options) as shard:
            shard.info.update(info or {})
            shard.write(table, row_group_size=row_group_size)
        return self._shards[name]

    # Side files ------------------------------------------------------------------------
    def _full(self, relpath: str) -> str:
        parts = relpath.split("/")
        if not relpath or relpath.startswith("/") or any(p in ("", ".", "..") for p in parts) \
                or parts[0] in (MANIFEST, INVALID_MANIFEST, LOCK_NAME, PROGRESS_DIR) \
                or relpath.endswith(".parquet"):
            raise StoreError(f"side file path {relpath!r} is not allowed: a relative path inside "
                             "the artifact, not a manifest, lock or .parquet name")
        return self.fs.join(self.dir, *parts)

    def has_file(self, relpath: str) -> bool:
        """Whether a side file (or folder) is registered, by this run or a resumed one."""
        prefix = relpath.rstrip("/") + "/"
        return any(p == relpath or p.startswith(prefix) for p in self._files)

    def write_file(self, relpath: str, data: bytes) -> FileRecord:
        """Write a side file atomically (temporary name + rename) and register it."""
        self._check_open()
        full = self._full(relpath)
        if "/" in relpath:
            self.fs.makedirs(os.path.dirname(full))
        self.fs.write_atomic(full, data)
        return self._register(relpath)[0]

    def file_path(self, relpath: str) -> Path:
        """A local path to write a side file or folder to (e.g. ``save_pretrained``); call
        :meth:`add_file` when it is written. On a remote store this is a local staging path
        whose contents ``add_file`` uploads."""
        self._check_open()
        full = self._full(relpath)
        if self.fs.is_local:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            return Path(full)
        if self._staging is None:
            self._staging = tempfile.mkdtemp(prefix="cot2align-staging-")
        local = Path(self._staging, *relpath.split("/"))
        local.parent.mkdir(parents=True, exist_ok=True)
        return local

    def add_file(self, relpath: str) -> list[FileRecord]:
        """Register a side file, or every file of a folder, written at :meth:`file_path`."""
        self._check_open()
        full = self._full(relpath)
        if not self.fs.is_local and self._staging is not None:
            local = Path(self._staging, *relpath.split("/"))
            if local.exists():
                sources = [local] if local.is_file() else sorted(
                    p for p in local.rglob("*") if p.is_file())
                for src in sources:
                    rel = src.relative_to(self._staging).as_posix()
                    dst = self.fs.join(self.dir, rel)
                    self.fs.makedirs(os.path.dirname(dst))
                    self.fs.write_atomic(dst, src.read_bytes())
        if not self.fs.exists(full):
            raise StoreError(f"cannot register side file {relpath!r}: nothing at {self.fs.url(full)}")
        return self._register(relpath)

    def _register(self, relpath: str) -> list[FileRecord]:
        full = self._full(relpath)
        if self.fs.isdir(full):
            rels = [f"{relpath}/{r}" for r in self.fs.files_under(full) if not is_tmp_name(r)]
        else:
            rels = [relpath]
        records = []
        for rel in rels:
            path = self.fs.join(self.dir, *rel.split("/"))
            rec = FileRecord(path=rel, bytes=self.fs.size(path), sha256=self.fs.sha256(path))
            self._files[rel] = rec
            self._reused_files.discard(rel)
            records.append(rec)
        progress = self.fs.join(self.dir, PROGRESS_DIR)
        self.fs.makedirs(progress)
        self.fs.write_atomic(self.fs.join(progress, FILES_PROGRESS), json.dumps(
            [r.to_dict() for r in self._files.values()]).encode("utf-8"))
        return records

    # Closing ---------------------------------------------------------------------------
    def _schemas(self) -> dict[str, Any]:
        schemas: dict[str, Any] = {}
        for rec in sorted(self._shards.values(), key=lambda r: r.name):
            schema = self.fs.parquet_file(self.fs.join(self.dir, rec.filename)).schema_arrow
            desc = schema_description(schema)
            if rec.kind in schemas and schemas[rec.kind]["string"] != desc["string"]:
                raise StoreError(f"artifact {self.label}: shard {rec.name!r} of kind {rec.kind!r} "
                                 f"has a schema that differs from the kind's other shards")
            schemas.setdefault(rec.kind, desc)
        return schemas

    def _finish(self) -> None:
        finished = time.time()
        shards = sorted(self._shards.values(), key=lambda r: r.name)
        files = sorted(self._files.values(), key=lambda r: r.path)
        for rec in files:
            if not self.fs.isfile(self.fs.join(self.dir, *rec.path.split("/"))):
                raise StoreError(f"artifact {self.label}: registered side file {rec.path!r} "
                                 "has disappeared")
        try:
            info = json.loads(json.dumps(self.info, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise StoreError(f"artifact {self.label}: w.info must hold plain JSON values: {e}") from e
        manifest = {
            "format": MANIFEST_FORMAT,
            "status": "complete",
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "version": self.version,
            "params": self.params,
            "upstream": self.upstream,
            "shards": [r.to_dict() for r in shards],
            "files": [r.to_dict() for r in files],
            "schemas": self._schemas(),
            "rows": sum(r.rows for r in shards),
            "bytes": sum(r.bytes for r in shards) + sum(r.bytes for r in files),
            "info": info,
            "libraries": library_versions(),
            "timings": {"started": utc_iso(self._started), "finished": utc_iso(finished),
                        "seconds": round(finished - self._started, 3)},
            "writer": {"host": socket.gethostname(), "pid": os.getpid()},
        }
        if self._reused or self._reused_files:
            manifest["resumed"] = {"shards_reused": sorted(self._reused),
                                   "files_reused": sorted(self._reused_files)}
        self.fs.write_atomic(self.fs.join(self.dir, MANIFEST),
                             json.dumps(manifest, indent=2, sort_keys=False).encode("utf-8"))
        self.fs.rmtree(self.fs.join(self.dir, PROGRESS_DIR))
        self.fs.remove(self.fs.join(self.dir, INVALID_MANIFEST))
        self.complete = True
        self.artifact = Artifact(self.fs, self.dir, manifest)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and not self.complete:
                self._finish()
        finally:
            self._lock.release()
            if self.fs.is_local:
                self.fs.remove(self._lock.path + ".takeover")
            if self._staging is not None:
                import shutil

                shutil.rmtree(self._staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# The store


@dataclass
class StoreEntry:
    """One artifact folder as :meth:`ArtifactStore.list_artifacts` sees it."""

    stage: str
    fingerprint: str
    path: str
    status: str                     # "complete" | "partial"
    rows: int | None
    bytes: int
    age_s: float
    referenced_by: list[str] = field(default_factory=list)
    locked_by: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class ArtifactStore:
    """A folder (or fsspec URL) holding ``<stage>/<fingerprint>/`` artifacts and ``_runs/``."""

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT) -> None:
        self.fs, self.root_path = filesystem_for(root)
        self.root = self.fs.url(self.root_path)
        self._writable = False

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root!r})"

    def artifact_dir(self, stage: str, fp: str) -> str:
        _check_stage_fp(stage, fp)
        return self.fs.join(self.root_path, stage, fp)

    def path(self, stage: str, fp: str) -> Path | str:
        return _native_path(self.fs, self.artifact_dir(stage, fp))

    # Writability -----------------------------------------------------------------------
    def check_writable(self) -> None:
        """Raise a clear :class:`StoreError` now if the root cannot hold artifacts."""
        if self._writable:
            return
        root = self.root
        fix = ("choose another store (the config's `store:` field or --store), or fix the "
               "path's permissions")
        if self.fs.exists(self.root_path) and not self.fs.isdir(self.root_path):
            raise StoreError(f"the artifact store root {root} is a file, not a folder: remove or "
                             f"rename that file, or {fix}")
        try:
            self.fs.makedirs(self.root_path)
        except OSError as e:
            raise StoreError(f"cannot create the artifact store root {root} "
                             f"({e.strerror or e}): {fix}") from e
        probe = self.fs.join(self.root_path, f".write-probe-{os.getpid()}")
        try:
            self.fs.write_atomic(probe, b"")
            self.fs.remove(probe)
        except OSError as e:
            raise StoreError(f"the artifact store root {root} is not writable "
                             f"({e.strerror or e}): {fix}") from e
        self._writable = True

    # Writing and reading ---------------------------------------------------------------
    def writer(self, stage: str, fp: str, *, params: dict[str, Any],
               upstream: dict[str, str] | None = None, version: int = 1,
               lock_timeout: float = 600.0, invalidate: Iterable[str] = ()) -> ArtifactWriter:
        """An :class:`ArtifactWriter` for ``<stage>/<fp>``; use it as a context manager.

        ``invalidate`` names shards to drop first (see :meth:`invalidate_shards`).
        """
        return ArtifactWriter(self, stage, fp, params=params, upstream=upstream or {},
                              version=version, lock_timeout=lock_timeout, invalidate=invalidate)

    def get(self, stage: str, fp: str) -> Artifact | None:
        """The complete artifact ``<stage>/<fp>``, or None (absent, partial or invalidated)."""
        path = self.artifact_dir(stage, fp)
        manifest = read_manifest(self.fs, path)
        return Artifact(self.fs, path, manifest) if is_complete(manifest) else None

    def verify(self, stage: str, fp: str) -> VerifyReport:
        return verify_dir(self.fs, self.artifact_dir(stage, fp))

    def invalidate_shards(self, stage: str, fp: str, names: Iterable[str],
                          lock_timeout: float = 60.0) -> None:
        """Drop the named shards (and/or side files, by path) so that the stage's next writer
        recomputes them alone; the manifest moves to ``manifest.invalid.json``."""
        path = self.artifact_dir(stage, fp)
        with ArtifactLock(self.fs, path, f"{stage}/{fp} in {self.root}", timeout=lock_timeout):
            self._invalidate(path, list(names))

    def discard(self, stage: str, fp: str, lock_timeout: float = 60.0) -> None:
        """Remove one artifact (complete or not) so that its stage recomputes it from scratch
        (``--force``); waits for a live writer's lock like a writer would."""
        path = self.artifact_dir(stage, fp)
        if not self.fs.exists(path):
            return
        with ArtifactLock(self.fs, path, f"{stage}/{fp} in {self.root}", timeout=lock_timeout):
            for entry in self.fs.listdir(path):
                if not entry.startswith(LOCK_NAME):
                    full = self.fs.join(path, entry)
                    self.fs.rmtree(full) if self.fs.isdir(full) else self.fs.remove(full)
        if self.fs.is_local:
            for leftover in (LOCK_NAME + ".takeover",):
                self.fs.remove(self.fs.join(path, leftover))
            try:
                os.rmdir(path)
            except OSError:
                pass
        elif not self.fs.listdir(path):
            self.fs.rmtree(path)

    def _invalidate(self, path: str, names: list[str]) -> None:
        fs = self.fs
        manifest = read_manifest(fs, path) or read_manifest(fs, path, INVALID_MANIFEST) or {}
        shard_names = {d["name"] for d in manifest.get("shards", [])}
        file_paths = {d["path"] for d in manifest.get("files", [])}
        for name in names:
            if name in shard_names or fs.exists(fs.join(path, name + ".parquet")):
                fs.remove(fs.join(path, name + ".parquet"))
                fs.remove(fs.join(path, PROGRESS_DIR, name + ".json"))
            elif name in file_paths:
                fs.remove(fs.join(path, *name.split("/")))
            else:
                raise StoreError(f"{fs.url(path)} has no shard or side file {name!r} to invalidate")
        if fs.exists(fs.join(path, MANIFEST)):
            if manifest.get("status") == "complete":
                fs.write_atomic(fs.join(path, INVALID_MANIFEST), json.dumps(
                    {**manifest, "status": "invalid", "invalidated": sorted(names)},
                    indent=2).encode("utf-8"))
            fs.remove(fs.join(path, MANIFEST))

    # Runs and garbage ------------------------------------------------------------------
    def record_run(self, config_name: str, fingerprints: dict[str, str]) -> str:
        """Remember ``{stage: fingerprint}`` as the latest run of ``config_name``.

        Keys may carry a variant after a colon (``"distill:sft"``): the stage is the part
        before it. Returns the path of ``<root>/_runs/<config_name>.json``.
        """
        self.check_writable()
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", config_name) or "_"
        runs = self.fs.join(self.root_path, RUNS_DIR)
        self.fs.makedirs(runs)
        path = self.fs.join(runs, safe + ".json")
        self.fs.write_atomic(path, json.dumps({
            "config": config_name, "time": utc_iso(time.time()), "artifacts": fingerprints,
        }, indent=2, sort_keys=True).encode("utf-8"))
        return self.fs.url(path)

    def runs(self) -> dict[str, dict[str, Any]]:
        """The latest run of each config: ``{config_name: {"time", "artifacts"}}``."""
        out = {}
        runs = self.fs.join(self.root_path, RUNS_DIR)
        for name in self.fs.listdir(runs):
            if name.endswith(".json") and not is_tmp_name(name):
                try:
                    rec = json.loads(self.fs.read_bytes(self.fs.join(runs, name)))
                    out[rec.get("config", name[:-5])] = rec
                except ValueError:
                    continue
        return out

    def list_artifacts(self) -> list[StoreEntry]:
        """Every artifact folder, complete or partial, with who references it."""
        refs: dict[tuple[str, str], list[str]] = {}
        for config, rec in self.runs().items():
            for key, fp in rec.get("artifacts", {}).items():
                refs.setdefault((key.split(":")[0], fp), []).append(config)
        now = time.time()
        entries = []
        for stage in self.fs.listdir(self.root_path):
            stage_dir = self.fs.join(self.root_path, stage)
            if stage.startswith((".", "_")) or not self.fs.isdir(stage_dir):
                continue
            for fp in self.fs.listdir(stage_dir):
                path = self.fs.join(stage_dir, fp)
                if not self.fs.isdir(path):
                    continue
                entries.append(self._entry(stage, fp, path, refs, now))
        return entries

    def _entry(self, stage: str, fp: str, path: str, refs: dict, now: float) -> StoreEntry:
        fs = self.fs
        manifest = read_manifest(fs, path)
        complete = is_complete(manifest)
        files = fs.files_under(path)
        size = sum(fs.size(fs.join(path, *f.split("/"))) for f in files)
        if complete:
            rows = int(manifest.get("rows", 0))
            try:
                age = now - parse_iso(manifest["timings"]["finished"])
            except (KeyError, ValueError):
                age = now - fs.mtime(fs.join(path, MANIFEST))
        else:
            rows = None
            stamps = [fs.mtime(fs.join(path, *f.split("/"))) for f in files]
            age = now - max(stamps) if stamps else 0.0
        holder = ArtifactLock(fs, path, "").live_holder()
        return StoreEntry(stage=stage, fingerprint=fp, path=fs.url(path),
                          status="complete" if complete else "partial", rows=rows, bytes=size,
                          age_s=age, referenced_by=sorted(refs.get((stage, fp), [])),
                          locked_by=holder)

    def garbage(self) -> list[StoreEntry]:
        """Artifacts (complete or partial) that no config's latest run references, and that
        no live writer holds."""
        return [e for e in self.list_artifacts() if not e.referenced_by and e.locked_by is None]

    def remove(self, entries: Iterable[StoreEntry]) -> list[str]:
        """Delete the given artifacts' folders (only when asked); returns the removed paths.
        An artifact a live writer holds is refused."""
        removed = []
        for entry in entries:
            path = self.artifact_dir(entry.stage, entry.fingerprint)
            holder = ArtifactLock(self.fs, path, "").live_holder()
            if holder is not None:
                raise StoreError(f"not removing {self.fs.url(path)}: it is being written by pid "
                                 f"{holder.get('pid')} on {holder.get('host')}")
            self.fs.rmtree(path)
            removed.append(self.fs.url(path))
            stage_dir = self.fs.join(self.root_path, entry.stage)
            if not self.fs.listdir(stage_dir):
                self.fs.rmtree(stage_dir)
        return removed
