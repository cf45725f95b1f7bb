"""Stage ``teacher_sft`` (optional): fine-tune the teacher on the task before it writes.

Both forms are trained: the standard form (prompt -> gold answer) and, where the data has a
gold rationale, the CoT form (CoT prompt -> rationale + "Therefore, the answer is: " + answer).
Checkpoints live inside the (still incomplete) artifact, so a killed run resumes from the last
one. The result is saved with ``save_pretrained`` (model and tokenizer under ``model/``), and
its greedy exact match on the eval split is measured when answers are checkable.
"""
from __future__ import annotations

import json
import shutil

import torch

from prefect import task
from prefect.cache_policies import NONE

from cot2align_core.config import PipelineConfig, TrainingConfig
from cot2align_core.sft_data import build_sft_examples
from cot2align_core.tokenization import pad_token_id
from storage.store import open_artifact
from tasks.common import StageError, StageRef, load_side_tokenizer, logger, resolve_device
from tasks.prepare import read_rows
from tasks.stage import kill_point, run_stage


def build_model_for(cfg: PipelineConfig, side: str, tokenizer, device: str):
    """A scratch model built from the config, or the pretrained one (with LoRA if set)."""
    from cot2align_core.modeling import build_model, load_model

    model_cfg = cfg.teacher if side == "teacher" else cfg.student
    if model_cfg.scratch is not None:
        s = model_cfg.scratch
        model = build_model(s.arch, tokenizer, hidden_size=s.hidden_size, num_layers=s.num_layers,
                            num_heads=s.num_heads, intermediate_size=s.intermediate_size,
                            max_position_embeddings=s.max_position_embeddings, seed=cfg.seed)
        model = model.to(device)
    else:
        model = load_model(model_cfg.pretrained, model_cfg.dtype, device)
    if model_cfg.lora_rank:
        from cot2align_core.lora import apply_lora

        apply_lora(model, rank=model_cfg.lora_rank)
    return model


def train_kwargs(t: TrainingConfig, seed: int) -> dict:
    return dict(batch_size=t.batch_size, lr=t.lr, steps=t.steps, epochs=t.epochs,
                weight_decay=t.weight_decay, grad_clip=t.grad_clip, schedule=t.schedule,
                warmup_steps=t.warmup_steps, seed=seed, checkpoint_every=t.checkpoint_every,
                keep_last=t.keep_last, resume=True)


def log_every_n(label: str, n: int = 50):
    log = logger()

    stage = label.split(":")[0]

    def on_log(rec: dict) -> None:
        kill_point(stage, "step", rec["step"])
        if rec["step"] % n == 0 or rec["step"] == 1:
            # Top-level terms only; the per-form, per-pair breakdown is in the loss history.
            terms = " ".join(f"{k}={v:.4f}" for k, v in rec.items()
                             if k not in ("step", "epoch", "seconds", "lr") and "/" not in k
                             and isinstance(v, float))
            log.info("%s step %d epoch %d lr %.2e %s", label, rec["step"], rec["epoch"], rec["lr"], terms)

    return on_log


def greedy_exact_match(model, tok, rows: list[dict], form: str, max_tokens: int) -> float:
    from cot2align_core.demo_task import extract_answer, is_correct
    from cot2align_core.generation import HFBackend, SamplingConfig
    from cot2align_core.prompts import cot_prompt, standard_prompt

    prompt_of = cot_prompt if form == "cot" else standard_prompt
    backend = HFBackend(model, tok, batch_size=64)
    outs = backend.generate([prompt_of(r) for r in rows],
                            SamplingConfig(n=1, temperature=0.0, max_tokens=max_tokens))
    hits = [is_correct(extract_answer(o[0].text), r["output"]) for o, r in zip(outs, rows)]
    return 100.0 * sum(hits) / max(len(hits), 1)


@task(name="teacher_sft", cache_policy=NONE)
def teacher_sft_stage(cfg: PipelineConfig, fp: str, upstream: dict[str, StageRef],
                      force: bool = False) -> StageRef:
    def body(w) -> dict:
        import pyarrow as pa

        from cot2align_core.training import collate_sft, sft_loss, train

        prep = open_artifact(upstream["prepare"].path)
        tok = load_side_tokenizer(cfg, "teacher", upstream)
        t = cfg.teacher_sft.training
        device = resolve_device(t.device)
        forms = ("standard", "cot") if cfg.teacher_sft.use_gold_rationales else ("standard",)
        examples = build_sft_examples(read_rows(prep, "train"), tok, forms,
                                      max_length=t.max_length,
                                      max_prompt_length=cfg.tokenize.max_prompt_length)
        if not examples:
            raise StageError("teacher_sft: no training example fits teacher_sft.training."
                             "max_length / tokenize.max_prompt_length; raise them")
        with torch.random.fork_rng(devices=[]):  # init from the seed (LoRA adapters too)
            torch.manual_seed(cfg.seed)
            model = build_model_for(cfg, "teacher", tok, device)
        pad = pad_token_id(tok)
        ckpt = w.file_path("checkpoints")
        result = train(model, sft_loss, examples, collate_fn=lambda rows: collate_sft(rows, pad),
                       checkpoint_dir=ckpt, on_log=log_every_n("teacher_sft"),
                       **train_kwargs(t, cfg.seed))
        if cfg.teacher.lora_rank:
            from cot2align_core.lora import merge_lora

            merge_lora(model)
        out = w.file_path("model")
        model.save_pretrained(out)
        tok.save_pretrained(out)
        w.add_file("model")
        w.write_shard("history", pa.Table.from_pylist(result.history), kind="history")
        shutil.rmtree(ckpt, ignore_errors=True)  # optimizer state is not part of the result
        summary = {"examples": len(examples), "steps": result.steps_done,
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
