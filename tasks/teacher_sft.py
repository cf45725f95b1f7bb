"""Stage ``teacher_sft`` (optional): fine-tune the teacher on the task before it writes.

Both forms are trained: the standard form (prompt -> gold answer) and, where the data has a
gold rationale, the CoT form (CoT prompt -> rationale + "Therefore, the answer is: " + answer).
Checkpoints live inside the (still incomplete) artifact, so a killed run resumes from the last
one. The result is saved with ``save_pretrained`` (model and tokenizer under ``model/``), and
its greedy exact match on the eval split is measured when answers are checkable.
"""
from __future__ import annotations

import json
from functools import partial

from prefect import task
from prefect.cache_policies import NONE

from cot2align_core.answers import checker
from cot2align_core.config import PipelineConfig
from cot2align_core.evaluation import greedy_score
from cot2align_core.sft_data import build_sft_examples
from cot2align_core.tokenization import pad_token_id
from storage.schemas import read_rows
from storage.store import open_artifact
from tasks.common import StageError, StageRef, load_side_tokenizer, logger
from tasks.registry import StageKey
from tasks.stage import run_stage
from tasks.training_run import TrainingJob, build_model_for, seeded, train_and_save


def _greedy_check(cfg: PipelineConfig, model, tok, rows: list[dict]) -> dict[str, float]:
    """Greedy exact match of the fine-tuned teacher on up to 200 eval rows, per form."""
    model.eval()
    out = {}
    for form, max_tokens in (("cot", 64), ("standard", 16)):
        s = greedy_score(model, tok, rows, [form], metric="exact_match", max_tokens=max_tokens,
                         checker=checker(cfg.data.answer_format))
        out[f"greedy_exact_match_{form}"] = round(s["score"], 2)
    logger().info("teacher_sft: greedy exact match on %d eval rows: %s", len(rows), json.dumps(out))
    return out


def teacher_sft_job(cfg: PipelineConfig, upstream: dict[str, StageRef],
                    device: str) -> TrainingJob:
    """The teacher's fine-tuning run on ``device``: both forms of the training rows (cut to
    fit), the teacher (seeded, LoRA adapters too)."""
    from cot2align_core.training import collate_sft, sft_loss

    prep = open_artifact(upstream["prepare"].path)
    tok = load_side_tokenizer(cfg, "teacher", upstream)
    t = cfg.teacher_sft.training
    forms = ("standard", "cot") if cfg.teacher_sft.use_gold_rationales else ("standard",)
    examples, fit = build_sft_examples(read_rows(prep, "train"), {"teacher": tok}, "teacher",
                                       forms, max_length=t.max_length,
                                       max_prompt_length=cfg.tokenize.max_prompt_length,
                                       truncation=cfg.tokenize.truncate_input)
    if not examples:
        raise StageError("teacher_sft: no training example fits teacher_sft.training."
                         "max_length / tokenize.max_prompt_length; raise them")
    with seeded(cfg.seed):  # LoRA adapters too
        model = build_model_for(cfg, "teacher", tok, device, seed=cfg.seed)
    pad = pad_token_id(tok)
    return TrainingJob(model=model, tokenizer=tok, loss_fn=sft_loss, data=examples,
                       collate_fn=lambda rows: collate_sft(rows, pad), training=t,
                       seed=cfg.seed, lora=bool(cfg.teacher.lora_rank), info={"fit": fit})


@task(name="teacher_sft", cache_policy=NONE)
def teacher_sft_stage(cfg: PipelineConfig, key: StageKey, fp: str, upstream: dict[str, StageRef],
                      force: bool = False) -> StageRef:
    def body(w) -> dict:
        result, job = train_and_save(w, cfg, partial(teacher_sft_job, cfg, upstream),
                                     training=cfg.teacher_sft.training, label=str(key))
        fit = job.info["fit"]
        logger().info(fit.log_line("teacher_sft"))
        w.info["fit"] = fit.as_dict()
        summary = {"examples": len(job.data), **fit.summary(), "steps": result.steps_done,
                   "final_loss": round(result.final_loss or float("nan"), 4)}
        eval_rows = read_rows(open_artifact(upstream["prepare"].path), "eval")[:200]
        if cfg.data.checkable_answers and eval_rows:
            summary.update(_greedy_check(cfg, job.model, job.tokenizer, eval_rows))
        return summary

    return run_stage(cfg, key, fp, upstream, body, force=force)
