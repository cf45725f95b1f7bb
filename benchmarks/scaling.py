"""Scaling out on Ray, measured side by side in one run, and a projection for the paper's Dolly
setups from the per-token costs measured here.

    .venv/bin/python benchmarks/scaling.py [--quick] [--out PATH]

On the demo's models (a 4-layer Llama teacher, a 2-layer GPT-2 student, both built on the spot)
with ``--rows`` training rows (default 1024; ``--quick`` 256), one local Ray cluster of 2 CPUs
and one Prefect server for the whole run:

1. **A shard stage** (``generate`` with the transformers backend, and ``cache_teacher``; 4 shards
   each), the same shards written three ways: the local engine (this process, one engine for
   all shards), Ray with one shard task at a time (``cluster.num_cpus_per_shard: 2``) and Ray
   with two (``num_cpus_per_shard: 1``). Each Ray way runs twice: the first may start worker
   processes (their imports, a one-off cost per worker, reported as ``cold_seconds``), the
   second is the one reported. Reported: seconds, rows/s, tokens/s, Ray / local (the Ray
   path's overhead on one worker, target <= 1.2x) and that overhead in seconds per shard.
2. **distill** (CoT2Align on DSKD with OT, fixed global batch) on 1 and 2 Ray Train ranks and
   with the local engine: steps/s from the step times the history records (rank 0), and the
   stage's wall time including Ray Train's start. And the same student with SFT alone (alpha
   0), for the objective's cost per token over plain cross-entropy.
3. **Projection** for the paper's Dolly setups (README, "Scaling out"): prompt and response
   token counts of the Dolly split here (``../shared``) with the paper's tokenizers, the
   cache's bytes per token as written here, and the throughput assumptions stated in
   :data:`ASSUMPTIONS`.

The machine's load average is recorded around each measurement: on a shared 2-core machine,
two workers only scale as far as the other tenants leave a core free. Results also go to JSON
(default benchmarks/results/scaling.json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import yaml  # noqa: E402

#: Stated, not measured here (no GPU on this machine): A100-80GB class GPUs, bf16.
ASSUMPTIONS = {
    "gpu_bf16_tflops": 312.0,        # A100 dense bf16 peak
    "mfu_forward": 0.40,             # teacher forward (cache_teacher), long batches
    "mfu_train_7b": 0.35,            # LoRA fine-tuning of a 7B teacher (teacher_sft)
    "mfu_train_1b": 0.30,            # TinyLlama-1.1B LoRA student
    "mfu_train_small": 0.15,         # GPT2-base full fine-tuning (a small model: low MFU)
    "vllm_decode_tok_s_7b": 2000.0,  # vLLM, 7B, batch ~256, 512-token contexts, one GPU
    "rationale_tokens": 256,         # upper bound: the paper's max new tokens per rationale
    "dolly_train_rows": 11435,
    "cached_layers": 1,              # the last layer (the embedding layer is not cached)
    "bytes_per_value": 2,            # bfloat16
}
#: The paper's different-vocabulary pairs: their configs (epochs, shard sizes, students, seeds)
#: and what the configs do not say (sizes; the teacher tokenizer stands in for Mistral's,
#: both 32k SentencePiece vocabularies).
PAIRS = {
    "Mistral-7B -> TinyLLaMA-1.1B (LoRA)": dict(
        config="mistral-7b_to_tinyllama.yaml", teacher_params=7.24e9, teacher_width=4096,
        teacher_tok="tinyllama-1.1b-3T", student_params=1.1e9, student_tok="tinyllama-1.1b-3T",
        student_mfu="mfu_train_1b"),
    "Qwen1.5-1.8B -> GPT2-base (full FT)": dict(
        config="qwen1.5-1.8b_to_gpt2-base.yaml", teacher_params=1.84e9, teacher_width=2048,
        teacher_tok="Qwen1.5-1.8B", student_params=1.24e8, student_tok="gpt2-base",
        student_mfu="mfu_train_small"),
}


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def demo_config(store: Path, rows: int) -> dict:
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg.update(name="scaling", store=str(store))
    cfg["data"]["demo"].update(n_train=rows, n_eval=8)
    cfg["teacher_sft"]["training"].update(steps=40, checkpoint_every=40)
    cfg["generate"].update(backend="hf", shard_size=rows // 4, max_tokens=48,
                           filter_correct=False)
    cfg["tokenize"]["shard_size"] = rows // 2
    cfg["distill"]["training"].update(steps=30, batch_size=32, checkpoint_every=30)
    cfg["distill"]["students"] = {"sft": {"objective": {"alpha": 0.0, "kd_base": "none",
                                                        "ot": None}}}
    return cfg


def run_stage(stage: str, cfg: dict, workdir: Path, overrides: list[str],
              student: str | None = None) -> tuple[float, dict]:
    """One stage in a fresh copy of the base store's upstream artifacts: (seconds, refs)."""
    from flows.pipeline import run_single_stage

    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    refs = run_single_stage(stage, str(config), overrides, only=student)
    return time.perf_counter() - t0, refs


