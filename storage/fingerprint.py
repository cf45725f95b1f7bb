"""Fingerprints: where a stage's output lives, as a hash of everything that decides it.

    fingerprint = sha256(canonical_json({stage, params, upstream, version}))[:16]

``canonical_json`` sorts keys, drops whitespace and accepts only plain JSON values (dicts with
string keys, lists/tuples, strings, finite numbers, booleans, None), so the same inputs give
the same fingerprint in every process and on every machine, and anything else (a Path, a
torch dtype, a NaN) is refused with the key path that holds it rather than silently hashed by
its ``repr``.
"""
from __future__ import annotations

import hashlib
import json
import math
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
