"""One Parquet shard, written whole or not at all, with deterministic bytes.

A shard ``<name>.parquet`` is written as ``<name>.parquet.tmp-<pid>`` and renamed into place
when closed, so any ``*.parquet`` in an artifact folder was written whole. Its record (rows,
bytes, sha256, kind, info) is journaled under ``_progress/`` *before* the rename: a resumed
writer adopts a shard only when that record exists and the bytes on disk still hash to it.

Determinism: the same rows written with the same options give the same bytes. Row groups are
cut by the caller (a fixed row count, or :class:`~storage.teacher_cache.TeacherCacheWriter`'s
byte budget, both functions of the data only), Parquet files carry no timestamps (only a
``created_by`` string naming the writer library), and the options below are fixed:

- ``compression="zstd"`` level 3: text and id lists shrink 3-5x at a small CPU cost;
  tensor blobs are written uncompressed by their schema's options (see ``storage.schemas``).
- ``use_dictionary=False``: dictionaries are decided per page by size thresholds that make
  the layout harder to reason about and buy little for these columns.
- ``write_statistics=False``: min/max of multi-megabyte blobs is wasted footer space.
- ``write_page_checksum=True``: a CRC32 per page (4 bytes), checked as pages are decoded
  (:meth:`storage.fs.LocalFS.parquet_file`), so readers that memory-map a shard for random
  row access, and cannot hash it whole, still refuse a damaged page.

Failures at the OS level (disk full, read-only store, I/O error) remove the temporary file
and raise :class:`~storage.errors.StoreWriteError` naming the shard, the cause and the fix.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import StoreError, describe_os_error
from storage.fs import LocalFS, tmp_name

PARQUET_DEFAULTS: dict[str, Any] = {
    "compression": "zstd",
    "compression_level": 3,
    "use_dictionary": False,
    "write_statistics": False,
    "version": "2.6",
    "data_page_version": "1.0",
    "write_page_checksum": True,
}
DEFAULT_ROW_GROUP_ROWS = 8192
PROGRESS_DIR = "_progress"
#: Training checkpoints a stage keeps inside its artifact until the artifact has committed.
CHECKPOINTS_DIR = "checkpoints"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$")


def check_name(name: str, what: str = "shard name") -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith(".parquet") \
            or ".tmp-" in name:
        raise StoreError(f"{what} {name!r} is not allowed: use letters, digits, '_', '-', '.', "
                         "'=' (no slashes, no '.parquet' suffix), e.g. 'part-00000'")
    return name


def kind_of(name: str) -> str:
    """The default kind of a shard: its name without a trailing number ('teacher-00003' -> 'teacher')."""
    return re.sub(r"[-_.]?\d+$", "", name) or name


@dataclass
class ShardRecord:
    """What the manifest says of one shard."""

    name: str
    kind: str
    rows: int
    bytes: int
    sha256: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return self.name + ".parquet"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not out["info"]:
            del out["info"]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardRecord":
        return cls(name=d["name"], kind=d.get("kind") or kind_of(d["name"]), rows=int(d["rows"]),
                   bytes=int(d["bytes"]), sha256=d["sha256"], info=dict(d.get("info") or {}))


@dataclass
class FileRecord:
    """What the manifest says of one side file (path relative to the artifact folder)."""

    path: str
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FileRecord":
        return cls(path=d["path"], bytes=int(d["bytes"]), sha256=d["sha256"])


def schema_description(schema: pa.Schema) -> dict[str, Any]:
    """An Arrow schema as JSON: its string form and one entry per field."""
    return {
        "string": schema.to_string(show_schema_metadata=False),
        "fields": [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema],
    }


def as_table(data: pa.Table | pa.RecordBatch | Iterable[pa.RecordBatch],
             schema: pa.Schema | None = None) -> pa.Table:
    """A table from a table, a batch or an iterable of batches (cast to ``schema`` if given)."""
    if isinstance(data, pa.RecordBatch):
        table = pa.Table.from_batches([data])
    elif isinstance(data, pa.Table):
        table = data
    else:
        batches = list(data)
        if not batches and schema is None:
            raise StoreError("cannot write an empty list of batches without a schema")
        table = pa.Table.from_batches(batches, schema=schema)
    if schema is not None and not table.schema.equals(schema):
        table = table.cast(schema)
    return table


class ShardWriter:
    """Writes one shard under its temporary name; ``commit()`` renames it into place.

    Use as a context manager: a clean exit commits, an exception removes the temporary file.
    Each :meth:`write` call appends row groups (``row_group_size`` rows each).
    """

    def __init__(self, fs: LocalFS, artifact_dir: str, name: str, schema: pa.Schema,
                 kind: str | None = None, options: dict[str, Any] | None = None,
                 on_commit=None) -> None:
        self.fs = fs
        self.name = check_name(name)
        self.kind = kind or kind_of(name)
        self.schema = schema
        self.final_path = fs.join(artifact_dir, name + ".parquet")
        self.tmp_path = tmp_name(self.final_path)
        self.progress_dir = fs.join(artifact_dir, PROGRESS_DIR)
        self.progress_path = fs.join(self.progress_dir, name + ".json")
        self.info: dict[str, Any] = {}
        self.rows = 0
        self._on_commit = on_commit
        opts = {**PARQUET_DEFAULTS, **(options or {})}
        if str(opts.get("compression")).lower() in ("none", "uncompressed") \
                and "compression_level" not in (options or {}):
            opts.pop("compression_level", None)
        self._file = None
        self.closed = False
        try:
            if fs.is_local:
                self._writer = pq.ParquetWriter(self.tmp_path, schema, **opts)
            else:
                self._file = fs.open(self.tmp_path, "wb")
                self._writer = pq.ParquetWriter(self._file, schema, **opts)
        except OSError as e:
            self.closed = True
            raise self._failed(e) from e

    def _failed(self, e: OSError) -> StoreError:
        """Remove the temporary file; the error to raise for ``e``."""
        self.abort()
        return describe_os_error(e, f"shard {self.name!r}", self.fs.url(self.tmp_path),
                                 after="its temporary file is removed; the shards finished "
                                       "before it are kept, and a rerun resumes from them")

    def write(self, data: pa.Table | pa.RecordBatch | Iterable[pa.RecordBatch],
              row_group_size: int | None = DEFAULT_ROW_GROUP_ROWS) -> None:
        table = as_table(data, self.schema)
        if table.num_rows == 0:
            return
        try:
            self._writer.write_table(table, row_group_size=row_group_size or table.num_rows)
        except OSError as e:
            raise self._failed(e) from e
        self.rows += table.num_rows

    def _close_file(self) -> None:
        if not self.closed:
            self.closed = True
            self._writer.close()
            if self._file is not None:
                self._file.close()

    def commit(self) -> ShardRecord:
        """Close, hash, journal the record under ``_progress/``, rename into place; returns
        the shard's record. The journal entry is what a resumed writer trusts: a shard on
        disk without one, or whose bytes no longer hash to it, is not adopted."""
        try:
            self._close_file()
            record = ShardRecord(name=self.name, kind=self.kind, rows=self.rows,
                                 bytes=self.fs.size(self.tmp_path),
                                 sha256=self.fs.sha256(self.tmp_path), info=dict(self.info))
            self.fs.makedirs(self.progress_dir)
            self.fs.write_atomic(self.progress_path, json.dumps(record.to_dict()).encode("utf-8"))
            self.fs.replace(self.tmp_path, self.final_path)
        except OSError as e:
            raise self._failed(e) from e
        if self._on_commit is not None:
            self._on_commit(record)
        return record

    def abort(self) -> None:
        try:
            self._close_file()
        except Exception:  # noqa: BLE001 - the writer may be in any state after an error
            pass
        try:
            self.fs.remove(self.tmp_path)
        except OSError:
            pass

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
