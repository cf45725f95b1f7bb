"""Writing one artifact: shards and side files, a journal to resume from, the commit.

:class:`ArtifactWriter` (made by :meth:`storage.store.ArtifactStore.writer`) holds the
artifact's lock (:mod:`storage.locks`) inside its ``with`` block. Each shard is renamed into
place whole, after its record (rows, bytes, sha256) went to the ``_progress/`` journal; side
files are journaled in ``_progress/_files.json``. A clean exit writes the manifest
(:mod:`storage.manifest`) last, via a temporary name and a rename: that is the commit point.

Resuming: a writer that finds no complete manifest adopts exactly the shards and side files
whose journal record still matches their bytes (size and sha256, re-hashed now); any other
Parquet file is deleted and recomputed. A flipped or truncated shard therefore never becomes
part of a manifest, and a crashed run's whole shards are never recomputed.

Replacing (``replace=True``, for ``--force``): the new artifact is built in ``_replace/``
inside the artifact folder while the old one stays complete and readable; a failure leaves
it untouched. On success the new files are moved into place and the new manifest renamed in
last; a writer killed during that swap is rolled forward by the next writer to open the
artifact (:func:`finish_replace`), since the new manifest is already complete.

Invalidating (:func:`invalidate_in`): the named shards or side files are deleted, the
records of the others go to the journal, and the manifest is set aside as
``manifest.invalid.json``: the next writer recomputes exactly what was dropped. Every
artifact built from it is set aside whole (:func:`set_aside`, through
:meth:`storage.store.ArtifactStore.set_aside_downstream`): it may hold results of the damaged
bytes.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from storage.artifact import Artifact, load_artifact, native_path, tidy_complete
from storage.errors import (ArtifactCompleteError, CorruptDataError, StoreError,
                            describe_os_error)
from storage.fingerprint import FingerprintError, canonical_json
from storage.fs import LocalFS, filesystem_for, is_tmp_name
from storage.locks import LOCK_NAME
from storage.manifest import (INVALID_MANIFEST, MANIFEST, MANIFEST_FORMAT, is_complete,
                              library_versions, load_manifest, manifest_bytes, utc_iso)
from storage.shards import (DEFAULT_ROW_GROUP_ROWS, PROGRESS_DIR, FileRecord, ShardRecord,
                            ShardWriter, as_table, check_name, schema_description)

if TYPE_CHECKING:
    from storage.store import ArtifactStore

FILES_PROGRESS = "_files.json"
REPLACE_DIR = "_replace"
RESERVED = (MANIFEST, INVALID_MANIFEST, LOCK_NAME, PROGRESS_DIR, REPLACE_DIR)
log = logging.getLogger("cot2align")


def _top(relpath: str) -> str:
    """The unit a side file was registered in: its first path component."""
    return relpath.split("/", 1)[0]


def _remove_entry(fs: LocalFS, path: str) -> None:
    fs.rmtree(path) if fs.isdir(path) else fs.remove(path)


# ---------------------------------------------------------------------------------------
# The journal


def read_journal(fs: LocalFS, artifact_dir: str) -> tuple[dict[str, ShardRecord],
                                                          dict[str, FileRecord]]:
    """The shard and side-file records of ``_progress/`` (unreadable entries are skipped)."""
    progress = fs.join(artifact_dir, PROGRESS_DIR)
    shards: dict[str, ShardRecord] = {}
    for entry in fs.listdir(progress):
        if entry.endswith(".json") and entry != FILES_PROGRESS and not is_tmp_name(entry):
            try:
                rec = ShardRecord.from_dict(json.loads(fs.read_bytes(fs.join(progress, entry))))
                shards[rec.name] = rec
            except (ValueError, KeyError, TypeError):
                pass
    files: dict[str, FileRecord] = {}
    try:
        for d in json.loads(fs.read_bytes(fs.join(progress, FILES_PROGRESS))):
            files[d["path"]] = FileRecord.from_dict(d)
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        pass
    return shards, files


def write_journal(fs: LocalFS, artifact_dir: str, shards: Iterable[ShardRecord] = (),
                  files: Iterable[FileRecord] | None = None) -> None:
    """Add shard records to the journal; replace its side-file list when ``files`` is given."""
    progress = fs.join(artifact_dir, PROGRESS_DIR)
    fs.makedirs(progress)
    for rec in shards:
        fs.write_atomic(fs.join(progress, rec.name + ".json"),
                        json.dumps(rec.to_dict()).encode("utf-8"))
    if files is not None:
        fs.write_atomic(fs.join(progress, FILES_PROGRESS),
                        json.dumps([r.to_dict() for r in files]).encode("utf-8"))


# ---------------------------------------------------------------------------------------
# Invalidating, setting aside, replacing (all with the artifact's lock held)


def invalidate_in(fs: LocalFS, path: str, names: Iterable[str]) -> list[str]:
    """Drop the named shards and side files (a file drops its whole registered folder) so
    that the next writer recomputes exactly those; returns what was removed."""
    names = sorted(set(names))
    manifest = load_manifest(fs, path)
    if is_complete(manifest):
        shards = {d["name"]: ShardRecord.from_dict(d) for d in manifest["shards"]}
        files = {d["path"]: FileRecord.from_dict(d) for d in manifest["files"]}
    else:
        shards, files = read_journal(fs, path)
    groups = set()
    for name in names:
        if name in shards:
            continue
        if not any(p == name or p.startswith(name.rstrip("/") + "/") for p in files):
            raise StoreError(f"{fs.url(path)} has no shard or side file {name!r} to invalidate "
                             f"(shards: {sorted(shards)}, files: {sorted(files)})")
        groups.add(_top(name))
    kept_files = [r for p, r in files.items() if _top(p) not in groups]
    write_journal(fs, path, [r for n, r in shards.items() if n not in names], kept_files)
    if is_complete(manifest):
        fs.write_atomic(fs.join(path, INVALID_MANIFEST), manifest_bytes(
            {**manifest, "status": "invalid", "invalidated": names}))
        fs.remove(fs.join(path, MANIFEST))
    removed = []
    for name in names:
        if name in shards:
            fs.remove(fs.join(path, PROGRESS_DIR, name + ".json"))
            fs.remove(fs.join(path, name + ".parquet"))
            removed.append(name + ".parquet")
    for group in sorted(groups):
        _remove_entry(fs, fs.join(path, group))
        removed.append(group)
    return removed


def set_aside(fs: LocalFS, path: str) -> None:
    """Make the whole artifact recompute from nothing: its manifest (even one that cannot be
    read) becomes ``manifest.invalid.json``; its shards, side files, journal and checkpoints
    are deleted (none of them can be trusted, or they were computed from inputs that
    changed)."""
    if fs.exists(fs.join(path, MANIFEST)):
        fs.replace(fs.join(path, MANIFEST), fs.join(path, INVALID_MANIFEST))
    for entry in fs.listdir(path):
        if entry not in (LOCK_NAME, INVALID_MANIFEST):
            _remove_entry(fs, fs.join(path, entry))


def finish_replace(fs: LocalFS, final: str) -> bool:
    """Move a finished replacement from ``<final>/_replace/`` into place (idempotent, so a
    swap killed half-way is rolled forward). False when there is none to move."""
    staging = fs.join(final, REPLACE_DIR)
    try:
        new = load_manifest(fs, staging)
    except StoreError:
        new = None
    if not is_complete(new):
        return False
    keep = {LOCK_NAME, REPLACE_DIR} | {d["name"] + ".parquet" for d in new["shards"]} | {
        _top(d["path"]) for d in new["files"]}
    fs.remove(fs.join(final, MANIFEST))            # the old artifact is no longer complete
    for entry in fs.listdir(final):
        if entry not in keep:
            _remove_entry(fs, fs.join(final, entry))
    for entry in fs.listdir(staging):
        if entry in keep:
            _remove_entry(fs, fs.join(final, entry))
            fs.replace(fs.join(staging, entry), fs.join(final, entry))
    fs.replace(fs.join(staging, MANIFEST), fs.join(final, MANIFEST))
    fs.rmtree(staging)
    return True


# ---------------------------------------------------------------------------------------
# Whole shards, from the writer or from another process


def write_whole_shard(target, name: str, data, *, row_group_size: int, schema, kind, info,
                      **parquet_options: Any) -> ShardRecord:
    """Write one whole shard through ``target.open_shard`` (an :class:`ArtifactWriter` or a
    :class:`ShardSink`): committed (journaled, then renamed) only when fully written."""
    table = as_table(data, schema)
    shard = target.open_shard(name, table.schema, kind=kind, **parquet_options)
    try:
        shard.info.update(info or {})
        shard.write(table, row_group_size=row_group_size)
    except BaseException:
        shard.abort()
        raise
    return shard.commit()


class ShardSink:
    """Writes whole shards into an artifact whose :class:`ArtifactWriter` is open in another
    process (made by :meth:`ArtifactWriter.shard_sink`; picklable: the store's URL, the
    artifact and the writer's lock token, nothing open).

    A shard is written as the writer writes one (temporary name, journal record with its
    sha256, rename), so the writer adopts it by the same rule as a crashed run's shards
    (:meth:`ArtifactWriter.adopt_shard`). Before each shard the sink checks that the lock
    still carries the writer's token: a sink whose writer lost the artifact writes nothing.
    """

    def __init__(self, root: str, stage: str, fp: str, replace: bool, token: str) -> None:
        self.root, self.stage, self.fingerprint = root, stage, fp
        self.replace, self.token = replace, token
        self._fs: LocalFS | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}

    def _open(self) -> tuple[LocalFS, str, str]:
        """(filesystem, the artifact's folder, the folder shards go to)."""
        if self._fs is None:
            self._fs, self._root_path = filesystem_for(self.root)
        final = self._fs.join(self._root_path, self.stage, self.fingerprint)
        return self._fs, final, self._fs.join(final, REPLACE_DIR) if self.replace else final

    def _check_lock(self) -> None:
        fs, final, _ = self._open()
        try:
            holder = json.loads(fs.read_bytes(fs.join(final, LOCK_NAME)))
        except (FileNotFoundError, ValueError):
            holder = None
        if not isinstance(holder, dict) or holder.get("token") != self.token:
            raise StoreError(f"{self.stage}/{self.fingerprint} in {self.root}: the writer that "
                             "sent this shard no longer holds the artifact's lock; not writing")

    def open_shard(self, name: str, schema: pa.Schema, *, kind: str | None = None,
                   **parquet_options: Any) -> ShardWriter:
        """A :class:`ShardWriter` for streaming row groups into one shard (committed on close)."""
        self._check_lock()
        fs, _, directory = self._open()
        return ShardWriter(fs, directory, check_name(name), schema, kind=kind,
                           options=parquet_options)

    def write_shard(self, name: str, data: pa.Table | pa.RecordBatch | Iterable[pa.RecordBatch],
                    *, row_group_size: int = DEFAULT_ROW_GROUP_ROWS,
                    schema: pa.Schema | None = None, kind: str | None = None,
                    info: dict[str, Any] | None = None, **parquet_options: Any) -> ShardRecord:
        """Write one whole shard atomically, as :meth:`ArtifactWriter.write_shard` does."""
        return write_whole_shard(self, name, data, row_group_size=row_group_size, schema=schema,
                                 kind=kind, info=info, **parquet_options)


# ---------------------------------------------------------------------------------------
# The writer


class ArtifactWriter:
    """The open side of one artifact; made by :meth:`ArtifactStore.writer`, used in ``with``."""

    def __init__(self, store: "ArtifactStore", stage: str, fp: str, *, params: dict[str, Any],
                 upstream: dict[str, str], version: int, lock_timeout: float | None,
                 invalidate: Iterable[str] = (), replace: bool = False) -> None:
        try:
            canonical_json(params, "params")
            canonical_json(upstream, "upstream")
        except FingerprintError as e:
            raise StoreError(f"cannot record the params of {stage}/{fp}: {e}") from e
        self.store = store
        self.fs = store.fs
        self.stage, self.fingerprint = stage, fp
        self.params, self.upstream, self.version = params, upstream, version
        self.final_dir = store.artifact_dir(stage, fp)
        self.dir = self.final_dir            # where files are written: _replace/ when replacing
        self.label = f"{stage}/{fp} in {store.root}"
        self.info: dict[str, Any] = {}
        self.complete = False
        self.artifact: Artifact | None = None
        self.replace = replace
        self._lock = store.lock(self.final_dir, self.label, timeout=lock_timeout)
        self._invalidate = list(invalidate)
        self._shards: dict[str, ShardRecord] = {}      # whole shards on disk, by name
        self._reused: set[str] = set()
        self._files: dict[str, FileRecord] = {}
        self._reused_files: set[str] = set()
        self._upstream_digests: dict[str, str] = {}
        self._staging: str | None = None                # local staging of a remote store
        self._started = 0.0

    @property
    def path(self) -> Path | str:
        return native_path(self.fs, self.final_dir)

    def _os_error(self, e: OSError, what: str, path: str, after: str = "") -> StoreError:
        return describe_os_error(e, f"{what} of {self.stage}/{self.fingerprint}",
                                 self.fs.url(path), after=after)

    # Opening and resuming --------------------------------------------------------------
    def __enter__(self) -> "ArtifactWriter":
        self.store.check_writable()
        self._started = time.time()
        try:
            self.fs.makedirs(self.final_dir)
        except OSError as e:
            raise self._os_error(e, "the folder", self.final_dir) from e
        self._lock.acquire()
        try:
            self._open()
        except OSError as e:
            self._lock.release()
            raise self._os_error(e, "the folder", self.final_dir) from e
        except BaseException:
            self._lock.release()
            raise
        return self

    def _open(self) -> None:
        fs = self.fs
        if finish_replace(fs, self.final_dir):
            log.info("finished the interrupted replacement of %s", self.label)
        if self._invalidate:
            invalidate_in(fs, self.final_dir, self._invalidate)
            self.store.set_aside_downstream(self.stage, self.fingerprint)
        if self.replace:
            self.dir = fs.join(self.final_dir, REPLACE_DIR)
            fs.makedirs(self.dir)
        else:
            art = load_artifact(fs, self.final_dir)
            if art is not None:
                tidy_complete(fs, self.final_dir, lock_held=True)
                self.complete, self.artifact = True, art
                self._shards = {s.name: s for s in art.shards}
                return
        self._upstream_digests = self.store.upstream_digests(self.upstream)
        self._resume()

    def _resume(self) -> None:
        """Adopt the journaled shards and side files whose bytes still match; delete the
        rest (temporary files, unjournaled or altered Parquet)."""
        fs = self.fs
        shards, files = read_journal(fs, self.dir)
        dropped = []
        for entry in fs.listdir(self.dir):
            full = fs.join(self.dir, entry)
            if is_tmp_name(entry):                      # a killed writer's partial file
                fs.remove(full)
            elif entry.endswith(".parquet"):
                rec = shards.pop(entry[:-len(".parquet")], None)
                if rec is not None and fs.size(full) == rec.bytes \
                        and fs.sha256(full) == rec.sha256:
                    self._shards[rec.name] = rec
                    self._reused.add(rec.name)
                    continue
                dropped.append(entry)
                fs.remove(full)
                if rec is not None:
                    fs.remove(fs.join(self.dir, PROGRESS_DIR, rec.name + ".json"))
        for rec in shards.values():                     # journaled, but the file is gone
            fs.remove(fs.join(self.dir, PROGRESS_DIR, rec.name + ".json"))
        self._adopt_files(files, dropped)
        for entry in fs.listdir(fs.join(self.dir, PROGRESS_DIR)):
            if is_tmp_name(entry):
                fs.remove(fs.join(self.dir, PROGRESS_DIR, entry))
        if self._reused or dropped:
            log.info("resuming %s: kept %d journaled shards whose sha256 still matches; "
                     "deleted %s", self.label, len(self._reused), dropped or "nothing")

    def _adopt_files(self, files: dict[str, FileRecord], dropped: list[str]) -> None:
        fs = self.fs
        bad_groups = set()
        for relpath, rec in files.items():
            full = fs.join(self.dir, *relpath.split("/"))
            if not (fs.isfile(full) and fs.size(full) == rec.bytes
                    and fs.sha256(full) == rec.sha256):
                bad_groups.add(_top(relpath))
        for group in sorted(bad_groups):
            _remove_entry(fs, fs.join(self.dir, group))
            dropped.append(group)
        for relpath, rec in files.items():
            if _top(relpath) not in bad_groups:
                self._files[relpath] = rec
                self._reused_files.add(relpath)
        if bad_groups:
            write_journal(fs, self.dir, files=self._files.values())

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
        """A whole shard already written (by this run or a crashed earlier one), read back
        with its sha256 checked against the journal."""
        import hashlib

        rec = self._shards.get(name)
        if rec is None:
            raise StoreError(f"artifact {self.label} has no whole shard {name!r} yet")
        buf = self.fs.read_buffer(self.fs.join(self.dir, rec.filename))
        if hashlib.sha256(buf).hexdigest() != rec.sha256:
            raise CorruptDataError(self.fs.url(self.dir), rec.filename,
                                   "its sha256 differs from the one journaled when it was written")
        return pq.ParquetFile(pa.BufferReader(buf)).read()

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
        return write_whole_shard(self, name, data, row_group_size=row_group_size, schema=schema,
                                 kind=kind, info=info, **parquet_options)

    # Shards written by other processes ---------------------------------------------------
    def shard_sink(self) -> "ShardSink":
        """A picklable :class:`ShardSink` through which another process (a Ray worker)
        writes shards into this artifact while this writer holds its lock; each shard it
        reports is then taken in with :meth:`adopt_shard`."""
        self._check_open()
        if self._lock.token is None:
            raise StoreError(f"artifact {self.label}: open the writer (`with`) before making "
                             "a shard sink")
        return ShardSink(self.store.root, self.stage, self.fingerprint, self.replace,
                         self._lock.token)

    def adopt_shard(self, name: str) -> ShardRecord:
        """Take in a shard a :class:`ShardSink` wrote in another process. It is adopted only
        when its journal record exists and its bytes still hash to it (size and sha256,
        re-read now): the rule a resuming writer applies to a crashed run's shards."""
        self._check_open()
        check_name(name)
        path = self.fs.join(self.dir, name + ".parquet")
        try:
            rec = ShardRecord.from_dict(json.loads(self.fs.read_bytes(
                self.fs.join(self.dir, PROGRESS_DIR, name + ".json"))))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            rec = None
        if rec is None or rec.name != name or not (
                self.fs.isfile(path) and self.fs.size(path) == rec.bytes
                and self.fs.sha256(path) == rec.sha256):
            raise StoreError(f"artifact {self.label}: shard {name!r}, reported written by a "
                             "worker, is not whole with a matching journal record; not adopted "
                             "(rerun: the resumed writer recomputes it)")
        self._shards[name] = rec
        self._reused.discard(name)
        return rec

    # Side files ------------------------------------------------------------------------
    def _full(self, relpath: str) -> str:
        parts = relpath.split("/")
        if not relpath or relpath.startswith("/") or any(p in ("", ".", "..") for p in parts) \
                or parts[0] in RESERVED or relpath.endswith(".parquet"):
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
        try:
            if "/" in relpath:
                self.fs.makedirs(os.path.dirname(full))
            self.fs.write_atomic(full, data)
        except OSError as e:
            raise self._os_error(e, f"side file {relpath!r}", full,
                                 after="its temporary file is removed") from e
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
            self._upload(relpath)
        if not self.fs.exists(full):
            raise StoreError(f"cannot register side file {relpath!r}: nothing at {self.fs.url(full)}")
        return self._register(relpath)

    def _upload(self, relpath: str) -> None:
        local = Path(self._staging, *relpath.split("/"))
        if not local.exists():
            return
        sources = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        for src in sources:
            dst = self.fs.join(self.dir, src.relative_to(self._staging).as_posix())
            self.fs.makedirs(os.path.dirname(dst))
            self.fs.write_atomic(dst, src.read_bytes())

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
        try:
            write_journal(self.fs, self.dir, files=self._files.values())
        except OSError as e:
            raise self._os_error(e, "the journal", self.fs.join(self.dir, PROGRESS_DIR)) from e
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

    def _manifest(self) -> dict[str, Any]:
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
            "format": MANIFEST_FORMAT, "status": "complete",
            "stage": self.stage, "fingerprint": self.fingerprint, "version": self.version,
            "params": self.params, "upstream": self.upstream,
            "upstream_digests": self._upstream_digests,
            "shards": [r.to_dict() for r in shards], "files": [r.to_dict() for r in files],
            "schemas": self._schemas(),
            "rows": sum(r.rows for r in shards),
            "bytes": sum(r.bytes for r in shards) + sum(r.bytes for r in files),
            "info": info, "libraries": library_versions(),
            "timings": {"started": utc_iso(self._started), "finished": utc_iso(finished),
                        "seconds": round(finished - self._started, 3)},
            "writer": {"host": socket.gethostname(), "pid": os.getpid()},
        }
        if self._reused or self._reused_files:
            manifest["resumed"] = {"shards_reused": sorted(self._reused),
                                   "files_reused": sorted(self._reused_files)}
        return manifest

    def _finish(self) -> None:
        manifest = self._manifest()
        self._lock.heartbeat()                  # also finds out whether the lock was lost
        if self._lock.lost:
            raise StoreError(f"not committing {self.label}: this writer lost its lock (it "
                             "stopped refreshing it, and another writer took it over); rerun")
        path = self.fs.join(self.dir, MANIFEST)
        data = manifest_bytes(manifest)
        try:
            self.fs.write_atomic(path, data)
        except OSError as e:
            raise self._os_error(e, "the manifest", path, after=(
                "the artifact is not committed; its shards are kept and a rerun resumes from "
                "them")) from e
        try:
            self._clean_after_commit()
        except OSError as e:
            raise self._os_error(e, "the commit", self.final_dir, after=(
                "the new manifest is written; the next writer or reader finishes tidying "
                "(or moving a replacement into place)")) from e
        self.complete = True
        self.artifact = Artifact(self.fs, self.final_dir, json.loads(data))

    def _clean_after_commit(self) -> None:
        """After the manifest's rename: move a replacement into place, drop the journal."""
        if self.replace:
            finish_replace(self.fs, self.final_dir)
        else:
            tidy_complete(self.fs, self.final_dir, lock_held=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and not self.complete:
                self._finish()
        finally:
            self._lock.release()
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)
