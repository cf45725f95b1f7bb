"""The evaluation report: what ``evaluate`` reads from its upstream artifacts to draw and write.

Pure drawing and writing are :mod:`cot2align_core.report`'s; this module picks the inputs: one
loss history per student (its first training seed), only the loss terms each student trained
with, the OT health metrics, the transport plan of the main student, and each stage's key
figures.
"""
from __future__ import annotations

from pathlib import Path

import torch

from cot2align_core.config import PipelineConfig
from storage.store import open_artifact
from tasks.common import (StageRef, build_objective, checked_files, logger, teacher_tensors,
                          tokenizer_path)
from tasks.registry import StageKey

# History keys that are bookkeeping, not loss terms.
_NOT_TERMS = {"step", "epoch", "seconds", "lr"}


def _student_refs(upstream: dict[str, StageRef]) -> dict[StageKey, StageRef]:
    return {k: r for k, r in ((StageKey.parse(key), r) for key, r in upstream.items())
            if k.stage == "distill"}


def first_seed_histories(cfg: PipelineConfig, upstream: dict[str, StageRef]) -> dict[str, list[dict]]:
    """Loss history of each student's first training seed (and the teacher's SFT), with the
    terms a run never used (identically zero) left out, so no panel shows flat zero lines."""
    first = cfg.training_seeds()[0]
    runs: dict[str, list[dict]] = {}
    if "teacher_sft" in upstream:
        runs["teacher (SFT)"] = open_artifact(upstream["teacher_sft"].path).read_table("history").to_pylist()
    for k, ref in _student_refs(upstream).items():
        if k.seed == first:
            runs[k.label] = open_artifact(ref.path).read_table("history").to_pylist()
    out = {}
    for name, hist in runs.items():
        unused = {key for key in (hist[0] if hist else {})
                  if key not in _NOT_TERMS and all(not rec.get(key) for rec in hist)}
        out[name] = [{k: v for k, v in rec.items() if k not in unused} for rec in hist]
    return out


def loss_terms(histories: dict[str, list[dict]]) -> list[str]:
    """The top-level loss terms present in any run (``ce``, ``kd``, ``ot``)."""
    present = {k for h in histories.values() for rec in h for k in rec}
    return [t for t in ("ce", "kd", "ot") if t in present]


