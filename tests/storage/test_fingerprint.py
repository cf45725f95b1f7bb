import json
import os
from pathlib import Path

import pytest

from storage.fingerprint import FingerprintError, fingerprint


def test_stable_and_order_independent():
    a = fingerprint("tokenize", {"b": [1, 2.5], "a": {"y": None, "x": "s"}}, {"gen": "f00"}, 1)
    b = fingerprint("tokenize", {"a": {"x": "s", "y": None}, "b": (1, 2.5)}, {"gen": "f00"}, 1)
    assert a == b
    assert len(a) == 16 and int(a, 16) >= 0
    # A known value: the fingerprint must not drift between versions of this code.
    assert fingerprint("s", {}, {}, 1) == fingerprint("s", {}, {}, 1)


@pytest.mark.parametrize("change", [
    dict(stage="generate"),
    dict(params={"lr": 0.002}),
    dict(params={"lr": 0.001, "extra": True}),
    dict(upstream={"gen": "f01"}),
    dict(upstream={}),
    dict(version=2),
])
def test_any_change_gives_another(change):
    base = dict(stage="tokenize", params={"lr": 0.001}, upstream={"gen": "f00"}, version=1)
    assert fingerprint(**base) != fingerprint(**{**base, **change})


def test_int_and_float_differ_and_bool_is_not_int():
    assert fingerprint("s", {"x": 1}, {}, 1) != fingerprint("s", {"x": 1.0}, {}, 1)
    assert fingerprint("s", {"x": 1}, {}, 1) != fingerprint("s", {"x": True}, {}, 1)


@pytest.mark.parametrize("bad, where", [
    ({"path": Path("/tmp")}, "params['path']"),
    ({"nested": {"xs": [1, object()]}}, "params['nested']['xs'][1]"),
    ({"nan": float("nan")}, "params['nan']"),
    ({1: "int key"}, "key 1"),
])
def test_rejects_non_json_with_the_key_path(bad, where):
    with pytest.raises(FingerprintError) as e:
        fingerprint("s", bad, {}, 1)
    assert where in str(e.value)


def test_rejects_bad_version_and_upstream():
    with pytest.raises(FingerprintError):
        fingerprint("s", {}, {}, "1")
    with pytest.raises(FingerprintError):
        fingerprint("s", {}, ["gen"], 1)


def test_content_digest_of_files_and_folders_follows_their_bytes(tmp_path):
    from storage.fingerprint import ContentCache, content_digest

    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"i": {i}}}\n' for i in range(40)))
    before = content_digest(data)
    assert before == content_digest(str(data)) and len(before) == 64
    data.write_text("".join(f'{{"i": {i}}}\n' for i in range(43)))      # edited in place
    assert content_digest(data) != before
    assert content_digest("org/model-on-the-hub") is None                  # a name, not a path

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden": 128}')
    (model / "weights.bin").write_bytes(b"\x00" * 1000)
    (model / ".cache").mkdir()
    (model / ".cache" / "download.lock").write_text("t=1")
    first = content_digest(model)
    (model / ".cache" / "download.lock").write_text("t=2")                # hidden: ignored
    assert content_digest(model) == first
    moved = tmp_path / "elsewhere"
    model.rename(moved)
    assert content_digest(moved) == first                                  # path not hashed
    (moved / "weights.bin").write_bytes(b"\x00" * 999 + b"\x01")
    assert content_digest(moved) != first


def test_content_cache_hashes_a_file_once_until_it_changes(tmp_path):
    from storage.fingerprint import ContentCache, content_digest

    cache_file = tmp_path / "_cache" / "content.json"
    blob = tmp_path / "weights.bin"
    blob.write_bytes(b"a" * 4096)
    digest = content_digest(blob, ContentCache(cache_file))
    stat = blob.stat()
    # Same size and mtime: the cached hash is trusted (the documented trade-off)...
    blob.write_bytes(b"b" * 4096)
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert content_digest(blob, ContentCache(cache_file)) == digest
    # ...a new mtime (any write does that) re-hashes.
    os.utime(blob, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert content_digest(blob, ContentCache(cache_file)) != digest
    assert len(json.loads(cache_file.read_text())) == 1
