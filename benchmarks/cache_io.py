"""Teacher-cache I/O: our Parquet blob layout against raw files and a nested-list layout.

    .venv/bin/python benchmarks/cache_io.py [--quick] [--out PATH] [--tmp DIR]

For float16 and bfloat16 rows of a realistic shape (default 2 layers x 256 tokens x 2048,
2 MiB a row, 128 rows = 256 MiB per dtype; ``--quick``: 2 x 128 x 1024, 32 rows) it measures:

- raw: the same tensor bytes written with numpy ``tofile`` to one file and read back with
  ``fromfile`` into torch tensors: the floor;
- blob: :class:`storage.teacher_cache.TeacherCacheWriter` into an artifact (manifest and
  sha256 included) and :class:`TeacherCacheReader` streaming every row, then random access
  by (id, form) in a shuffled order;
- nested (float16 only: Arrow has no bfloat16): ``hidden`` as ``list<fixed_size_list<
  float16>>``, written with the same options and read back to torch tensors.

Reported: throughput in MiB/s of tensor bytes, time as a multiple of raw ("x raw"), file
size over the raw bytes. Reads run on a warm page cache (the files were just written):
they measure decoding, not the disk. Results also go to JSON (default
benchmarks/results/cache_io.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.shards import PARQUET_DEFAULTS  # noqa: E402
from storage.store import ArtifactStore  # noqa: E402
from storage.teacher_cache import TeacherCacheReader, TeacherCacheWriter  # noqa: E402

MiB = 1 << 20


def make_rows(n_rows: int, n_layers: int, n_tokens: int, width: int, dtype: torch.dtype):
    """``n_rows`` rows cycling through a small pool of random tensors (bytes are bytes)."""
    g = torch.Generator().manual_seed(0)
    pool = [torch.randn(n_layers, n_tokens, width, generator=g).to(dtype) for _ in range(8)]
    seq = n_tokens + 64
    for i in range(n_rows):
        yield {"id": f"ex{i // 2:05d}", "form": ("standard", "cot")[i % 2],
               "hidden": pool[i % len(pool)], "layers": list(range(-n_layers, 0)),
               "input_ids": np.arange(seq, dtype=np.int32),
               "positions": np.arange(63, 63 + n_tokens, dtype=np.int32),
               "target_ids": np.arange(64, 64 + n_tokens, dtype=np.int32)}


def best_of(repeats: int, fn):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def bench_raw(rows, workdir: Path, repeats: int) -> dict:
    path = workdir / "raw.bin"
    shapes = [(r["hidden"].shape, r["hidden"].dtype) for r in rows]

    def write():
        with open(path, "wb") as f:
            for r in rows:
                h = r["hidden"]
                h.view(torch.int16 if h.element_size() == 2 else torch.int32).numpy().tofile(f)

    def read():
        out = []
        with open(path, "rb") as f:
            for shape, dtype in shapes:
                n = int(np.prod(shape))
                arr = np.fromfile(f, dtype=np.int16, count=n)
                out.append(torch.from_numpy(arr).view(dtype).view(shape))
        return out

    tw, _ = best_of(repeats, write)
    tr, back = best_of(repeats, read)
    assert torch.equal(back[-1].view(torch.int16), rows[-1]["hidden"].view(torch.int16))
    return {"write_s": tw, "read_s": tr, "file_bytes": path.stat().st_size}


def bench_blob(rows, workdir: Path, repeats: int, row_group_bytes: int) -> dict:
    root = workdir / "store"

    def write():
        shutil.rmtree(root, ignore_errors=True)
        store = ArtifactStore(root)
        with store.writer("cache_teacher", "bench", params={}) as w:
            with TeacherCacheWriter(w, "cache-00000", row_group_bytes=row_group_bytes) as c:
                for r in rows:
                    c.add(r["id"], r["form"], r["hidden"], layers=r["layers"],
                          input_ids=r["input_ids"], positions=r["positions"],
                          target_ids=r["target_ids"])
        return store.get("cache_teacher", "bench")

    tw, art = best_of(repeats, write)
    shard = art.fs.join(art.dir, "cache-00000.parquet")
    t_hash, _ = best_of(1, lambda: art.fs.sha256(shard))

    def stream():
        return [row.hidden for row in TeacherCacheReader(art)]

    tr, back = best_of(repeats, stream)
    assert torch.equal(back[-1].view(torch.int16), rows[-1]["hidden"].view(torch.int16))
    del back
    keys = [(r["id"], r["form"]) for r in rows]
    random.Random(0).shuffle(keys)
    data_bytes = sum(r["hidden"].nbytes for r in rows)

    def random_access():
        # A cache a quarter of the data: most gets decode their row group anew.
        reader = TeacherCacheReader(art, cache_bytes=data_bytes // 4)
        return [reader.get(*k).hidden for k in keys]

    trand, _ = best_of(1, random_access)
    return {"write_s": tw, "read_s": tr, "random_read_s": trand, "sha256_s": t_hash,
            "file_bytes": art.shards[0].bytes,
            "row_groups": art.parquet_file("cache-00000").metadata.num_row_groups}


def bench_nested(rows, workdir: Path, repeats: int) -> dict:
    path = workdir / "nested.parquet"
    opts = {**PARQUET_DEFAULTS, "compression": "none"}
    opts.pop("compression_level")

    def write():
        hidden = []
        for r in rows:
            h = r["hidden"]
            n_layers, n_tokens, width = h.shape
            values = pa.array(h.reshape(-1).numpy(), type=pa.float16())
            fsl = pa.FixedSizeListArray.from_arrays(values, width)
            hidden.append(pa.ListArray.from_arrays(
                pa.array([0, n_layers * n_tokens], pa.int32()), fsl))
        col = pa.chunked_array(hidden)
        table = pa.table({"id": [r["id"] for r in rows], "form": [r["form"] for r in rows],
                          "hidden": col})
        pq.write_table(table, path, row_group_size=max(1, 64 * MiB // rows[0]["hidden"].nbytes),
                       **opts)

    def read():
        table = pq.read_table(path)
        out = []
        for i, r in enumerate(rows):
            cell = table.column("hidden").slice(i, 1).combine_chunks()
            flat = cell.values.values.to_numpy(zero_copy_only=False)
            out.append(torch.from_numpy(flat).view(r["hidden"].shape))
        return out

    tw, _ = best_of(repeats, write)
    tr, back = best_of(repeats, read)
    assert torch.equal(back[-1], rows[-1]["hidden"])
    return {"write_s": tw, "read_s": tr, "file_bytes": path.stat().st_size}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small rows, a few seconds")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cache_io.json"))
    parser.add_argument("--tmp", default=None, help="scratch folder (default: system temp)")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--row-group-mib", type=int, nargs="+", default=[64, 16],
                        help="row-group sizes of the blob layout to compare (MiB)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    shape = (2, 128, 1024) if args.quick else (2, 256, 2048)
    n_rows = args.rows or (32 if args.quick else 128)
    repeats = 2
    workdir = Path(tempfile.mkdtemp(prefix="cache_io-", dir=args.tmp))
    results = {"shape": list(shape), "rows": n_rows, "row_group_mib": args.row_group_mib,
               "machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "pyarrow": pa.__version__, "cpus": os.cpu_count()},
               "cases": []}
    t_start = time.perf_counter()
    try:
        for dtype in (torch.float16, torch.bfloat16):
            rows = list(make_rows(n_rows, *shape, dtype))
            tensor_bytes = sum(r["hidden"].nbytes for r in rows)
            name = str(dtype).replace("torch.", "")
            raw = bench_raw(rows, workdir, repeats)
            cases = [("raw tofile/fromfile", raw)]
            for mib in args.row_group_mib:
                cases.append((f"blob, {mib} MiB groups", bench_blob(rows, workdir, repeats,
                                                                     mib * MiB)))
            if dtype == torch.float16:
                cases.append(("list<fixed_size_list>", bench_nested(rows, workdir, repeats)))
            for layout, r in cases:
                entry = {"layout": layout, "dtype": name, "tensor_bytes": tensor_bytes, **r,
                         "write_mib_s": tensor_bytes / MiB / r["write_s"],
                         "read_mib_s": tensor_bytes / MiB / r["read_s"],
                         "write_x_raw": r["write_s"] / raw["write_s"],
                         "read_x_raw": r["read_s"] / raw["read_s"],
                         "size_overhead": r["file_bytes"] / tensor_bytes - 1}
                if "random_read_s" in r:
                    entry["random_read_mib_s"] = tensor_bytes / MiB / r["random_read_s"]
                results["cases"].append(entry)
            del rows
            shutil.rmtree(workdir / "store", ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = time.perf_counter() - t_start

    print(f"teacher cache I/O: {n_rows} rows of {shape[0]}x{shape[1]}x{shape[2]}, "
          f"{results['cases'][0]['tensor_bytes'] / MiB:.0f} MiB per dtype, warm page cache, "
          f"best of {repeats}")
    header = f"{'layout':<26}{'dtype':<10}{'write MiB/s':>12}{'read MiB/s':>12}" \
             f"{'write x raw':>13}{'read x raw':>12}{'size +%':>9}{'random MiB/s':>14}"
    print(header)
    print("-" * len(header))
    for c in results["cases"]:
        rnd = f"{c['random_read_mib_s']:.0f}" if "random_read_mib_s" in c else "-"
        print(f"{c['layout']:<26}{c['dtype']:<10}{c['write_mib_s']:>12.0f}{c['read_mib_s']:>12.0f}"
              f"{c['write_x_raw']:>13.2f}{c['read_x_raw']:>12.2f}"
              f"{100 * c['size_overhead']:>9.2f}{rnd:>14}")
    for c in results["cases"]:
        if c["layout"].startswith("blob"):
            print(f"  {c['layout']} {c['dtype']}: {c['row_groups']} row groups; the shard's "
                  f"sha256 takes {c['sha256_s']:.2f} s of the {c['write_s']:.2f} s write")
    print(f"total {results['seconds']:.1f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
