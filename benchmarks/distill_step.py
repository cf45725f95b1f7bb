"""Benchmark: what a distill step costs, side by side in one run.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/distill_step.py configs/demo.yaml \\
        [--set key=value ...] [--steps 20] [--warmup 3] [--teacher-layers N]

It reads the artifacts of the config up to cache_teacher (run the pipeline up to there first;
the ``--set`` overrides must be the ones they were made with) and times full training steps
(collate, objective forward, backward, AdamW step) of the configured student on the same
batches of the training data:

1. **cached vs live teacher**: the config's objective with the teacher states read from the
   cache (what the distill stage does), against the same step with the teacher run on the
   batch (its forward pass over both forms, the states and top-k logits gathered at the
   response prediction positions as cache_teacher does, ``cot2align_core.teacher_states.teacher_rows``).
   The ratio cached / live says what caching saves (target <= 0.5 at a teacher / student size
   ratio of at least 4x; the parameter counts are printed). On the demo's tiny models the
   teacher's forward pass is cheap next to the objective's own work, which does not shrink
   with the teacher; ``--teacher-layers N`` times the live path with a deeper teacher of the
   same width (random weights; the cache and the objective are unchanged), to see the ratio
   at the size ratios of the paper's setups (Mistral-7B / TinyLLaMA-1.1B: 6.6x, with the
   teacher's forward, not the loss, dominating the step).
2. **CoT2Align vs its KD base alone**: the config's objective against the same one with
   ``ot: null`` (both with the cache). Target <= 1.3.

Times are medians over ``--steps`` steps after ``--warmup`` steps, one torch thread (the
shared 2-core machine; ``--threads`` to change it). The modes alternate step by step so that
drifts of the machine's load hit them alike.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.method_study import load_artifacts  # noqa: E402


class LiveTeacher:
    """The teacher run on a batch's rows, its outputs packed as the cache would hold them."""

    def __init__(self, cfg, refs, teacher_sft, teacher_layers: int | None = None):
        from cot2align_core.modeling import load_model
        from cot2align_core.tokenization import pad_token_id
        from storage.schemas import read_tokenized
        from storage.store import open_artifact
        from tasks.common import load_side_tokenizer, teacher_model_path

        ups = dict(refs)
        if teacher_sft is not None:
            from tasks.common import StageRef

            ups["teacher_sft"] = StageRef(key="teacher_sft", fingerprint="", path=str(teacher_sft.path))
        teacher_tok = load_side_tokenizer(cfg, "teacher", refs)
        if teacher_layers:  # a deeper scratch teacher of the same width: timing only
            from tasks.training_run import build_model_for

            if cfg.teacher.scratch is None:
                raise SystemExit("--teacher-layers needs a scratch teacher (teacher.scratch)")
            deeper = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={
                "scratch": cfg.teacher.scratch.model_copy(update={"num_layers": teacher_layers})})})
            self.model = build_model_for(deeper, "teacher", teacher_tok, "cpu", 0)
        else:
            self.model = load_model(teacher_model_path(cfg, ups), cfg.teacher.dtype, "cpu")
        self.model.eval()
        self.pad = pad_token_id(teacher_tok)
        tokenized = open_artifact(refs["tokenize"].path)
        self.rows = {}
        for shard in tokenized.shards_of("teacher"):
            for r in read_tokenized(tokenized.read_table(shard.name), as_torch=False):
                self.rows[(r["id"], r["form"])] = r
        self.cfg = cfg

    def fields(self, items: list[dict]) -> list[dict]:
        """``items`` (student-only dataset items) with the teacher fields filled in live."""
        from cot2align_core.teacher_states import teacher_rows
        from tasks.common import cached_teacher_layers

        c, layers = self.cfg.cache_teacher, cached_teacher_layers(self.cfg)
        keys = [(it["id"], f) for it in items for f in ("standard", "cot") if it[f] is not None]
        got = {}
        for r, hidden, pos, inp, tgt, tk_ids, tk_logits in teacher_rows(
                self.model, [self.rows[k] for k in keys], layers=layers,
                dtype=getattr(torch, c.dtype), topk=self.cfg.needed_topk(), pad_id=self.pad,
                device="cpu", batch_size=len(keys)):
            got[(r["id"], r["form"])] = {
                "teacher_hidden": hidden, "teacher_layers": tuple(layers),
                "teacher_input_ids": inp, "teacher_target_ids": tgt,
                "teacher_topk_ids": None if tk_ids is None else tk_ids.long(),
                "teacher_topk_logits": tk_logits}
        return [{**it, **{f: None if it[f] is None else {**it[f], **got[(it["id"], f)]}
                          for f in ("standard", "cot")}} for it in items]