def health_histories(histories: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The runs that logged OT health metrics, reduced to those records."""
    out = {}
    for name, hist in histories.items():
        recs = [r for r in hist if any(k.startswith("health/") for k in r)]
        if recs:
            out[name] = recs
    return out


#: Own/shuffled OT cost ratio above which a term is reported as no longer telling the
#: example's own teacher from another's.
HEALTHY_RATIO = 0.8
#: A cross term within this much of the teacher's own ratio (``health/reference/...``) carries
#: what the teacher's representation can.
REFERENCE_SLACK = 0.02


def health_table(health: dict[str, list[dict]]) -> str:
    """Markdown: per student (first training seed), the last measured own/shuffled OT cost
    ratio of each pair and layer, the teacher's own ratio for the cross pairs, and whether the
    term still carries teacher signal."""
    from cot2align_core.report import markdown_table

    rows = []
    for name, hist in health.items():
        last = hist[-1]
        for key in sorted(k for k in last if k.startswith("health/ratio/") and last[k] is not None):
            ratio = float(last[key])
            ref = last.get(key.replace("health/ratio/", "health/reference/"))
            ref = None if ref is None else float(ref)
            signal = ("yes" if ratio <= HEALTHY_RATIO
                      else "as the teacher's" if ref is not None and ratio <= ref + REFERENCE_SLACK
                      else "weak")
            rows.append({"student": name, "step": last["step"],
                         "pair / forms / layer": key.removeprefix("health/ratio/"),
                         "own / shuffled": ratio,
                         "teacher's own": "" if ref is None else f"{ref:.3f}",
                         "teacher signal": signal})
    note = (f"Own-teacher OT cost divided by the cost against another example's teacher, on a "
            f"fixed probe batch; at or below {HEALTHY_RATIO} the term still tells the "
            "example's own teacher from another's. A cross pair compares two different texts "
            "(an answer, a rationale and an answer), so it is also given with the teacher's own "
            "states of the student's form on the student side (\"teacher's own\"): a cross "
            "term at or below that level carries what the teacher's representation can.")
    return note + "\n\n" + markdown_table(rows, floatfmt=".3f")


def transport_plan_png(cfg: PipelineConfig, upstream: dict[str, StageRef], out_png: Path) -> bool:
    """Heatmap of the main student's OT plan (last layer) for one CoT example."""
    from cot2align_core.batching import collate_distill
    from cot2align_core.modeling import load_model, load_tokenizer
    from cot2align_core.report import plot_transport_plan
    from storage.distill_dataset import DistillDataset

    main = StageKey("distill", cfg.distill.label, cfg.training_seeds()[0])
    objective_cfg = cfg.resolve_student(main.label).objective
    if not objective_cfg.uses_ot or str(main) not in upstream:
        return False
    distill = Path(upstream[str(main)].path)
    checked_files(upstream[str(main)], "model")
    checked_files(upstream[str(main)], "objective.pt")
    cache = open_artifact(upstream["cache_teacher"].path)
    dataset = DistillDataset.from_artifacts(open_artifact(upstream["tokenize"].path), cache)
    form = "cot" if any(k[1] == "cot" for k in dataset.teacher.keys()) else "standard"
    item = next(it for it in (dataset[i] for i in range(len(dataset))) if it[form] is not None)
    model = load_model(distill / "model", "float32", "cpu")
    tok = load_tokenizer(distill / "model")
    embed, _ = teacher_tensors(cache, "cpu")
    objective = build_objective(cfg, objective_cfg, upstream, model.config.hidden_size,
                                embed.shape[1])
    objective.load_state_dict(torch.load(distill / "objective.pt", map_location="cpu",
                                         weights_only=True), strict=False)
    student, teacher = collate_distill([item], tok.pad_token_id or 0)
    plan = objective.transport_plan(model, student[form], teacher[form], layer="last")
    s = item[form]
    s_tokens = tok.convert_ids_to_tokens(s["input_ids"][s["prompt_tokens"]:].tolist())
    t_tok = load_tokenizer(tokenizer_path(cfg, "teacher", upstream))
    t_tokens = t_tok.convert_ids_to_tokens(s["teacher_target_ids"].tolist())
    plot_transport_plan(plan.cpu(), s_tokens[: plan.shape[0]], t_tokens[: plan.shape[1]], out_png,
                        title=f"OT plan (last layer), {main.label}, example {item['id']}, "
                              f"{form} form")
    return True


def stage_rows(upstream: dict[str, StageRef]) -> dict[str, dict]:
    """Each upstream stage's key figures (its summary's scalar values), students grouped."""
    out = {}
    for key, ref in upstream.items():
        figures = {a: b for a, b in ref.summary.items() if not isinstance(b, (dict, list))}
        out[key] = {"fingerprint": ref.fingerprint, "seconds": ref.seconds, **figures}
    return out


def write_evaluation_report(out_dir, cfg: PipelineConfig, upstream: dict[str, StageRef],
                            rows: list[dict], generations: list[dict], table: list[dict],
                            diffs: list[dict]) -> Path:
    from cot2align_core.report import (plot_differences, plot_loss_curves, plot_metric_bars,
                                       redundant_metrics, write_report)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = {}
    runs = first_seed_histories(cfg, upstream)
    if runs:
        plot_loss_curves(runs, out_dir / "loss_curves.png", terms=loss_terms(runs))
        images[f"Training loss (training seed {cfg.training_seeds()[0]})"] = out_dir / "loss_curves.png"
    health = health_histories(runs)
    sections = {}
    if health:
        keys = sorted({k for h in health.values() for r in h for k in r
                       if k.startswith(("health/ratio/", "health/spread/"))})
        plot_loss_curves(health, out_dir / "ot_health.png", terms=keys, loss_key=keys[0],
                         smoothing=0.0, title="OT health: own / shuffled teacher cost, spread")
        images["OT health (own/shuffled ratio: lower is better, 1 = no teacher signal)"] = \
            out_dir / "ot_health.png"
        sections["OT health at the end of training"] = health_table(health)
    results: dict[str, dict] = {}
    drop = redundant_metrics(table)
    for r in (r for r in table if r["metric"] not in drop):
        results.setdefault(f"{r['model']} ({r['form']}, {r['decoding']})", {})[r["metric"]] = r
    plot_metric_bars(results, out_dir / "metrics.png")
    images["Metrics (mean ± std over training seeds)"] = out_dir / "metrics.png"
    if diffs:
        plot_differences(diffs, out_dir / "differences.png")
        images["Paired differences with 95% bootstrap intervals"] = out_dir / "differences.png"
    try:
        if transport_plan_png(cfg, upstream, out_dir / "transport_plan.png"):
            images["OT transport plan (student vs teacher)"] = out_dir / "transport_plan.png"
    except (StopIteration, KeyError, ValueError) as err:
        logger().warning("evaluate: no transport plan figure (%s)", err)
    first = cfg.evaluate.seeds[0] if "sampled" in cfg.evaluate.decoding else 0
    samples = []
    for r in rows[:3]:
        sample = {"id": r["id"], "prompt": r["instruction"] + ("\n" + r["input"] if r["input"] else ""),
                  "reference": r["output"], "predictions": {}}
        for g in generations:
            if (g["id"] == r["id"] and g["seed"] == first
                    and g["seed_of_model"] in (None, cfg.training_seeds()[0])):
                sample["predictions"][f"{g['model']} ({g['form']}, {g['decoding']})"] = g["generation"]
        samples.append(sample)
    return write_report(out_dir, title=f"cot2align: {cfg.name}",
                        config_summary={"teacher": cfg.teacher.model_dump(mode="json"),
                                        "student": cfg.student.model_dump(mode="json"),
                                        "distill.label": cfg.distill.label,
                                        "objective": cfg.distill.objective.model_dump(mode="json"),
                                        "students": {s.label: s.objective.describe()
                                                     for s in cfg.students()},
                                        "training_seeds": cfg.training_seeds(),
                                        "evaluate": cfg.evaluate.model_dump(mode="json")},
                        metrics_table=table, differences=diffs,
                        stage_summaries=stage_rows(upstream),
                        images={k: str(v) for k, v in images.items()}, samples=samples,
                        sections=sections)
