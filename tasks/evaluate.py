"""Stage ``evaluate``: the students (and the teacher) answer the eval split; metrics and report.

Each model generates on every eval prompt, in each configured form, for each seed (sampled
decoding as the paper: temperature 1, 5 seeds; each prompt's seed derives from (seed, id)).
ROUGE-L F x100 (rouge_score, stemmer on) is computed on the answer, exact match when answers
are checkable (for the CoT form, on what follows "Therefore, the answer is:"). Generations are
one shard per model (so a crash keeps the models already done); metrics are summarised as
mean and std over seeds. The report (markdown + PNG: loss curves, metric bars, an OT transport
plan between a teacher and a student sequence) goes under ``report/``.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch
from prefect import task
from prefect.cache_policies import NONE

from cot2align_core.config import PipelineConfig
from cot2align_core.metrics import exact_match, rouge_l, summarize
from cot2align_core.prompts import cot_prompt, standard_prompt
from storage.store import open_artifact
from tasks.common import StageRef, logger, resolve_device, teacher_model_path, tokenizer_path
from tasks.generate import split_rationale
from tasks.prepare import read_rows
from tasks.stage import Progress, run_stage

GENERATIONS_SCHEMA = pa.schema([
    ("model", pa.string()), ("form", pa.string()), ("seed", pa.int64()), ("id", pa.string()),
    ("prompt", pa.string()), ("reference", pa.string()), ("generation", pa.string()),
    ("prediction", pa.string()), ("rougeL", pa.float64()), ("exact_match", pa.float64()),
])


def models_to_evaluate(cfg: PipelineConfig, upstream: dict[str, StageRef]) -> dict[str, str]:
    """Model name -> directory (or hub id): the student, baseline students, the teacher."""
    models = {"cot2align": str(Path(upstream["distill"].path) / "model")}
    for key, ref in upstream.items():
        if key.startswith("distill:"):
            models[key.split(":", 1)[1]] = str(Path(ref.path) / "model")
    if cfg.evaluate.include_teacher:
        models["teacher"] = teacher_model_path(cfg, upstream)
    return models


def answer_of(generation: str, form: str) -> str:
    """What is scored: the whole answer (standard form) or what follows the CoT's marker."""
    if form == "cot":
        rationale, answer = split_rationale(generation)
        return answer
    return generation.strip()


def generate_for_model(cfg: PipelineConfig, name: str, model_dir: str, rows: list[dict]) -> list[dict]:
    from cot2align_core.demo_task import extract_answer
    from cot2align_core.generation import SamplingConfig, derive_seed, make_backend

    e = cfg.evaluate
    dtype = cfg.teacher.dtype if name == "teacher" else cfg.student.dtype
    out = []
    with make_backend(e.backend, model_dir, dtype=dtype,
                      hf_options=dict(device=resolve_device("auto"), batch_size=64)) as backend:
        for form in e.forms:
            prompt_of = cot_prompt if form == "cot" else standard_prompt
            prompts = [prompt_of(r) for r in rows]
            refs = [r["output"] for r in rows]
            for seed in e.seeds:
                sampling = SamplingConfig(n=1, temperature=e.temperature, top_p=e.top_p,
                                          max_tokens=e.max_tokens, seed=seed)
                gens = backend.generate(prompts, sampling, [derive_seed(seed, r["id"]) for r in rows],
                                        ids=[r["id"] for r in rows])
                texts = [g[0].text if g else "" for g in gens]
                preds = [answer_of(t, form) for t in texts]
                rouge = rouge_l(preds, refs)
                if cfg.data.checkable_answers:
                    em = exact_match(texts if form == "cot" else preds, refs, extract=extract_answer)
                else:
                    em = [None] * len(rows)
                out += [dict(model=name, form=form, seed=seed, id=r["id"], prompt=p, reference=ref,
                             generation=t, prediction=pr, rougeL=rg, exact_match=m)
                        for r, p, ref, t, pr, rg, m in zip(rows, prompts, refs, texts, preds, rouge, em)]
    return out