def trained_student(cfg):
    """(model state dict, objective state dict) of the config's main student, training seed
    0, from its distill artifact (run the pipeline first)."""
    from cot2align_core.modeling import load_model
    from tasks.registry import StageKey, plan
    from tasks.stage import open_store

    key = StageKey("distill", cfg.distill.label, cfg.training_seeds()[0])
    art = open_store(cfg).get("distill", plan(cfg)[key])
    if art is None:
        raise SystemExit(f"--trained: {key} has no artifact in {cfg.store}; run "
                         f"`cot2align run {cfg.name}` (or its distill stage) first")
    path = Path(art.path)
    model = load_model(path / "model", "float32", "cpu")
    return model.state_dict(), torch.load(path / "objective.pt", map_location="cpu")


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--teacher-layers", type=int, default=None,
                   help="time the live teacher with this many layers (a scratch teacher of the "
                        "same width, random weights) instead of the trained one")
    p.add_argument("--trained", action="store_true",
                   help="start both setups from the config's trained main student (training "
                        "seed 0: its distill artifact's weights and OT maps), to time steps "
                        "late in training, where Sinkhorn needs more iterations")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "distill_step.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from cot2align_core.batching import collate_distill
    from cot2align_core.objective import CoT2AlignObjective
    from cot2align_core.tokenization import pad_token_id
    from cot2align_core.sampling import EpochSampler
    from storage.distill_dataset import DistillDataset
    from storage.store import open_artifact
    from tasks.common import load_side_tokenizer, teacher_num_layers, teacher_tensors
    from tasks.training_run import build_model_for

    cfg, refs, teacher_sft = load_artifacts(args.config, args.overrides)
    tok = load_side_tokenizer(cfg, "student", refs)
    pad = pad_token_id(tok)
    cache = open_artifact(refs["cache_teacher"].path)
    tokenized = open_artifact(refs["tokenize"].path)
    cached_data = DistillDataset.from_artifacts(tokenized, cache)
    student_data = DistillDataset.from_artifacts(tokenized, None)
    embed, head = teacher_tensors(cache, "cpu")
    live = LiveTeacher(cfg, refs, teacher_sft, args.teacher_layers)

    objective_cfg = cfg.distill.objective
    if not objective_cfg.uses_ot:
        raise SystemExit("the config's distill objective has no OT term: nothing to compare")
    base_cfg = objective_cfg.model_copy(update={"ot": None})
    trained = trained_student(cfg) if args.trained else None
    setups = {}
    for name, ocfg in (("cot2align", objective_cfg), ("kd_base", base_cfg)):
        torch.manual_seed(0)
        model = build_model_for(cfg, "student", tok, "cpu", 0)
        objective = CoT2AlignObjective(ocfg, student_dim=model.config.hidden_size,
                                       teacher_dim=embed.shape[1],
                                       teacher_num_layers=teacher_num_layers(cfg))
        if trained is not None:  # the trained weights; the KD base keeps its own parts only
            weights, parts = trained
            model.load_state_dict(weights)
            own = objective.state_dict()
            objective.load_state_dict({k: v for k, v in parts.items() if k in own})
        opt = torch.optim.AdamW(list(model.parameters()) + objective.projector_parameters(),
                                lr=cfg.distill.training.lr)
        setups[name] = (model, objective, opt)
    t_params, s_params = param_count(live.model), param_count(setups["cot2align"][0])

    def step(mode: str, indices: list[int]) -> float:
        name = "kd_base" if mode == "kd_base" else "cot2align"
        model, objective, opt = setups[name]
        t0 = time.perf_counter()
        if mode == "live":
            with torch.no_grad():
                items = live.fields([student_data[i] for i in indices])
        else:
            items = [cached_data[i] for i in indices]
        student, teacher = collate_distill(items, pad)
        loss, _ = objective(model, student, teacher, embed, head)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    sampler = EpochSampler(len(cached_data), cfg.distill.training.batch_size, seed=0)
    modes = ("cached", "live", "kd_base")
    times = {m: [] for m in modes}
    for k in range(args.warmup + args.steps):
        _, indices = sampler.next_batch()
        for m in modes:
            dt = step(m, indices)
            if k >= args.warmup:
                times[m].append(dt)
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"teacher {t_params:,} parameters, student {s_params:,}: size ratio "
          f"{t_params / s_params:.1f}x; batch {cfg.distill.training.batch_size}, objective "
          f"{objective_cfg.kd_base} + OT {objective_cfg.ot.layers} (space "
          f"{objective_cfg.ot.space}); {args.steps} steps, {args.threads} thread(s); "
          f"student {'trained (main student, seed 0)' if args.trained else 'untrained'}")
    print(f"{'step':<40}{'median s':>10}")
    labels = {"cached": "CoT2Align, cached teacher", "live": "CoT2Align, live teacher forward",
              "kd_base": f"{objective_cfg.kd_base} alone, cached teacher"}
    for m in modes:
        print(f"{labels[m]:<40}{med[m]:10.4f}")
    print(f"cached / live teacher: {med['cached'] / med['live']:.2f}x (target <= 0.5)")
    print(f"CoT2Align / {objective_cfg.kd_base} alone: {med['cached'] / med['kd_base']:.2f}x "
          "(target <= 1.3)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "config": args.config, "overrides": args.overrides, "steps": args.steps,
        "threads": args.threads, "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "load_avg": os.getloadavg()[0], "teacher_params": t_params, "student_params": s_params,
        "teacher_layers": args.teacher_layers, "trained": args.trained, "median_s": med,
        "cached_over_live": med["cached"] / med["live"],
        "cot2align_over_kd_base": med["cached"] / med["kd_base"]}, indent=1))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
