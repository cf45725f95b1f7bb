"""What trusting a reused artifact costs, on demo-sized artifacts, side by side.

    .venv/bin/python benchmarks/trust_checks.py [--repeats N] [--out PATH] [--tmp DIR]

Builds, in a temporary store, artifacts shaped like the demo's (``configs/demo.yaml``):
``tokenize`` with 8 shards (4 per side, 7,430 rows in all, about 0.2 MB) and ``cache_teacher``
with 4 shards (3,716 rows, float16 hidden states [2 layers, 24 tokens, 64], about 23 MB, plus
its embedding side file), then measures (best of ``--repeats``, warm page cache):

- the quick check a stage runs before every reuse (``ArtifactStore.check``: sizes, footers,
  rows, manifest digest, upstream digests) against a full ``verify`` (every file re-hashed);
- ``Artifact.read_kind`` (each shard hashed as it is read) against plain
  ``pyarrow.parquet.read_table`` of the same files;
- a full pass of ``TeacherCacheReader`` with page CRCs checked against the same pass with
  the check off (the random-access path, which cannot hash whole files);
- ``content_digest`` of the cache folder, cold (hashing) against warm (the
  ``(path, size, mtime_ns)`` cache).

Results also go to JSON (``--out``, default benchmarks/results/trust_checks.json).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.fingerprint import ContentCache, content_digest  # noqa: E402
from storage.fs import LocalFS  # noqa: E402
from storage.schemas import PARQUET_OPTIONS, tokenized_table  # noqa: E402
from storage.store import ArtifactStore  # noqa: E402
from storage.teacher_cache import TeacherCacheReader, TeacherCacheWriter  # noqa: E402
from storage.teacher_embeddings import save_teacher_embeddings  # noqa: E402

TOKENIZE_ROWS, CACHE_ROWS = 7430, 3716


def tokenized_rows(n: int, side: str) -> list[dict]:
    rows = []
    for i in range(n):
        k = 24 + i % 16
        text = f"Question {i}: what is {i} + {i % 7}? " * 2
        rows.append({"id": f"ex{i // 2:05d}", "form": ("standard", "cot")[i % 2], "text": text,
                     "input_ids": list(range(i, i + k)), "response_mask": [0] * 8 + [1] * (k - 8),
                     "offsets_start": list(range(k)), "offsets_end": list(range(1, k + 1)),
                     "prompt_tokens": 8})
    return rows


def build(store: ArtifactStore) -> None:
    with store.writer("tokenize", "tok", params={}) as w:
        for side in ("student", "teacher"):
            rows = tokenized_rows(TOKENIZE_ROWS // 2, side)
            for s in range(4):
                part = rows[s::4]
                w.write_shard(f"{side}-{s:05d}", tokenized_table(part, side),
                              **PARQUET_OPTIONS["tokenized"])
    g = torch.Generator().manual_seed(0)
    with store.writer("cache_teacher", "cache", params={}, upstream={"tokenize": "tok"}) as w:
        for s in range(4):
            with TeacherCacheWriter(w, f"cache-{s:05d}") as cache:
                for i in range(s, CACHE_ROWS, 4):
                    n = 24
                    cache.add(f"ex{i // 2:05d}", ("standard", "cot")[i % 2],
                              torch.randn(2, n, 64, generator=g).half(), layers=[-2, -1],
                              input_ids=list(range(n + 8)), positions=list(range(7, 7 + n)),
                              target_ids=list(range(n)))
        save_teacher_embeddings(w, torch.randn(512, 64, generator=g))


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cache_pass(art, crc: bool) -> None:
    """Every row of the cache once, with page CRC checks on or off."""
    def open_file(self, path):
        return pq.ParquetFile(path, memory_map=True, page_checksum_verification=crc)

    original = LocalFS.parquet_file
    LocalFS.parquet_file = open_file
    try:
        for _ in TeacherCacheReader(art):
            pass
    finally:
        LocalFS.parquet_file = original


def measure(store: ArtifactStore, repeats: int) -> dict:
    tok, cache = store.get("tokenize", "tok"), store.get("cache_teacher", "cache")
    paths = [str(tok.shard_path(s.name)) for s in tok.shards_of("student")]
    out = {}
    for stage, fp in (("tokenize", "tok"), ("cache_teacher", "cache")):
        quick = best_of(repeats, lambda: store.check(stage, fp))
        full = best_of(repeats, lambda: store.check(stage, fp, full=True))
        out[f"{stage}: quick check vs full verify"] = {"a_ms": quick * 1e3, "b_ms": full * 1e3}
    hashed = best_of(repeats, lambda: tok.read_kind("student"))
    plain = best_of(repeats, lambda: pa.concat_tables([pq.read_table(p) for p in paths]))
    out["tokenize: read_kind hashed vs plain read_table"] = {"a_ms": hashed * 1e3,
                                                            "b_ms": plain * 1e3}
    with_crc = best_of(repeats, lambda: cache_pass(cache, True))
    without = best_of(repeats, lambda: cache_pass(cache, False))
    out["cache_teacher: reader pass with page CRCs vs without"] = {"a_ms": with_crc * 1e3,
                                                                  "b_ms": without * 1e3}
    cache_file = Path(store.root) / "_cache" / "bench.json"
    cold = best_of(1, lambda: content_digest(cache.path, ContentCache(cache_file)))
    warm = best_of(repeats, lambda: content_digest(cache.path, ContentCache(cache_file)))
    out["cache folder: content_digest warm (cached) vs cold (hashed)"] = {"a_ms": warm * 1e3,
                                                                         "b_ms": cold * 1e3}
    for row in out.values():
        row["a/b"] = row["a_ms"] / row["b_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "trust_checks.json"))
    parser.add_argument("--tmp", default=None, help="folder for the temporary store")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        store = ArtifactStore(Path(tmp) / "store")
        build(store)
        sizes = {e.stage: e.bytes for e in store.list_artifacts()}
        results = measure(store, args.repeats)
    print(f"artifact bytes: {sizes}")
    print(f"{'comparison (a vs b)':<62}{'a ms':>10}{'b ms':>10}{'a/b':>8}")
    for name, row in results.items():
        print(f"{name:<62}{row['a_ms']:>10.2f}{row['b_ms']:>10.2f}{row['a/b']:>8.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": platform.platform(), "sizes": sizes,
                                          "repeats": args.repeats, "results": results},
                                         indent=2))


if __name__ == "__main__":
    main()