def summarise(generations: list[dict]) -> list[dict]:
    """Rows (model, form, metric, mean, std, n_seeds) over seeds of the per-seed means."""
    groups: dict[tuple[str, str], dict[int, dict[str, list[float]]]] = {}
    for g in generations:
        per_seed = groups.setdefault((g["model"], g["form"]), {}).setdefault(g["seed"], {})
        for metric in ("rougeL", "exact_match"):
            if g[metric] is not None:
                per_seed.setdefault(metric, []).append(g[metric])
    table = []
    for (model, form), seeds in groups.items():
        means = {s: {k: sum(v) / len(v) for k, v in m.items()} for s, m in seeds.items()}
        for metric, stats in summarize(means).items():
            table.append(dict(model=model, form=form, metric=metric, mean=stats["mean"],
                              std=stats["std"], n_seeds=stats["n_seeds"]))
    return table


def transport_plan_figure(cfg: PipelineConfig, upstream: dict[str, StageRef], out_png: Path) -> bool:
    """Heatmap of the trained objective's OT plan for one CoT example (student vs teacher)."""
    from cot2align_core.batching import collate_distill
    from cot2align_core.modeling import load_model, load_tokenizer
    from cot2align_core.report import plot_transport_plan
    from storage.distill_dataset import DistillDataset
    from tasks.distill import build_objective, teacher_tensors

    if not cfg.distill.objective.uses_ot:
        return False
    distill = Path(upstream["distill"].path)
    tokenized, cache = distill_inputs(upstream["distill"])
    dataset = DistillDataset.from_artifacts(tokenized, cache)
    # A CoT example when there is one (a rationale against its tokens is the telling picture).
    form = "cot" if any(k[1] == "cot" for k in dataset.teacher.keys()) else "standard"
    item = next(it for it in (dataset[i] for i in range(len(dataset))) if it[form] is not None)
    model = load_model(distill / "model", "float32", "cpu")
    tok = load_tokenizer(distill / "model")
    embed, _ = teacher_tensors(cache, "cpu")
    objective = build_objective(cfg, upstream, model.config.hidden_size, embed.shape[1])
    objective.load_state_dict(torch.load(distill / "objective.pt", map_location="cpu"), strict=False)
    student, teacher = collate_distill([item], tok.pad_token_id or 0)
    plan = objective.transport_plan(model, student[form], teacher[form], layer="last")
    s = item[form]
    s_ids = s["input_ids"][s["prompt_tokens"]:].tolist()
    t_tok = load_tokenizer(tokenizer_path(cfg, "teacher", upstream))
    s_tokens = tok.convert_ids_to_tokens(s_ids)[: plan.shape[0]]
    t_tokens = t_tok.convert_ids_to_tokens(s["teacher_target_ids"].tolist())[: plan.shape[1]]
    plot_transport_plan(plan.cpu(), s_tokens, t_tokens, out_png,
                        title=f"OT plan (last layer), example {item['id']}, {form} form")
    return True


def distill_inputs(distill: StageRef):
    """The (tokenize, cache_teacher) artifacts a distill artifact was trained from, found by
    the upstream fingerprints its manifest records, in the same store."""
    root = Path(distill.path).parents[1]
    ups = open_artifact(distill.path).upstream
    return (open_artifact(root / "tokenize" / ups["tokenize"]),
            open_artifact(root / "cache_teacher" / ups["cache_teacher"]))


def histories(upstream: dict[str, StageRef]) -> dict[str, list[dict]]:
    out = {}
    for key in ["teacher_sft", "distill", *sorted(k for k in upstream if k.startswith("distill:"))]:
        if key in upstream:
            name = {"distill": "cot2align"}.get(key, key.replace("distill:", ""))
            out[name] = open_artifact(upstream[key].path).read_table("history").to_pylist()
    return out


def publish_table(table: list[dict]) -> None:
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact([{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}
                               for r in table], key="cot2align-metrics",
                              description="Evaluation metrics: mean and std over seeds")
    except Exception as err:  # outside a Prefect run
        logger().debug("no Prefect table artifact: %s", err)


