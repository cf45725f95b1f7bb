"""Reading one complete artifact: its manifest, shards and side files, each checked.

How each way of reading is protected:

- :meth:`Artifact.read_table`, :meth:`~Artifact.read_kind`, :meth:`~Artifact.iter_batches`
  and :meth:`~Artifact.read_file` read whole files: the bytes are hashed as they are read (a
  local shard is memory-mapped, hashed, then parsed from the same mapping: one read) and a
  mismatch with the manifest's sha256 raises :class:`~storage.errors.CorruptDataError`
  naming the file and the repair command; nothing of it is returned.
- :meth:`Artifact.parquet_file` opens a shard for random access (the teacher cache reads one
  row group at a time from a memory map): it cannot hash the whole file. Its pages carry
  CRCs that are checked as they are decoded, an unreadable footer raises
  :class:`~storage.errors.CorruptDataError`, and :meth:`Artifact.check_quick` (sizes, footers,
  rows; run before every reuse) plus ``verify`` (full hashes) cover the rest.
- :meth:`Artifact.file_path` hands a path to code that reads it itself (``from_pretrained``):
  call :meth:`Artifact.verify_files` first when the bytes must be trusted.

Opening an artifact also tidies what a writer killed exactly at its commit left behind (a
stale ``.lock``, the ``_progress/`` journal), when it can: on a read-only store nothing is
written, and reading works all the same.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import CorruptDataError, StoreError
from storage.fs import LocalFS, filesystem_for, is_tmp_name
from storage.locks import LOCK_NAME, TAKEOVER_NAME, ArtifactLock
from storage.manifest import (INVALID_MANIFEST, MANIFEST, content_digest, is_complete,
                              load_manifest)
from storage.shards import CHECKPOINTS_DIR, PROGRESS_DIR, FileRecord, ShardRecord
from storage.verify import CheckReport, check_artifact


def native_path(fs: LocalFS, path: str) -> Path | str:
    return Path(path) if fs.is_local else fs.url(path)


def tidy_complete(fs: LocalFS, artifact_dir: str, lock_held: bool = False) -> None:
    """Remove what a complete artifact no longer needs: the journal, an old invalid manifest,
    temporary files, training checkpoints (kept until the commit, so that a kill before it
    loses no training), and a stale lock left by a writer killed at its commit. Skipped while another live writer
    holds the lock (``lock_held``: the caller holds it); any OS error (a read-only store) is
    ignored."""
    lock = ArtifactLock(fs, artifact_dir, f"artifact {fs.url(artifact_dir)}")
    try:
        names = fs.listdir(artifact_dir)
        if LOCK_NAME in names and not lock_held:
            info = lock.holder()
            if not lock.is_stale(info):
                return
            lock._take_over(info)
        for name in names:
            if (name in (PROGRESS_DIR, CHECKPOINTS_DIR, INVALID_MANIFEST, TAKEOVER_NAME)
                    or is_tmp_name(name)):
                full = fs.join(artifact_dir, name)
                fs.rmtree(full) if fs.isdir(full) else fs.remove(full)
    except OSError:
        pass


class CheckedParquetFile:
    """A :class:`pyarrow.parquet.ParquetFile` whose reads raise
    :class:`~storage.errors.CorruptDataError` (naming the shard and the repair) when a page
    fails its CRC or cannot be decoded; everything else is the ParquetFile's own."""

    _READS = ("read", "read_row_group", "read_row_groups")

    def __init__(self, parquet_file: pq.ParquetFile, corrupt) -> None:
        self._pf = parquet_file
        self._corrupt = corrupt          # reason -> CorruptDataError

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._pf, name)
        if name not in self._READS:
            return attr

        def checked(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except (OSError, pa.ArrowException, UnicodeDecodeError) as e:
                raise self._corrupt(f"a page failed its check while reading ({e})") from None
        return checked

    def iter_batches(self, *args, **kwargs) -> Iterator[pa.RecordBatch]:
        try:
            yield from self._pf.iter_batches(*args, **kwargs)
        except (OSError, pa.ArrowException, UnicodeDecodeError) as e:
            raise self._corrupt(f"a page failed its check while reading ({e})") from None


class Artifact:
    """A complete artifact: its manifest, its shards and its side files."""

    def __init__(self, fs: LocalFS, artifact_dir: str, manifest: dict[str, Any]) -> None:
        self.fs = fs
        self.dir = artifact_dir
        self.manifest = manifest
        self.shards = [ShardRecord.from_dict(d) for d in manifest.get("shards", [])]
        self.files = [FileRecord.from_dict(d) for d in manifest.get("files", [])]
        self._by_name = {s.name: s for s in self.shards}
        self._file_by_path = {f.path: f for f in self.files}

    # What it is ------------------------------------------------------------------------
    @property
    def path(self) -> Path | str:
        """The folder: a ``Path`` on a local store, a URL string on an fsspec store."""
        return native_path(self.fs, self.dir)

    @property
    def url(self) -> str:
        return self.fs.url(self.dir)

    stage = property(lambda self: self.manifest["stage"])
    fingerprint = property(lambda self: self.manifest["fingerprint"])
    version = property(lambda self: self.manifest.get("version"))
    params = property(lambda self: self.manifest.get("params", {}))
    upstream = property(lambda self: self.manifest.get("upstream", {}))
    info = property(lambda self: self.manifest.get("info", {}))
    digest = property(lambda self: self.manifest["digest"])

    @property
    def content_digest(self) -> str:
        """What downstream manifests record (see :func:`storage.manifest.content_digest`)."""
        return content_digest(self.manifest)

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

    # Checks ----------------------------------------------------------------------------
    def check_quick(self) -> CheckReport:
        """Sizes, Parquet footers, row counts, the manifest's digest and the upstream
        manifests' digests (see :mod:`storage.verify`); milliseconds. ``report.ok`` means
        safe to reuse; ``report.summary()`` is one line for the log."""
        return check_artifact(self.fs, self.dir)

    def verify(self) -> CheckReport:
        """The quick check plus a sha256 of every shard and side file."""
        return check_artifact(self.fs, self.dir, full=True)

    # Shards ----------------------------------------------------------------------------
    def shard_path(self, name: str) -> Path | str:
        return native_path(self.fs, self.fs.join(self.dir, self.shard(name).filename))

    def _corrupt(self, relpath: str, reason: str) -> CorruptDataError:
        return CorruptDataError(self.url, relpath, reason)

    def parquet_file(self, name: str) -> CheckedParquetFile:
        """The shard opened for random access (memory-mapped on a local store); not hashed
        whole, but its page CRCs are checked as pages are decoded (see the module doc)."""
        rec = self.shard(name)
        try:
            return CheckedParquetFile(self.fs.parquet_file(self.fs.join(self.dir, rec.filename)),
                                      lambda reason: self._corrupt(rec.filename, reason))
        except FileNotFoundError:
            raise self._corrupt(rec.filename, "the file is missing") from None
        except Exception as e:  # noqa: BLE001 - any failure to parse the footer means damaged
            raise self._corrupt(rec.filename, f"its Parquet footer is unreadable "
                                              f"({type(e).__name__}: {e})") from None

    def _verified_buffer(self, rec: ShardRecord | FileRecord, relpath: str) -> pa.Buffer:
        """The whole file, hashed against ``rec`` as it is read."""
        path = self.fs.join(self.dir, *relpath.split("/"))
        try:
            buf = self.fs.read_buffer(path)
        except FileNotFoundError:
            raise self._corrupt(relpath, "the file is missing") from None
        if buf.size != rec.bytes:
            kind = "truncated" if buf.size < rec.bytes else "size differs"
            raise self._corrupt(relpath, f"{kind}: {buf.size} bytes, manifest says {rec.bytes}")
        actual = hashlib.sha256(buf).hexdigest()
        if actual != rec.sha256:
            raise self._corrupt(relpath, f"its sha256 is {actual[:16]}..., the manifest says "
                                         f"{rec.sha256[:16]}... (bytes altered)")
        return buf

    def _verified_parquet(self, name: str) -> pq.ParquetFile:
        rec = self.shard(name)
        buf = self._verified_buffer(rec, rec.filename)
        try:
            return pq.ParquetFile(pa.BufferReader(buf))
        except (OSError, pa.ArrowException) as e:   # hashed fine but not Parquet
            raise self._corrupt(rec.filename, f"not readable as Parquet ({e})") from None

    def read_table(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """One whole shard, its sha256 checked as it is read."""
        return self._verified_parquet(name).read(columns=columns)

    def read_kind(self, kind: str, columns: list[str] | None = None) -> pa.Table:
        """All shards of one kind, concatenated in name order, each hash-checked."""
        tables = [self.read_table(s.name, columns) for s in self.shards_of(kind)]
        if not tables:
            raise StoreError(f"artifact {self.url} has no shards of kind {kind!r} "
                             f"(kinds: {self.kinds()})")
        return pa.concat_tables(tables)

    def iter_batches(self, names: Iterable[str] | None = None, *, kind: str | None = None,
                     batch_size: int = 1024,
                     columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Stream record batches over the named shards (default: all, or those of ``kind``);
        each shard is hash-checked before its first batch is given."""
        if names is None:
            names = [s.name for s in (self.shards_of(kind) if kind else self.shards)]
        for name in names:
            yield from self._verified_parquet(name).iter_batches(batch_size=batch_size,
                                                                 columns=columns)

    # Side files ------------------------------------------------------------------------
    def has_file(self, relpath: str) -> bool:
        return any(f.path == relpath or f.path.startswith(relpath.rstrip("/") + "/")
                   for f in self.files)

    def files_under(self, relpath: str) -> list[FileRecord]:
        """The records of a side file, or of every file of a registered folder."""
        prefix = relpath.rstrip("/") + "/"
        found = [f for f in self.files if f.path == relpath or f.path.startswith(prefix)]
        if not found:
            raise StoreError(f"artifact {self.url} has no side file {relpath!r}; it has "
                             f"{[f.path for f in self.files]}")
        return found

    def file_path(self, relpath: str) -> Path | str:
        """Where a side file (or a registered folder) lies: a local path or a URL. Whoever
        reads it there is not checked: see :meth:`verify_files`."""
        self.files_under(relpath)
        return native_path(self.fs, self.fs.join(self.dir, *relpath.split("/")))

    def read_file(self, relpath: str) -> bytes:
        """A side file's bytes, its sha256 checked."""
        rec = self._file_by_path.get(relpath)
        if rec is None:
            self.files_under(relpath)
            raise StoreError(f"{relpath!r} of artifact {self.url} is a folder: read its files")
        return self._verified_buffer(rec, relpath).to_pybytes()

    def verify_files(self, relpath: str) -> None:
        """Re-hash a side file or every file of a folder (e.g. ``"model"`` before
        ``from_pretrained``); :class:`~storage.errors.CorruptDataError` for a bad one."""
        for rec in self.files_under(relpath):
            self._verified_buffer(rec, rec.path)

    def __repr__(self) -> str:
        return (f"Artifact({self.stage}/{self.fingerprint}, {len(self.shards)} shards, "
                f"{self.rows} rows, {len(self.files)} files)")


def load_artifact(fs: LocalFS, artifact_dir: str) -> Artifact | None:
    """The complete artifact in ``artifact_dir`` (leftovers of a killed commit tidied), None
    when there is no complete one; :class:`~storage.errors.ManifestError` when its manifest
    cannot be trusted."""
    manifest = load_manifest(fs, artifact_dir)
    if not is_complete(manifest):
        return None
    names = fs.listdir(artifact_dir)
    if any(n in (LOCK_NAME, PROGRESS_DIR, INVALID_MANIFEST, TAKEOVER_NAME) or is_tmp_name(n)
           for n in names):
        tidy_complete(fs, artifact_dir)
    return Artifact(fs, artifact_dir, manifest)


def open_artifact(path: str | os.PathLike) -> Artifact:
    """The complete artifact at a folder path or URL; StoreError if it is not complete,
    :class:`~storage.errors.ManifestError` if its manifest cannot be trusted."""
    fs, p = filesystem_for(path)
    art = load_artifact(fs, p)
    if art is None:
        raise StoreError(f"{fs.url(p)} is not a complete artifact (no complete {MANIFEST}); "
                         "`cot2align inspect` on it says what it holds")
    return art
