"""Stage ``distill``: train the student from its tokens and the cached teacher states.

The objective is the config's: SFT alone (alpha 0), a KD base alone (``ot: null``), or
CoT2Align on a KD base. The teacher is never run here: its states come from the cache.
Checkpoints (model, projector, optimizer, scheduler, RNG, data position) go inside the still
incomplete artifact every ``checkpoint_every`` steps, so a killed run resumes and ends where an
uninterrupted one would. Writes ``model/`` (save_pretrained, loadable by transformers and
vLLM), ``objective.pt`` (the learned projector / DSKD attention) and the loss history.
"""
from __future__ import annotations

import torch
from prefect import task
from prefect.cache_policies import NONE

from cot2align_core.config import PipelineConfig
from storage.store import open_artifact
from tasks.common import StageRef, load_side_tokenizer, resolve_device
from tasks.stage import run_stage
from tasks.training_run import build_model_for, seeded, train_and_save


def teacher_num_layers(cfg: PipelineConfig) -> int:
    """The teacher's depth (the objective maps depth-fraction OT layers with it)."""
    if cfg.teacher.scratch is not None:
        return cfg.teacher.scratch.num_layers
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(cfg.teacher.pretrained).num_hidden_layers


def build_objective(cfg: PipelineConfig, upstream: dict[str, StageRef], student_dim: int,
                    teacher_dim: int):
    from cot2align_core.objective import CoT2AlignObjective

    objective = cfg.distill.objective
    vocab_map = None
    if objective.uses_kd and objective.kd_base == "mined":
        from cot2align_core.mined import build_vocab_mapping

        vocab_map = build_vocab_mapping(load_side_tokenizer(cfg, "teacher", upstream),
                                        load_side_tokenizer(cfg, "student", upstream))
    return CoT2AlignObjective(objective, student_dim=student_dim, teacher_dim=teacher_dim,
                              teacher_num_layers=teacher_num_layers(cfg), vocab_map=vocab_map)


def teacher_tensors(cache_artifact, device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    from storage.teacher_embeddings import load_teacher_embeddings

    emb = load_teacher_embeddings(cache_artifact)
    embed = emb["embed"].to(device=device, dtype=torch.float32)
    head = emb.get("lm_head")
    return embed, (None if head is None else head.to(device=device, dtype=torch.float32))


def _to(batch, device):
    import dataclasses

    def move(x):
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if dataclasses.is_dataclass(x):
            return dataclasses.replace(x, **{f.name: move(getattr(x, f.name))
                                             for f in dataclasses.fields(x)
                                             if isinstance(getattr(x, f.name), torch.Tensor)})
        return x

    student, teacher = batch
    return ({f: move(b) for f, b in student.items()},
            None if teacher is None else {f: move(b) for f, b in teacher.items()})


@task(name="distill", cache_policy=NONE)
def distill_stage(cfg: PipelineConfig, fp: str, upstream: dict[str, StageRef],
                  force: bool = False, label: str = "distill") -> StageRef:
    """``label`` names the student in logs and Prefect artifacts (``distill:<baseline>``)."""

    def body(w) -> dict:
        from cot2align_core.batching import collate_distill
        from cot2align_core.tokenization import pad_token_id
        from storage.distill_dataset import DistillDataset

        t = cfg.distill.training
        device = resolve_device(t.device)
        tok = load_side_tokenizer(cfg, "student", upstream)
        cache = open_artifact(upstream["cache_teacher"].path)
        objective_cfg = cfg.distill.objective
        with_teacher = objective_cfg.uses_kd or objective_cfg.uses_ot
        dataset = DistillDataset.from_artifacts(open_artifact(upstream["tokenize"].path),
                                                cache if with_teacher else None)
        embed, head = teacher_tensors(cache, device)
        with seeded(cfg.seed):
            model = build_model_for(cfg, "student", tok, device)
            objective = build_objective(cfg, upstream, model.config.hidden_size,
                                        embed.shape[1]).to(device)
        pad = pad_token_id(tok)

        def loss_fn(m, batch):
            student, teacher = _to(batch, device)
            return objective(m, student, teacher, embed, head)

        extra = []
        if objective.projector_parameters():
            extra = [{"params": objective.projector_parameters(),
                      "lr": cfg.distill.objective.projector_lr}]
        result = train_and_save(
            w, model, tok, loss_fn, dataset,
            lambda items: collate_distill(items, pad, with_teacher=with_teacher),
            t=t, seed=cfg.seed, label=label, lora=bool(cfg.student.lora_rank),
            extra_param_groups=extra)
        torch.save(objective.state_dict(), w.file_path("objective.pt"))
        w.add_file("objective.pt")
        last = result.history[-1] if result.history else {}
        return {"examples": len(dataset), "steps": result.steps_done,
                "final_loss": round(float(last.get("loss", float("nan"))), 4),
                "objective": cfg.distill.objective.kd_base + ("+ot" if objective_cfg.uses_ot else "")
                if cfg.distill.objective.alpha > 0 else "sft"}

    return run_stage(cfg, "distill", fp, upstream, body, force=force, label=label)
