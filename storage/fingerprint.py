"""Fingerprints: where a stage's output lives, as a hash of everything that decides it.

    fingerprint = sha256(canonical_json({stage, params, upstream, version}))[:16]

``canonical_json`` sorts keys, drops whitespace and accepts only plain JSON values (dicts with
string keys, lists/tuples, strings, finite numbers, booleans, None), so the same inputs give
the same fingerprint in every process and on every machine, and anything else (a Path, a
torch dtype, a NaN) is refused with the key path that holds it rather than silently hashed by
its ``repr``.

Inputs enter by content: :func:`content_digest` turns a local data file, model or tokenizer
folder into a sha256 of its bytes, so editing one changes the fingerprints that depend on it.
A :class:`ContentCache` remembers each file's hash by ``(path, size, mtime_ns)``: a 10 GB
model folder is hashed once, and again only when a file in it changes size or time.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

FINGERPRINT_CHARS = 16


class FingerprintError(TypeError):
    """A value that cannot be part of a fingerprint (not plain JSON)."""


def _check_json(value: Any, where: str) -> None:
    if value is None or isinstance(value, (bool, str, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FingerprintError(f"{where} is {value!r}: only finite numbers can be fingerprinted")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise FingerprintError(
                    f"{where} has the key {key!r} of type {type(key).__name__}: "
                    "keys must be strings to fingerprint unambiguously")
            _check_json(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    raise FingerprintError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__} ({value!r}), which is "
        "not JSON-serialisable: convert it to a string, number, list or dict of those before "
        "fingerprinting (e.g. str(path), str(dtype))")


def canonical_json(value: Any, where: str = "value") -> str:
    """Sorted-key, compact JSON of plain values; :class:`FingerprintError` for anything else."""
    _check_json(value, where)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def fingerprint(stage: str, params: dict[str, Any], upstream: dict[str, str],
                version: int) -> str:
    """A 16-hex-digit hash of a stage's name, params, upstream fingerprints and format version.

    Same inputs -> same fingerprint; a change in any param, any upstream fingerprint or the
    version -> a different one. Key order of dicts does not matter.
    """
    if not isinstance(stage, str) or not stage:
        raise FingerprintError(f"stage must be a non-empty string, not {stage!r}")
    if not isinstance(version, int) or isinstance(version, bool):
        raise FingerprintError(f"version must be an int, not {version!r}")
    if not isinstance(params, dict):
        raise FingerprintError(f"params must be a dict, not {type(params).__name__}")
    if not isinstance(upstream, dict):
        raise FingerprintError(f"upstream must be a dict of stage -> fingerprint, not "
                               f"{type(upstream).__name__}")
    _check_json(params, "params")
    _check_json(upstream, "upstream")
    blob = canonical_json({"stage": stage, "params": params, "upstream": upstream,
                           "version": version})
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:FINGERPRINT_CHARS]


class ContentCache:
    """``{real path: [size, mtime_ns, sha256]}`` in a small JSON file (``None``: in memory).

    Saved by :meth:`save` (merged with what other processes saved meanwhile); a store that
    cannot be written keeps the cache in memory, silently: it only saves time.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = None if path is None else os.fspath(path)
        self.entries: dict[str, list] = self._load()
        self.changed = False

    def _load(self) -> dict[str, list]:
        if self.path is None:
            return {}
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def file_sha256(self, path: str) -> str:
        """sha256 of the file at ``path``, from the cache when its size and mtime match."""
        real = os.path.realpath(path)
        st = os.stat(real)
        hit = self.entries.get(real)
        if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        h = hashlib.sha256()
        with open(real, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        self.entries[real] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
        self.changed = True
        return h.hexdigest()

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        merged = {**self._load(), **self.entries}
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(merged, f)
            os.replace(tmp, self.path)
            self.changed = False
        except OSError:
            try:
                os.remove(tmp)
            except OSError:
                pass


def _content_files(root: str) -> list[str]:
    """Relative paths of the files under ``root``, sorted; names starting with '.' (``.git``,
    ``.cache``) are skipped at every level."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(p.replace(os.sep, "/") for p in out)


def content_digest(path: str | os.PathLike, cache: ContentCache | None = None) -> str | None:
    """sha256 (hex) of a local file's bytes, or of a folder's files, or None when ``path`` is
    not an existing local path (a hub id such as ``"gpt2"``: it stays a name).

    A folder's digest hashes, for each file (sorted relative path, hidden ones skipped), the
    line ``<relative path>\0<size>\0<sha256>\n``: renaming, adding, removing or editing a
    file changes it; the folder's own path and the files' times do not. ``cache`` (see
    :class:`ContentCache`) spares re-hashing unchanged files; it is saved before returning.
    """
    p = os.path.expanduser(os.fspath(path))
    if not os.path.exists(p):
        return None
    cache = cache if cache is not None else ContentCache(None)
    if os.path.isfile(p):
        digest = cache.file_sha256(p)
    else:
        h = hashlib.sha256()
        for rel in _content_files(p):
            full = os.path.join(p, rel)
            h.update(f"{rel}\0{os.path.getsize(full)}\0{cache.file_sha256(full)}\n".encode())
        digest = h.hexdigest()
    cache.save()
    return digest
