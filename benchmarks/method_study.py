"""Study: which objective makes the better student? Students of several objectives, several
training seeds, scored by exact match on held-out rows in both forms.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/method_study.py configs/demo.yaml \\
        --variants sft dskd cot2align --seeds 0 1 2 --split dev [--set key=value ...]

It reads the prepare, tokenize and cache_teacher artifacts of the config (run
``cot2align run CONFIG`` or its stages up to cache_teacher first; the ``--set`` overrides must
be the ones those artifacts were made with), then for each (variant, training seed) trains a
student with ``cot2align_core`` (objective + ``training.train``, the config's
``distill.training``, one torch thread) exactly as the distill stage does, and scores it:

- greedy exact match, standard form (direct answer) and CoT form;
- sampled exact match at temperature 1 (one batched sample per row, torch seed 0);
- for objectives with OT, the health metrics (:meth:`CoT2AlignObjective.health`) on a fixed
  probe batch (the first 64 training examples) after training: the largest own/shuffled OT
  ratio over pairs and layers, and the spread of the mapped states.

A training seed sets the student's initialisation and the data order (``train(seed=...)``).
``--split dev`` scores on the demo task's dev split (disjoint from train and test: use it to
choose settings), ``--split test`` on the pipeline's eval rows (report only the final table).
Results are appended as JSON lines to ``--out`` (default
``benchmarks/results/method_study.jsonl``, git-ignored); a (variant, seed, split, steps) already
there is not trained again. ``--jobs`` students train at once (one thread each). The table
(mean ± std over training seeds) is printed at the end, and alone with ``--table``.

Variants are :data:`VARIANTS` (objective settings over the config's ``distill.objective``), or
``name='{"alpha": 0.3, ...}'`` (JSON, merged over the config's objective) on the command line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Objective settings merged over the config's ``distill.objective`` (``ot`` merged key-wise).
VARIANTS: dict[str, dict] = {
    "sft": {"alpha": 0.0, "kd_base": "none", "ot": None},
    "dskd": {"kd_base": "dskd", "ot": None},
    "cot2align": {"kd_base": "dskd"},
    "no_cross": {"kd_base": "dskd", "ot": {"pairs": {"main": 1.0, "cross_a": 0.0, "cross_b": 0.0}}},
    "no_cross_b": {"kd_base": "dskd", "ot": {"pairs": {"main": 1.0, "cross_a": 1.0, "cross_b": 0.0}}},
    "cross_last": {"kd_base": "dskd", "ot": {"cross_layers": ["last"]}},
    "relaxed_cot": {"kd_base": "dskd", "ot": {"cross_marginals": "relaxed_cot"}},
    "mid_relaxed_cot": {"kd_base": "dskd", "ot": {"layers": ["embedding", 0.5, "last"],
                                                  "cross_marginals": "relaxed_cot"}},
    "last_only": {"kd_base": "dskd", "ot": {"layers": ["last"]}},
    "embedding_only": {"kd_base": "dskd", "ot": {"layers": ["embedding"]}},
    "student_space": {"kd_base": "dskd", "ot": {"space": "student"}},
    "mid_layer": {"kd_base": "dskd", "ot": {"layers": ["embedding", 0.5, "last"]}},
    "uncertainty": {"kd_base": "dskd", "ot": {"layer_weighting": "uncertainty"}},
    "ot_only": {"kd_base": "none"},
    "uld": {"kd_base": "uld", "ot": None},
    "uld_cot2align": {"kd_base": "uld"},
}


def variant_objective(base: dict, spec: dict) -> dict:
    """The config's objective (a dict) with the variant's settings merged in."""
    out = {k: v for k, v in base.items() if k != "kd_temperature"}  # per-base default
    for key, value in spec.items():
        if key == "ot" and value is not None and out.get("ot") is not None:
            ot = {**out["ot"], **value}
            if "layers" in value and "cross_layers" not in value:  # keep those still there
                ot["cross_layers"] = [x for x in out["ot"]["cross_layers"] if x in value["layers"]]
            out["ot"] = ot
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------ one student
def load_artifacts(config: str, overrides: list[str]):
    """(config, upstream refs of distill, the teacher_sft artifact or None) of a config."""
    from cot2align_core.config import load_config
    from tasks.common import upstream_refs
    from tasks.registry import StageKey, plan
    from tasks.stage import open_store

    cfg = load_config(config, overrides)
    store = open_store(cfg)
    fps = plan(cfg)
    student = next(k for k in fps if k.stage == "distill")  # all students share the upstream
    refs = upstream_refs(store, cfg, student, fps)
    sft_key = StageKey("teacher_sft")
    teacher_sft = store.get("teacher_sft", fps[sft_key]) if sft_key in fps else None
    return cfg, refs, teacher_sft


def eval_rows(cfg, refs, split: str) -> list[dict]:
    from storage.store import open_artifact
    from storage.schemas import read_rows

    if split == "test":
        return read_rows(open_artifact(refs["prepare"].path), "eval")
    from cot2align_core.demo_task import make_demo_rows

    d = cfg.data.demo
    return make_demo_rows(d.n_eval, d.seed, split="dev", n_operands=d.n_operands,
                          min_operand=d.min_operand, max_operand=d.max_operand, ops=d.ops)


def score(model, tok, rows: list[dict], max_tokens: int) -> dict[str, float]:
    """Greedy and sampled (T = 1) exact match in both forms, percent."""
    import torch

    from cot2align_core.demo_task import extract_answer, is_correct
    from cot2align_core.generation import HFBackend, HFOptions, SamplingConfig
    from cot2align_core.prompts import cot_prompt, standard_prompt

    backend = HFBackend(model, tok, HFOptions(batch_size=100))
    out = {}
    for form, prompt_of in (("standard", standard_prompt), ("cot", cot_prompt)):
        prompts = [prompt_of(r) for r in rows]
        for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
            torch.manual_seed(0)
            sampling = SamplingConfig(n=1, temperature=temperature, max_tokens=max_tokens, seed=0)
            if mode == "greedy":
                gens = [g[0].text for g in backend.generate(prompts, sampling)]
            else:  # one batched sample per row (the pipeline seeds rows one by one: slower)
                token_rows = [backend.encode_prompt(p) for p in prompts]
                gens = []
                for i in range(0, len(rows), 100):
                    gens += [c.text for c in backend._run(token_rows[i:i + 100], sampling, None)]
            hits = [is_correct(extract_answer(g), r["output"]) for g, r in zip(gens, rows)]
            out[f"{mode}/{form}"] = 100.0 * sum(hits) / len(rows)
    return out


def train_one(config: str, overrides: list[str], name: str, spec: dict, seed: int,
              split: str, steps: int | None, save_dir: str | None = None) -> dict:
    """Train one student and score it; returns the result record. With ``save_dir``, the
    student and the objective's parameters go to ``<save_dir>/<name>-<seed>.pt``."""
    import torch

    torch.set_num_threads(1)
    from cot2align_core.batching import collate_distill
    from cot2align_core.config import ObjectiveConfig
    from cot2align_core.tokenization import pad_token_id
    from cot2align_core.training import train
    from storage.distill_dataset import DistillDataset
    from storage.store import open_artifact
    from tasks.common import (anchor_maps, load_side_tokenizer, teacher_num_layers,
                              teacher_tensors)
    from tasks.training_run import build_model_for, seeded

    cfg, refs, _ = load_artifacts(config, overrides)
    objective_cfg = ObjectiveConfig.model_validate(
        variant_objective(cfg.distill.objective.model_dump(mode="json"), spec))
    cfg.distill.objective = objective_cfg
    t = cfg.distill.training
    tok = load_side_tokenizer(cfg, "student", refs)
    cache = open_artifact(refs["cache_teacher"].path)
    dataset = DistillDataset.from_artifacts(open_artifact(refs["tokenize"].path), cache)
    embed, head = teacher_tensors(cache, "cpu")
    from cot2align_core.objective import CoT2AlignObjective

    with seeded(seed):
        model = build_model_for(cfg, "student", tok, "cpu", seed)
        objective = CoT2AlignObjective(objective_cfg, student_dim=model.config.hidden_size,
                                       teacher_dim=embed.shape[1],
                                       teacher_num_layers=teacher_num_layers(cfg))
    anchor_maps(cfg, objective, refs, model, embed)
    pad = pad_token_id(tok)
    collate = lambda items: collate_distill(items, pad)  # noqa: E731
    extra = ([{"params": objective.projector_parameters(), "lr": objective_cfg.projector_lr}]
             if objective.projector_parameters() else [])
    t0 = time.perf_counter()
    result = train(model, lambda m, b: objective(m, *b, embed, head), dataset,
                   collate_fn=collate, extra_param_groups=extra, batch_size=t.batch_size,
                   lr=t.lr, **({"steps": steps or t.steps} if steps or t.steps else {"epochs": t.epochs}),
                   weight_decay=t.weight_decay, grad_clip=t.grad_clip, schedule=t.schedule,
                   warmup_steps=t.warmup_steps, seed=seed)
    train_s = time.perf_counter() - t0
    record = {"variant": name, "seed": seed, "split": split, "steps": result.total_steps,
              "objective": objective_cfg.model_dump(mode="json"), "train_seconds": train_s}
    last = result.history[-1]
    record["final"] = {k: v for k, v in last.items() if k in ("loss", "ce", "kd", "ot")}
    if objective.ot is not None:
        probe = collate([dataset[i] for i in range(min(64, len(dataset)))])
        health = objective.health(model, probe[0], probe[1], embed)
        ratios = {k: v for k, v in health.items() if k.startswith("health/ratio/")}
        record["health"] = health
        record["max_ratio"] = max(ratios.values()) if ratios else None
    record.update(score(model, tok, eval_rows(cfg, refs, split), cfg.evaluate.max_tokens))
    if save_dir:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "objective": objective.state_dict(),
                    "record": record}, Path(save_dir) / f"{name}-{seed}.pt")
    record["seconds"] = time.perf_counter() - t0
    return record