def fresh_store(base: Path, root: Path, stages: tuple[str, ...], cfg: dict) -> dict:
    store = root / "store"
    for stage in stages:
        shutil.copytree(base / stage, store / stage)
    return {**cfg, "store": str(store)}


ENGINES = {"local": [], "ray, 1 worker": ["cluster.engine=ray", "cluster.num_cpus_per_shard=2"],
           "ray, 2 workers": ["cluster.engine=ray", "cluster.num_cpus_per_shard=1"]}


def stage_tokens(ref: dict, stage: str) -> int:
    """Tokens a stage produced or read: the rationales' tokens (teacher tokenizer) for
    generate, the cached positions for cache_teacher."""
    import pyarrow.compute as pc

    from cot2align_core.modeling import load_tokenizer
    from storage.store import open_artifact

    art = open_artifact(ref["path"])
    if stage == "cache_teacher":
        return int(pc.sum(art.read_kind("cache", ["n_tokens"])["n_tokens"]).as_py())
    prepare = next((Path(ref["path"]).parents[1] / "prepare").iterdir())
    tok = load_tokenizer(str(prepare / "tokenizers" / "teacher"))
    texts = art.read_kind("rationales", ["rationale"])["rationale"].to_pylist()
    return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)


def shard_run(stage: str, engine: str, base: Path, cfg: dict, work: Path,
              upstream: tuple[str, ...]) -> dict:
    before = load()
    seconds, refs = run_stage(stage, fresh_store(base, work, upstream, cfg), work, ENGINES[engine])
    ref = refs[stage]
    shards = json.loads((Path(ref["path"]) / "manifest.json").read_text())["shards"]
    n, tokens = sum(s["rows"] for s in shards), stage_tokens(ref, stage)
    row = dict(stage=stage, engine=engine, seconds=round(seconds, 2), shards=len(shards),
               rows=n, rows_per_s=round(n / seconds, 1), tokens=tokens,
               tokens_per_s=round(tokens / seconds, 1), load=f"{before} -> {load()}")
    if stage == "cache_teacher":  # what a cached token costs on disk, everything included
        row["bytes_per_cached_token"] = round(sum(s["bytes"] for s in shards) / tokens, 1)
    return row


def shard_stages(base: Path, cfg: dict, root: Path) -> list[dict]:
    """generate and cache_teacher, each with the local engine, and on 1 and 2 Ray workers
    twice: the first run may start worker processes (``cold``), the second finds them."""
    ups = {"generate": ("prepare", "teacher_sft"),
           "cache_teacher": ("prepare", "teacher_sft", "generate", "tokenize")}
    rows = []
    for stage, upstream in ups.items():
        local = shard_run(stage, "local", base, cfg, root / f"{stage}-local", upstream)
        rows.append(local)
        for engine in ("ray, 1 worker", "ray, 2 workers"):
            tag = engine.replace(" ", "").replace(",", "-")
            cold = shard_run(stage, engine, base, cfg, root / f"{stage}-{tag}-cold", upstream)
            row = shard_run(stage, engine, base, cfg, root / f"{stage}-{tag}", upstream)
            row.update(cold_seconds=cold["seconds"], x_local=round(row["seconds"]
                                                                   / local["seconds"], 2))
            if engine == "ray, 1 worker":  # what the Ray path adds to each shard
                row["overhead_s_per_shard"] = round((row["seconds"] - local["seconds"])
                                                    / row["shards"], 2)
            rows.append(row)
    return rows


