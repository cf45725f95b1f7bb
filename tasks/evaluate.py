"""Stage ``evaluate``: every student (each training seed) and the teacher answer the eval split.

Each model answers every eval prompt in each configured form, greedily and/or sampled at
temperature 1 over the configured decoding seeds (:mod:`cot2align_core.evaluation`). One
generations shard per model, so a crash keeps the models already done. Metrics are summarised
over training seeds; every student is compared with the SFT student and with the student
trained on its KD base alone by paired differences with 95% bootstrap intervals. The report
(markdown + PNG) goes under ``report/``: the paper-style table, the differences, loss curves,
the OT terms' health, and an OT transport plan of the main student.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NONE

from cot2align_core.answers import checker
from cot2align_core.config import PipelineConfig
from cot2align_core.evaluation import (decodings, generate_answers, paired_differences,
                                       reference_pairs, summary_table)
from storage.schemas import generations_table, read_rows
from storage.store import open_artifact
from tasks.common import (StageRef, checked_files, fitted_rows, logger, resolve_device,
                          teacher_model_path)
from tasks import cluster
from tasks.registry import StageKey
from tasks.report import write_evaluation_report
from tasks.stage import Progress, publish_table, run_stage


@dataclass(frozen=True)
class ModelToEvaluate:
    name: str              # the student's label, or "teacher"
    seed: int | None       # its training seed (None for the teacher)
    path: str              # save_pretrained folder or hub id
    dtype: str


def models_to_evaluate(cfg: PipelineConfig, upstream: dict[str, StageRef]) -> list[ModelToEvaluate]:
    """Every student instance of the config (in the registry's order), then the teacher."""
    models = []
    for key, ref in upstream.items():
        k = StageKey.parse(key)
        if k.stage == "distill":
            models.append(ModelToEvaluate(k.label, k.seed, checked_files(ref, "model"),
                                          cfg.student.dtype))
    if cfg.evaluate.include_teacher:
        models.append(ModelToEvaluate("teacher", None, teacher_model_path(cfg, upstream),
                                      cfg.teacher.dtype))
    return models


def generate_for_model(cfg: PipelineConfig, m: ModelToEvaluate,
                       rows_by_form: dict[str, list[dict]]) -> list[dict]:
    """Every (fitted) eval row answered by one model in each form and decoding pass."""
    from cot2align_core.generation import HFOptions, VLLMOptions, make_backend

    e = cfg.evaluate
    check = checker(cfg.data.answer_format) if cfg.data.checkable_answers else None
    out = []
    with make_backend(e.backend, m.path, vllm=VLLMOptions(dtype=m.dtype),
                      hf=HFOptions(device=resolve_device("auto"), dtype=m.dtype,
                                   batch_size=64)) as backend:
        for form, rows in rows_by_form.items():
            out += generate_answers(backend, rows, forms=[form],
                                    passes=decodings(e.decoding, e.seeds), max_tokens=e.max_tokens,
                                    temperature=e.temperature, top_p=e.top_p, checker=check)
    return [{"model": m.name, "seed_of_model": m.seed, **g} for g in out]


def comparison_pairs(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """(student, reference): each student against the SFT students and its KD base alone."""
    objectives = {st.label: st.objective for st in cfg.students()}
    return reference_pairs(
        objectives,
        is_sft=lambda o: not (o.uses_kd or o.uses_ot),
        kd_only_of=lambda ref, o: (ref.uses_kd and not ref.uses_ot and o.uses_ot
                                   and ref.kd_base == o.kd_base))


def _write_generations(writer, shard: str, m: ModelToEvaluate, out: list[dict]) -> None:
    writer.write_shard(shard, generations_table(out), kind="generations",
                       info={"model": m.name, "seed": m.seed})


@task(name="evaluate-shard", task_run_name="evaluate-{shard}", retries=1, cache_policy=NONE)
def answer_shard_on_worker(cfg: PipelineConfig, writer, shard: str, m: ModelToEvaluate,
                           rows: dict[str, list[dict]]) -> int:
    """One model's generations shard, on a Ray worker (the model loads on its GPU)."""
    out = generate_for_model(cfg, m, rows)
    _write_generations(writer, shard, m, out)
    return len(out)


def _all_generations(w, cfg: PipelineConfig, models: list[ModelToEvaluate],
                     rows: dict[str, list[dict]]) -> list[dict]:
    """Every model's generations, one shard per model: on Ray one task per model not done yet
    (then all read back); here one after another (a shard done before a crash is read back)."""
    shards = [f"generations-{i:05d}" for i in range(len(models))]
    todo = [i for i, shard in enumerate(shards) if not w.has_shard(shard)]
    if todo and cluster.uses_ray(cfg):
        calls = [cluster.ShardCall((shards[i],), dict(cfg=cfg, shard=shards[i], m=models[i],
                                                      rows=rows)) for i in todo]
        cluster.run_shards(cfg, w, answer_shard_on_worker, calls, num_gpus=cluster.shard_gpus(cfg),
                           desc="evaluate: models", stage="evaluate")
        return [g for shard in shards for g in w.read_shard(shard).to_pylist()]
    generations: list[dict] = []
    with Progress(len(models), "evaluate: models") as bar:
        for m, shard in zip(models, shards):
            if w.has_shard(shard):  # done before a crash: read it back
                generations += w.read_shard(shard).to_pylist()
            else:
                out = generate_for_model(cfg, m, rows)
                _write_generations(w, shard, m, out)
                generations += out
            bar.update()
    return generations


@task(name="evaluate", cache_policy=NONE)
def evaluate_stage(cfg: PipelineConfig, key: StageKey, fp: str, upstream: dict[str, StageRef],
                   force: bool = False) -> StageRef:
    def body(w) -> dict:
        from tasks.common import StageError

        rows = read_rows(open_artifact(upstream["prepare"].path), "eval")
        if not rows:
            raise StageError("evaluate needs an eval split: set data.eval_path (or use the demo "
                             "task)")
        rows = rows[: cfg.evaluate.max_rows] if cfg.evaluate.max_rows else rows
        by_form = {}
        for form in cfg.evaluate.forms:
            by_form[form], fit = fitted_rows(cfg, upstream, rows, form)
            logger().info(fit.log_line(f"evaluate ({form} prompts)"))
            w.info[f"fit_{form}"] = fit.as_dict()
        models = models_to_evaluate(cfg, upstream)
        generations = _all_generations(w, cfg, models, by_form)
        table = summary_table(generations)
        diffs = paired_differences(generations, comparison_pairs(cfg),
                                   n_boot=cfg.evaluate.bootstrap)
        w.write_shard("metrics", pa.Table.from_pylist(table), kind="metrics")
        publish_table(table, "cot2align-metrics", "Evaluation metrics: mean and std over "
                      "training seeds")
        if diffs:
            w.write_shard("differences", pa.Table.from_pylist(diffs), kind="differences")
        report = write_evaluation_report(w.file_path("report"), cfg, upstream, rows, generations,
                                         table, diffs)
        w.add_file("report")
        logger().info("evaluate: report at %s", report)
        return {"report": str(report), "eval_rows": len(rows),
                "models": sorted({m.name for m in models}),
                "metrics": [f"{r['model']:<14} {r['form']:<9} {r['decoding']:<8} {r['metric']:<12}"
                            + (f" {r['mean']:6.2f} ± {r['std']:.2f} ({r['n_seeds']} seeds)"
                               if r["n_seeds"] > 1 else f" {r['mean']:6.2f} (1 seed)")
                            for r in table]}

    return run_stage(cfg, key, fp, upstream, body, force=force)