def score_teacher(config: str, overrides: list[str], split: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from cot2align_core.modeling import load_model, load_tokenizer

    cfg, refs, teacher_sft = load_artifacts(config, overrides)
    model = load_model(str(Path(teacher_sft.path) / "model"), "float32", "cpu")
    tok = load_tokenizer(Path(teacher_sft.path) / "model")
    return score(model, tok, eval_rows(cfg, refs, split), cfg.evaluate.max_tokens)


# ------------------------------------------------------------------------------ driver
def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(records: list[dict], split: str) -> str:
    """Mean ± std over training seeds per variant (the newest record of each seed counts)."""
    latest: dict[tuple, dict] = {}
    for r in records:
        if r["split"] == split:
            latest[(r["variant"], r["steps"], r["seed"])] = r
    groups: dict[tuple, list[dict]] = {}
    for (variant, steps, _), r in latest.items():
        groups.setdefault((variant, steps), []).append(r)
    cols = ["greedy/standard", "greedy/cot", "sampled/standard", "sampled/cot"]
    lines = [f"split {split}: exact match (%), mean ± std over training seeds",
             f"{'variant':<22}{'steps':>6}{'n':>3}" + "".join(f"{c:>18}" for c in cols)
             + f"{'max ratio':>11}{'train s':>9}"]
    for (variant, steps), rs in sorted(groups.items()):
        cells = []
        for c in cols:
            v = [r[c] for r in rs]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):10.1f} ± {sd:4.1f}")
        ratios = [r["max_ratio"] for r in rs if r.get("max_ratio") is not None]
        ratio = f"{max(ratios):11.3f}" if ratios else f"{'-':>11}"
        secs = statistics.mean(r["train_seconds"] for r in rs)
        lines.append(f"{variant:<22}{steps:>6}{len(rs):>3}" + "".join(f"{c:>18}" for c in cells)
                     + ratio + f"{secs:9.0f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override the artifacts were made with (key.path=value)")
    p.add_argument("--variants", nargs="*", default=["sft", "dskd", "cot2align"],
                   help=f"names from {list(VARIANTS)} or name='<JSON objective settings>'")
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--split", choices=["dev", "test"], default="dev")
    p.add_argument("--steps", type=int, default=None, help="default: distill.training.steps")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "method_study.jsonl"))
    p.add_argument("--save-dir", default=None, help="keep each student and objective here")
    p.add_argument("--table", action="store_true", help="only print the table of --out")
    p.add_argument("--teacher", action="store_true", help="only score the SFT teacher")
    args = p.parse_args()
    out = Path(args.out)
    if args.table:
        print(table(read_results(out), args.split))
        return
    if args.teacher:
        print(json.dumps(score_teacher(args.config, args.overrides, args.split)))
        return
    specs = {}
    for v in args.variants:
        name, _, raw = v.partition("=")
        specs[name] = json.loads(raw) if raw else VARIANTS[name]
    cfg, _, _ = load_artifacts(args.config, args.overrides)
    steps = args.steps or cfg.distill.training.steps or math.nan
    done = {(r["variant"], r["seed"], r["split"], r["steps"]) for r in read_results(out)}
    todo = [(n, s) for n in specs for s in args.seeds
            if (n, s, args.split, steps) not in done]
    print(f"{len(todo)} students to train ({len(specs) * len(args.seeds) - len(todo)} done)",
          flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(train_one, args.config, args.overrides, n, specs[n], s, args.split,
                               args.steps, args.save_dir): (n, s) for n, s in todo}
        for fut in futures:
            n, s = futures[fut]
            r = fut.result()
            with out.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"{n} seed {s}: std {r['greedy/standard']:.1f} cot {r['greedy/cot']:.1f} "
                  f"(sampled {r['sampled/standard']:.1f} / {r['sampled/cot']:.1f}) "
                  f"max ratio {r.get('max_ratio')} train {r['train_seconds']:.0f}s", flush=True)
    print(table(read_results(out), args.split))


if __name__ == "__main__":
    main()