def distill_runs(base: Path, cfg: dict, root: Path) -> list[dict]:
    """The main student on the local engine, on 1 and 2 Ray Train ranks; SFT alone locally."""
    import pyarrow.parquet as pq

    upstream = ("prepare", "teacher_sft", "generate", "tokenize", "cache_teacher")
    runs = [("cot2align", "local", []),
            ("cot2align", "ray, 1 rank", ["cluster.engine=ray", "cluster.workers=1"]),
            ("cot2align", "ray, 2 ranks", ["cluster.engine=ray", "cluster.workers=2"]),
            ("sft", "local", [])]
    rows = []
    for student, engine, overrides in runs:
        work = root / f"distill-{student}-{engine.replace(' ', '').replace(',', '-')}"
        before = load()
        seconds, refs = run_stage("distill", fresh_store(base, work, upstream, cfg), work,
                                  overrides, student=student)
        ref = next(iter(refs.values()))
        history = pq.read_table(Path(ref["path"]) / "history.parquet").to_pylist()
        steady = [h["seconds"] for h in history[2:]]  # the first steps warm up
        rows.append(dict(student=student, engine=engine, steps=len(history),
                         stage_seconds=round(seconds, 1),
                         step_seconds=round(sum(steady) / len(steady), 4),
                         steps_per_s=round(len(steady) / sum(steady), 2),
                         load=f"{before} -> {load()}"))
    return rows


def dolly_tokens(shared: Path) -> dict[str, dict[str, float]]:
    """Mean prompt / response tokens per Dolly row (dev split), per tokenizer; the share of
    rows with an input (the paper's CoT form needs one)."""
    from transformers import AutoTokenizer

    from cot2align_core.prompts import cot_prompt

    rows = [json.loads(line) for line in (shared / "data" / "dolly" / "dev.jsonl").open()]
    out = {}
    for name in ("tinyllama-1.1b-3T", "Qwen1.5-1.8B", "gpt2-base"):
        tok = AutoTokenizer.from_pretrained(shared / "tokenizers" / name)

        def mean(texts):
            ids = tok(list(texts), add_special_tokens=False)["input_ids"]
            return sum(map(len, ids)) / len(ids)

        out[name] = {"prompt": mean([r["prompt"] for r in rows]),
                     "cot_prompt": mean([cot_prompt(r) for r in rows]),
                     "response": mean([r["output"] for r in rows])}
    out["with_input"] = {"share": sum(bool(r["input"].strip()) for r in rows) / len(rows)}
    return out


