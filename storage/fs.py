"""The few file operations the store needs, on a local folder or an fsspec filesystem.

Local paths use plain ``os`` calls: a file written under a temporary name and renamed with
``os.replace`` is either absent or whole, even if the process is killed. fsspec URLs
(``s3://``, ``gs://``, ``memory://``) go through fsspec: on object stores a rename is a copy
and an exclusive create is check-then-write, so the guarantees there are best effort; the
manifest, written last, stays the commit point either way.

Paths inside this module are plain strings: absolute OS paths for :class:`LocalFS`, the
protocol-less paths fsspec uses for :class:`FsspecFS` (``url`` gives the display form).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from typing import IO

import pyarrow as pa
import pyarrow.parquet as pq

CHUNK = 8 << 20


def tmp_name(path: str) -> str:
    """The temporary name a file is written under before its rename: ``<path>.tmp-<pid>``."""
    return f"{path}.tmp-{os.getpid()}"


def is_tmp_name(name: str) -> bool:
    return ".tmp-" in name


class LocalFS:
    """A local folder: ``os`` calls, atomic ``os.replace``, memory-mapped Parquet reads."""

    is_local = True

    def join(self, base: str, *parts: str) -> str:
        return os.path.join(base, *parts)

    def url(self, path: str) -> str:
        return path

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def isfile(self, path: str) -> bool:
        return os.path.isfile(path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def open(self, path: str, mode: str = "rb") -> IO:
        return open(path, mode)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def remove(self, path: str) -> None:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass

    def rmtree(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def files_under(self, path: str) -> list[str]:
        """Every regular file below ``path``, as sorted relative POSIX paths."""
        out = []
        for dirpath, _, names in os.walk(path):
            for name in names:
                full = os.path.join(dirpath, name)
                out.append(os.path.relpath(full, path).replace(os.sep, "/"))
        return sorted(out)

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    def mtime(self, path: str) -> float:
        return os.path.getmtime(path)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create ``path`` holding ``data`` only if it does not exist (O_EXCL); False if it does."""
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return True

    def parquet_file(self, path: str) -> pq.ParquetFile:
        """The file opened for reading, memory-mapped; pages written with CRCs (see
        :data:`storage.shards.PARQUET_DEFAULTS`) are checked as they are decoded."""
        return pq.ParquetFile(path, memory_map=True, page_checksum_verification=True)

    def read_buffer(self, path: str) -> pa.Buffer:
        """The whole file as an Arrow buffer (memory-mapped, so it is read, not copied)."""
        with pa.memory_map(path) as source:
            return source.read_buffer()

    # Shared helpers -------------------------------------------------------------------
    def read_bytes(self, path: str) -> bytes:
        with self.open(path, "rb") as f:
            return f.read()

    def write_atomic(self, path: str, data: bytes) -> None:
        """Write ``data`` under a temporary name, then rename it into place. On any error
        the temporary file is removed before the error propagates (a full disk stays no
        fuller than it was)."""
        tmp = tmp_name(path)
        try:
            with self.open(tmp, "wb") as f:
                f.write(data)
            self.replace(tmp, path)
        except BaseException:
            try:
                self.remove(tmp)
            except OSError:
                pass
            raise

    def sha256(self, path: str) -> str:
        h = hashlib.sha256()
        with self.open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return h.hexdigest()


class FsspecFS(LocalFS):
    """Any fsspec filesystem (object stores, ``memory://`` in tests)."""

    is_local = False

    def __init__(self, fs) -> None:
        self.fs = fs

    def join(self, base: str, *parts: str) -> str:
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])

    def url(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def isdir(self, path: str) -> bool:
        return self.fs.isdir(path)

    def isfile(self, path: str) -> bool:
        return self.fs.isfile(path)

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def open(self, path: str, mode: str = "rb") -> IO:
        return self.fs.open(path, mode)

    def replace(self, src: str, dst: str) -> None:
        if self.fs.exists(dst):
            self.fs.rm(dst, recursive=self.fs.isdir(dst))
        self.fs.mv(src, dst, recursive=self.fs.isdir(src))

    def remove(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path)

    def rmtree(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def listdir(self, path: str) -> list[str]:
        if not self.fs.isdir(path):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))

    def files_under(self, path: str) -> list[str]:
        base = path.rstrip("/") + "/"
        return sorted(p[len(base):] for p in self.fs.find(path) if p.startswith(base))

    def size(self, path: str) -> int:
        return int(self.fs.info(path)["size"])

    def mtime(self, path: str) -> float:
        info = self.fs.info(path)
        for key in ("mtime", "LastModified", "created", "updated"):
            value = info.get(key)
            if value is None:
                continue
            if hasattr(value, "timestamp"):
                return float(value.timestamp())
            try:
                return float(value)
            except (TypeError, ValueError):
                continue
        return time.time()

    def create_exclusive(self, path: str, data: bytes) -> bool:
        # Best effort: object stores have no portable O_EXCL.
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError):
            if self.fs.exists(path):
                return False
            with self.fs.open(path, "wb") as f:
                f.write(data)
            return True

    def parquet_file(self, path: str) -> pq.ParquetFile:
        return pq.ParquetFile(self.fs.open(path, "rb"), page_checksum_verification=True)

    def read_buffer(self, path: str) -> pa.Buffer:
        return pa.py_buffer(self.read_bytes(path))


def filesystem_for(location: str | os.PathLike) -> tuple[LocalFS, str]:
    """The filesystem and internal path of a local path or an fsspec URL."""
    location = os.fspath(location)
    if "://" in location and not location.startswith("file://"):
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        return FsspecFS(fs), path.rstrip("/") or "/"
    if location.startswith("file://"):
        location = location[len("file://"):]
    return LocalFS(), os.path.abspath(location)
