"""Stage ``distill``: train one student from its tokens and the cached teacher states.

One instance per student and training seed (``distill[sft,seed=1]``, see
:mod:`tasks.registry`). The student's objective is resolved from the config: SFT alone (alpha
0), a KD base alone (``ot: null``), or CoT2Align on a KD base. The teacher is never run here:
its states come from the cache. Checkpoints (model, projector, optimizer, scheduler, RNG, data
position) go inside the still incomplete artifact every ``checkpoint_every`` steps, so a killed
run resumes and ends where an uninterrupted one would. Writes ``model/`` (save_pretrained,
loadable by transformers and vLLM), ``objective.pt`` (the learned projector / DSKD attention)
and the loss history.
"""
from __future__ import annotations

from functools import partial

import torch
from prefect import task
from prefect.cache_policies import NONE

from cot2align_core.config import PipelineConfig
from storage.store import open_artifact
from tasks.common import (StageRef, anchor_maps, build_objective, fitted_rows,
                          load_side_tokenizer, teacher_tensors)
from tasks.registry import StageKey
from tasks.stage import run_stage
from tasks.training_run import (Evaluation, TrainingJob, build_model_for, seeded,
                                train_and_save)


def distill_job(cfg: PipelineConfig, key: StageKey, upstream: dict[str, StageRef],
                device: str) -> TrainingJob:
    """The student's training run on ``device``: its model (seeded by the training seed), the
    objective with its learned parts, the dataset of tokens and cached teacher states."""
    from cot2align_core.batching import collate_distill
    from cot2align_core.tokenization import pad_token_id
    from storage.distill_dataset import DistillDataset

    student = cfg.resolve_student(key.label)
    objective_cfg = student.objective
    tok = load_side_tokenizer(cfg, "student", upstream)
    cache = open_artifact(upstream["cache_teacher"].path)
    with_teacher = objective_cfg.uses_kd or objective_cfg.uses_ot
    dataset = DistillDataset.from_artifacts(open_artifact(upstream["tokenize"].path),
                                            cache if with_teacher else None)
    embed, head = teacher_tensors(cache, device)
    with seeded(key.seed):
        model = build_model_for(cfg, "student", tok, device, seed=key.seed)
        objective = build_objective(cfg, objective_cfg, upstream, model.config.hidden_size,
                                    embed.shape[1]).to(device)
    anchor_maps(cfg, objective, upstream, model, embed)
    pad = pad_token_id(tok)

    def loss_fn(m, batch):  # the training loop has moved the batch to the model's device
        s, te = batch
        return objective(m, s, te, embed, head)

    extra = []
    if objective.projector_parameters():
        extra = [{"params": objective.projector_parameters(), "lr": objective_cfg.projector_lr}]
    return TrainingJob(model=model, tokenizer=tok, loss_fn=loss_fn, data=dataset,
                       collate_fn=lambda items: collate_distill(items, pad,
                                                                with_teacher=with_teacher),
                       training=student.training, seed=key.seed,
                       lora=bool(cfg.student.lora_rank), extra_param_groups=extra,
                       objective=objective,
                       evaluation=evaluation(cfg, upstream, tok, objective, dataset, pad, embed))


#: Examples (with both forms) of the fixed probe batch the OT health is measured on.
PROBE_SIZE = 32


def evaluation(cfg: PipelineConfig, upstream: dict[str, StageRef], tok, objective, dataset,
               pad: int, embed) -> Evaluation | None:
    """What the student is measured on while it trains (:class:`Evaluation`):

    - with ``distill.selection.every``: its greedy score on the dev split (``dev/<metric>/
      <form>`` and their mean ``dev/score``), every that many steps; the best step's weights
      are the ones saved;
    - with OT terms: their health on a fixed probe batch (own vs shuffled teacher cost per
      pair and layer, spread of the mapped states: ``health/...``, see
      :meth:`cot2align_core.objective.CoT2AlignObjective.health`), at the same steps (every
      ``distill.health_every`` steps when there is no selection).
    """
    sel = cfg.distill.selection
    parts = []
    if sel.every:
        parts.append(_dev_scores(cfg, upstream, tok))
    if cfg.distill.health_every and objective.config.uses_ot:
        parts.append(_ot_health(objective, dataset, pad, embed))
    if not parts:
        return None

    def measure(model, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for part in parts:
            out.update(part(model))
        return out

    return Evaluation(sel.every or cfg.distill.health_every, measure,
                      select="dev/score" if sel.every else None)


def _dev_scores(cfg: PipelineConfig, upstream: dict[str, StageRef], tok):
    from cot2align_core.answers import checker
    from cot2align_core.evaluation import greedy_score
    from storage.schemas import read_rows

    sel = cfg.distill.selection
    rows = read_rows(open_artifact(upstream["prepare"].path), "dev")[: sel.max_rows]
    by_form = {form: fitted_rows(cfg, upstream, rows, form)[0] for form in sel.forms}
    metric = cfg.selection_metric()
    check = checker(cfg.data.answer_format) if cfg.data.checkable_answers else None

    def score(model) -> dict[str, float]:
        out = {}
        for form, form_rows in by_form.items():
            s = greedy_score(model, tok, form_rows, [form], metric=metric,
                             max_tokens=sel.max_tokens, checker=check)
            out[f"dev/{metric}/{form}"] = s["score"]
        out["dev/score"] = sum(out.values()) / len(out)
        return out

    return score


def _ot_health(objective, dataset, pad: int, embed):
    from cot2align_core.batching import collate_distill
    from cot2align_core.training import move_to_device

    items = [it for it in (dataset[i] for i in range(len(dataset)))
             if all(it[f] is not None for f in ("standard", "cot"))][:PROBE_SIZE]
    probe = collate_distill(items, pad) if items else None

    def health(model) -> dict[str, float]:
        if probe is None:
            return {}
        student, teacher = move_to_device(probe, embed.device)
        return objective.health(model, student, teacher, embed)

    return health


@task(name="distill", task_run_name="{key}", cache_policy=NONE)
def distill_stage(cfg: PipelineConfig, key: StageKey, fp: str, upstream: dict[str, StageRef],
                  force: bool = False) -> StageRef:
    student = cfg.resolve_student(key.label)

    def body(w) -> dict:
        result, job = train_and_save(w, cfg, partial(distill_job, cfg, key, upstream),
                                     training=student.training, label=str(key))
        torch.save(job.objective.state_dict(), w.file_path("objective.pt"))
        w.add_file("objective.pt")
        last = result.history[-1] if result.history else {}
        summary = {"student": key.label, "seed": key.seed, "examples": len(job.data),
                   "steps": result.steps_done,
                   "final_loss": round(float(last.get("loss", float("nan"))), 4),
                   "objective": student.objective.describe()}
        if result.best_step is not None:  # the weights saved are the best dev step's
            summary.update(best_step=result.best_step, best_dev_score=round(result.best_metric, 2))
        return summary

    return run_stage(cfg, key, fp, upstream, body, force=force)