def projection(tokens: dict, distill: list[dict]) -> list[dict]:
    """Per pair: tokens, cache size, GPU-hours and how many GPUs each stage can use."""
    from cot2align_core.config import load_config

    a = ASSUMPTIONS
    flops = a["gpu_bf16_tflops"] * 1e12
    by = {(d["student"], d["engine"]): d for d in distill}
    objective_x = by[("cot2align", "local")]["step_seconds"] / by[("sft", "local")]["step_seconds"]
    n, r = a["dolly_train_rows"], a["rationale_tokens"]
    cot_rows = n * tokens["with_input"]["share"]  # cot_requires_input: the paper's rule
    out = []
    for pair, p in PAIRS.items():
        cfg = load_config(REPO / "configs" / p["config"])
        t, s = tokens[p["teacher_tok"]], tokens[p["student_tok"]]
        lora = lambda side: bool(getattr(cfg, side).lora_rank)  # noqa: E731
        train_flops = lambda params, side: (4 if lora(side) else 6) * params  # noqa: E731
        # teacher_sft: the standard form (Dolly has no gold rationales), its epochs.
        sft_tokens = cfg.teacher_sft.training.epochs * n * (t["prompt"] + t["response"])
        # cache_teacher: the teacher over both forms; the cache keeps response positions.
        fwd_tokens = n * (t["prompt"] + t["response"]) + cot_rows * (t["cot_prompt"] + r
                                                                      + t["response"])
        cached = n * t["response"] + cot_rows * (r + t["response"])
        st = cfg.students()
        epoch_tokens = n * (s["prompt"] + s["response"]) + cot_rows * (s["cot_prompt"] + r
                                                                         + s["response"])
        distill_h = (st[0].training.epochs * epoch_tokens * train_flops(p["student_params"],
                                                                          "student")
                     * objective_x / (flops * a[p["student_mfu"]]) / 3600)
        items = n + cot_rows
        out.append({
            "pair": pair,
            "teacher_sft_gpu_h": round(sft_tokens * train_flops(p["teacher_params"], "teacher")
                                       / (flops * a["mfu_train_7b"]) / 3600, 2),
            "generate_gpu_h": round(cot_rows * r / a["vllm_decode_tok_s_7b"] / 3600
                                    * p["teacher_params"] / 7.24e9, 2),
            "generate_max_gpus": math.ceil(cot_rows / cfg.generate.shard_size),
            "cache_tokens_M": round(cached / 1e6, 2),
            "cache_gb": round(cached * p["teacher_width"] * a["cached_layers"]
                              * a["bytes_per_value"] / 1e9, 1),
            "cache_teacher_gpu_h": round(fwd_tokens * 2 * p["teacher_params"]
                                         / (flops * a["mfu_forward"]) / 3600, 2),
            "cache_teacher_max_gpus": math.ceil(items / cfg.tokenize.shard_size),
            "distill_tokens_M_per_student": round(st[0].training.epochs * epoch_tokens / 1e6, 1),
            "distill_gpu_h_per_student": round(distill_h, 2),
            "distill_instances": len(st) * len(cfg.training_seeds()),
            "distill_max_ranks": st[0].training.batch_size,
            "objective_cost_x_sft": round(objective_x, 2),
        })
    return out


def build_base(root: Path, rows: int) -> tuple[Path, dict]:
    """prepare, teacher_sft, generate, tokenize, cache_teacher with the local engine."""
    cfg = demo_config(root / "base", rows)
    for stage in ("prepare", "teacher_sft", "generate", "tokenize", "cache_teacher"):
        run_stage(stage, cfg, root, [])
    return root / "base", cfg


def warm_workers(base: Path, cfg: dict, root: Path) -> float:
    """A throwaway tokenize on Ray: both workers start and import the project once."""
    work = root / "warm"
    seconds, _ = run_stage("tokenize", fresh_store(base, work, ("prepare", "teacher_sft",
                                                                "generate"), cfg), work,
                           ["cluster.engine=ray", "cluster.num_cpus_per_shard=1"])
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 rows instead of 1024")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scaling.json"))
    args = ap.parse_args()
    rows = args.rows or (256 if args.quick else 1024)
    import ray
    import torch

    torch.set_num_threads(1)
    ray.init(num_cpus=2, object_store_memory=256 << 20, namespace="cot2align",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    root = Path(tempfile.mkdtemp(prefix="cot2align-scaling-"))
    try:
        from prefect import flow

        @flow(name="cot2align-scaling-benchmark")
        def measure() -> dict:
            base, cfg = build_base(root, rows)
            warm = warm_workers(base, cfg, root)
            return {"warm_up_seconds": round(warm, 1),
                    "shard_stages": shard_stages(base, cfg, root),
                    "distill": distill_runs(base, cfg, root)}

        results = measure()
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    shared = Path(os.environ.get("COT2ALIGN_SHARED") or REPO.parent / "shared")
    if (shared / "data" / "dolly" / "dev.jsonl").is_file():
        tokens = dolly_tokens(shared)
        results["dolly_tokens"] = tokens
        results["projection"] = projection(tokens, results["distill"])
    results.update(assumptions=ASSUMPTIONS, rows=rows, cores=os.cpu_count(),
                   cpu=platform.processor() or platform.machine())
    for key in ("shard_stages", "distill", "projection"):
        for r in results.get(key, []):
            print(key, json.dumps(r))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
