import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from storage.inspect import add_subcommands, find_tokenizer_dir
from storage.schemas import PARQUET_OPTIONS, tokenized_table
from storage.teacher_cache import TeacherCacheWriter
from tests.storage.conftest import add_row, cache_row, rationale_table, student_table

REPO = Path(__file__).resolve().parents[2]


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture
def filled(store):
    with store.writer("generate", "gen1", params={"n": 4}) as w:
        w.write_shard("rationales-00000", rationale_table(4), **PARQUET_OPTIONS["rationales"])
        w.info["kept"] = 2
    with store.writer("tokenize", "tok1", params={}, upstream={"generate": "gen1"}) as w:
        w.write_shard("student-00000", student_table(3), **PARQUET_OPTIONS["tokenized"])
    rows = [cache_row(i, "cot", torch.bfloat16, topk=2) for i in range(3)]
    with store.writer("cache_teacher", "cache1", params={}) as w:
        with TeacherCacheWriter(w, "cache-00000") as cache:
            for r in rows:
                add_row(cache, r)
    store.record_run("demo", {"generate": "gen1", "tokenize": "tok1"})
    return store, rows


def test_inspect_rationales_and_tokenized(filled, capsys):
    store, _ = filled
    assert run_cli("inspect", str(store.path("generate", "gen1")), "--rows", "2") == 0
    out = capsys.readouterr().out
    assert "generate/gen1  (complete)" in out and "rationale: string not null" in out
    assert "4 rows" in out and "2 + 1 is 3" not in out and "1 plus 1 is 2" in out
    assert '"kept": 2' in out
    assert run_cli("inspect", str(store.path("tokenize", "tok1"))) == 0
    out = capsys.readouterr().out
    assert "tokenized" in out and "resp" in out and "'prompt 0 -> answer standard'" in out
    assert "103" in out          # ids shown (no tokenizer named by the params)


def test_inspect_teacher_cache_json_stats(filled, capsys):
    store, rows = filled
    assert run_cli("inspect", str(store.path("cache_teacher", "cache1")), "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "complete" and summary["rows"] == 3
    kind = summary["kinds"]["cache"]
    assert kind["table"] == "teacher_cache" and len(kind["samples"]) == 3
    sample = kind["samples"][1]
    assert sample["dtype"] == "bfloat16" and sample["layers"] == [-2, -1] and sample["topk"] == 2
    h = rows[1]["hidden"].float()
    for li, stats in enumerate(sample["layer_stats"]):
        assert stats["mean"] == pytest.approx(float(h[li].mean()), rel=1e-5)
        assert stats["max"] == pytest.approx(float(h[li].max()))
        assert stats["norm"] == pytest.approx(float(h[li].norm(dim=-1).mean()), rel=1e-5)
    assert run_cli("inspect", str(store.path("cache_teacher", "cache1"))) == 0
    assert "norm" in capsys.readouterr().out


def test_inspect_tokenized_with_a_real_tokenizer(store, shared_tokenizer_dir, capsys):
    from transformers import AutoTokenizer

    tdir = shared_tokenizer_dir("gpt2-base")
    tok = AutoTokenizer.from_pretrained(tdir)
    text = "Question: 2 + 3?\nAnswer: 5"
    enc = tok(text, return_offsets_mapping=True)
    n = len(enc["input_ids"])
    row = {"id": "a", "form": "standard", "text": text, "input_ids": enc["input_ids"],
           "response_mask": [0] * (n - 2) + [1, 1],
           "offsets_start": [s for s, _ in enc["offset_mapping"]],
           "offsets_end": [e for _, e in enc["offset_mapping"]], "prompt_tokens": n - 2}
    with store.writer("tokenize", "real", params={"student": {"tokenizer": str(tdir)}}) as w:
        w.write_shard("student-00000", tokenized_table([row], "student"))
    assert find_tokenizer_dir({"student": {"tokenizer": str(tdir)}}, "student") == str(tdir)
    assert run_cli("inspect", str(store.path("tokenize", "real"))) == 0
    out = capsys.readouterr().out
    assert "'Question'" in out and "'Ġ5'" in out and "' 5'" in out


def test_inspect_store_root_and_ls_gc(filled, capsys):
    store, _ = filled
    assert run_cli("inspect", store.root) == 0
    out = capsys.readouterr().out
    assert "gen1" in out and "cache1" in out and "demo" in out
    assert run_cli("ls", store.root) == 0
    out = capsys.readouterr().out
    assert "fingerprint" in out and "tok1" in out and "complete" in out
    assert run_cli("ls", store.root, "--garbage", "--json") == 0
    assert [e["fingerprint"] for e in json.loads(capsys.readouterr().out)] == ["cache1"]
    assert run_cli("gc", store.root) == 0
    assert "--yes" in capsys.readouterr().out
    assert store.get("cache_teacher", "cache1") is not None
    assert run_cli("gc", store.root, "--yes") == 0
    assert "removed 1" in capsys.readouterr().out
    assert store.get("cache_teacher", "cache1") is None
    assert store.get("generate", "gen1") is not None


def test_verify_handler(filled, capsys):
    store, _ = filled
    path = store.path("tokenize", "tok1")
    assert run_cli("verify", str(path)) == 0
    assert run_cli("verify", store.root) == 0
    shard = path / "student-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert run_cli("verify", str(path)) == 1
    captured = capsys.readouterr()
    assert "student-00000" in captured.out and "FAILED" in captured.err
    assert run_cli("verify", store.root) == 1


def test_module_entry_point(filled):
    store, _ = filled
    path = store.path("generate", "gen1")
    ok = subprocess.run([sys.executable, "-m", "storage.inspect", "verify", str(path)],
                        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    (path / "rationales-00000.parquet").unlink()
    bad = subprocess.run([sys.executable, "-m", "storage.inspect", "verify", str(path)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "rationales-00000: missing" in bad.stdout


def test_inspect_json_keeps_numbers_as_numbers(store, capsys):
    """Generic tables (metrics, generations...) sampled in --json: numbers stay numbers, NaN
    becomes null (JSON has no NaN), text stays text."""
    import pyarrow as pa

    table = pa.table({"model": ["a", "b"], "mean": [71.5, float("nan")], "n_seeds": [3, 1],
                      "ok": [True, False], "reference": ["11", "7"]})
    with store.writer("evaluate", "ev1", params={}) as w:
        w.write_shard("metrics", table, kind="metrics")
    assert run_cli("inspect", str(store.path("evaluate", "ev1")), "--json", "--rows", "2") == 0
    samples = json.loads(capsys.readouterr().out)["kinds"]["metrics"]["samples"]
    assert samples[0] == {"model": "a", "mean": 71.5, "n_seeds": 3, "ok": True,
                          "reference": "11"}
    assert samples[1]["mean"] is None