@task(name="evaluate", cache_policy=NONE)
def evaluate_stage(cfg: PipelineConfig, fp: str, upstream: dict[str, StageRef],
                   force: bool = False) -> StageRef:
    def body(w) -> dict:
        from cot2align_core.report import plot_loss_curves, plot_metric_bars, write_report

        rows = read_rows(open_artifact(upstream["prepare"].path), "eval")
        if not rows:
            from tasks.common import StageError

            raise StageError("evaluate needs an eval split: set data.eval_path (or use the demo task)")
        rows = rows[: cfg.evaluate.max_rows] if cfg.evaluate.max_rows else rows
        models = models_to_evaluate(cfg, upstream)
        generations: list[dict] = []
        with Progress(len(models), "evaluate: models") as bar:
            for i, (name, path) in enumerate(models.items()):
                shard = f"generations-{i:05d}"
                if w.has_shard(shard):  # done before a crash: read it back
                    full = w.fs.join(w.dir, f"{shard}.parquet")
                    generations += w.fs.parquet_file(full).read().to_pylist()
                else:
                    rows_out = generate_for_model(cfg, name, path, rows)
                    w.write_shard(shard, pa.Table.from_pylist(rows_out, schema=GENERATIONS_SCHEMA),
                                  kind="generations", info={"model": name})
                    generations += rows_out
                bar.update()
        table = summarise(generations)
        w.write_shard("metrics", pa.Table.from_pylist(table), kind="metrics")
        publish_table(table)

        report_dir = w.file_path("report")
        report_dir.mkdir(parents=True, exist_ok=True)
        images = {}
        runs = histories(upstream)
        present = {k for h in runs.values() for rec in h for k in rec}
        terms = [t for t in ("ce", "kd", "ot", "ot/main/cot-cot/last", "ot/cross_a/standard-cot/last",
                             "ot/cross_b/cot-standard/last") if t in present]
        plot_loss_curves(runs, report_dir / "loss_curves.png", terms=terms)
        images["Training loss"] = report_dir / "loss_curves.png"
        results = {}
        for r in table:
            results.setdefault(f"{r['model']} ({r['form']})", {})[r["metric"]] = {
                "mean": r["mean"], "std": r["std"]}
        plot_metric_bars(results, report_dir / "metrics.png")
        images["Metrics (mean ± std over seeds)"] = report_dir / "metrics.png"
        if transport_plan_figure(cfg, upstream, report_dir / "transport_plan.png"):
            images["OT transport plan (student vs teacher)"] = report_dir / "transport_plan.png"
        first_seed = cfg.evaluate.seeds[0]
        samples = []
        for r in rows[:3]:
            sample = {"prompt": r["instruction"] + ("\n" + r["input"] if r["input"] else ""),
                      "reference": r["output"]}
            for g in generations:
                if g["id"] == r["id"] and g["seed"] == first_seed:
                    sample[f"{g['model']} ({g['form']})"] = g["generation"]
            samples.append(sample)
        stage_summaries = {k: {"artifact": ref.path, "fingerprint": ref.fingerprint,
                               "seconds": ref.seconds, **{a: b for a, b in ref.summary.items()
                                                          if not isinstance(b, (dict, list))}}
                           for k, ref in upstream.items()}
        report = write_report(report_dir, title=f"cot2align: {cfg.name}",
                              config_summary={"teacher": cfg.teacher.model_dump(mode="json"),
                                              "student": cfg.student.model_dump(mode="json"),
                                              "objective": cfg.distill.objective.model_dump(mode="json"),
                                              "evaluate": cfg.evaluate.model_dump(mode="json")},
                              metrics_table=[{**r, "model": f"{r['model']} ({r['form']})"}
                                             for r in table],
                              stage_summaries=stage_summaries,
                              images={k: str(v) for k, v in images.items()}, samples=samples)
        w.add_file("report")
        lines = [f"{r['model']:<12} {r['form']:<9} {r['metric']:<12} {r['mean']:6.2f} ± "
                 f"{r['std']:.2f} ({r['n_seeds']} seeds)" for r in table]
        return {"report": str(report), "metrics": lines, "eval_rows": len(rows),
                "models": list(models)}

    return run_stage(cfg, "evaluate", fp, upstream, body, force=force)
