"""Stage ``teacher_sft`` (optional): fine-tune the teacher on the task before it writes.

Both forms are trained: the standard form (prompt -> gold answer) and, where the data has a
gold rationale, the CoT form (CoT prompt -> rationale + "Therefore, the answer is: " + answer).
Checkpoints live inside the (still incomplete) artifact, so a killed run resumes from the last
one. The result is saved with ``save_pretrained`` (model and tokenizer under ``model/``), and
its greedy exact match on the eval split is measured when answers are checkable.
"""
from __future__ import annotations

import json


from prefect import task
from prefect.cache_policies import NONE

from cot2align_core.config import PipelineConfig
from cot2align_core.sft_data import build_sft_examples
from cot2align_core.tokenization import pad_token_id
from storage.store import open_artifact
from tasks.common import StageError, StageRef, load_side_tokenizer, logger, resolve_device
from tasks.prepare import read_rows
from tasks.stage import run_stage
from tasks.training_run import build_model_for, seeded, train_and_save


def greedy_exact_match(model, tok, rows: list[dict], form: str, max_tokens: int) -> float:
    from cot2align_core.demo_task import extract_answer, is_correct
    from cot2align_core.generation import HFBackend, HFOptions, SamplingConfig
    from cot2align_core.prompts import cot_prompt, standard_prompt

    prompt_of = cot_prompt if form == "cot" else standard_prompt
    backend = HFBackend(model, tok, HFOptions(batch_size=64))
    outs = backend.generate([prompt_of(r) for r in rows],
                            SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens))
    hits = [is_correct(extract_answer(o[0].text), r["output"]) for o, r in zip(outs, rows)]
    return 100.0 * sum(hits) / max(len(hits), 1)


@task(name="teacher_sft", cache_policy=NONE)
def teacher_sft_stage(cfg: PipelineConfig, fp: str, upstream: dict[str, StageRef],
                      force: bool = False) -> StageRef:
    def body(w) -> dict:
        from cot2align_core.training import collate_sft, sft_loss

        prep = open_artifact(upstream["prepare"].path)
        tok = load_side_tokenizer(cfg, "teacher", upstream)
        t = cfg.teacher_sft.training
        device = resolve_device(t.device)
        forms = ("standard", "cot") if cfg.teacher_sft.use_gold_rationales else ("standard",)
        examples, fit = build_sft_examples(read_rows(prep, "train"), {"teacher": tok}, "teacher", forms,
                                           max_length=t.max_length,
                                           max_prompt_length=cfg.tokenize.max_prompt_length)
        logger().info(fit.log_line("teacher_sft"))
        if not examples:
            raise StageError("teacher_sft: no training example fits teacher_sft.training."
                             "max_length / tokenize.max_prompt_length; raise them")
        with seeded(cfg.seed):  # LoRA adapters too
            model = build_model_for(cfg, "teacher", tok, device)
        pad = pad_token_id(tok)
        result = train_and_save(w, model, tok, sft_loss, examples,
                                lambda rows: collate_sft(rows, pad), t=t, seed=cfg.seed,
                                label="teacher_sft", lora=bool(cfg.teacher.lora_rank))
        summary = {"examples": len(examples), "fit": fit.as_dict(), "steps": result.steps_done,
                   "final_loss": round(result.final_loss or float("nan"), 4)}
        eval_rows = read_rows(prep, "eval")[:200]
        if cfg.data.checkable_answers and eval_rows:
            model.eval()
            for form in ("cot", "standard"):
                summary[f"greedy_exact_match_{form}"] = round(
                    greedy_exact_match(model, tok, eval_rows, form, 64 if form == "cot" else 16), 2)
            logger().info("teacher_sft: greedy exact match on %d eval rows: %s", len(eval_rows),
                          json.dumps({k: v for k, v in summary.items() if "exact" in k}))
        return summary

    return run_stage(cfg, "teacher_sft", fp, upstream, body, force=force)
