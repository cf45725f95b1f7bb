"""Stage ``cache_teacher``: the teacher's hidden states, computed once, stored for distill.

For each example and form, the teacher runs once over its tokens; what is kept is what the
losses need and no more: the hidden states of the configured layers at the response
prediction positions (p whose next token is a response token), the teacher tokens at and
after those positions, and, for logit-based KD bases, the top-k logits there. The embedding
layer is not stored per example: the embedding matrix (and the LM head, for DSKD) is saved
once in ``teacher_embeddings.safetensors``. One cache shard per tokenized teacher shard; a
rerun after a crash computes only the missing shards.
"""
from __future__ import annotations

import torch
from prefect import task
from prefect.cache_policies import NONE

from cot2align_core.config import PipelineConfig
from storage.schemas import read_tokenized
from storage.store import open_artifact
from storage.teacher_cache import TeacherCacheWriter
from storage.teacher_embeddings import save_teacher_embeddings
from tasks.common import StageRef, load_side_tokenizer, resolve_device, teacher_model_path
from tasks.stage import Progress, kill_point, run_stage


def prediction_positions(n_tokens: int, prompt_tokens: int) -> torch.Tensor:
    """Positions whose next token is a response token: prompt_tokens-1 .. n_tokens-2."""
    return torch.arange(max(prompt_tokens - 1, 0), n_tokens - 1)


@torch.no_grad()
def teacher_rows(model, rows: list[dict], *, layers: list[int], dtype: torch.dtype, topk: int,
                 pad_id: int, device: str, batch_size: int):
    """Yield (row, hidden [L, R, D], positions, input_ids, target_ids, topk_ids, topk_logits)."""
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
            att[i, :n] = 1
        out = model(input_ids=ids.to(device), attention_mask=att.to(device),
                    output_hidden_states=True)
        states = torch.stack([out.hidden_states[layer] for layer in layers], dim=1)  # [B,L,T,D]
        for i, r in enumerate(batch):
            pos = prediction_positions(len(r["input_ids"]), int(r["prompt_tokens"]))
            hidden = states[i][:, pos.to(device)].to(dtype).cpu().contiguous()
            tk_ids = tk_logits = None
            if topk:
                k = min(topk, out.logits.shape[-1])
                vals, idx = out.logits[i, pos.to(device)].float().topk(k, dim=-1)
                tk_ids, tk_logits = idx.to(torch.int32).cpu(), vals.cpu()
            yield (r, hidden, pos, ids[i, pos], ids[i, pos + 1], tk_ids, tk_logits)


def needs_head(cfg: PipelineConfig) -> bool:
    return any(o.alpha > 0 and o.kd_base == "dskd" for o in cfg.objectives())


@task(name="cache-teacher-shard", retries=2, retry_delay_seconds=2, cache_policy=NONE)
def cache_shard(cfg: PipelineConfig, writer, tokenized, name: str, out_name: str, model,
                pad_id: int, device: str) -> int:
    c = cfg.cache_teacher
    rows = read_tokenized(tokenized.read_table(name), as_torch=False)
    n = 0
    with TeacherCacheWriter(writer, out_name) as cache:
        for r, hidden, pos, inp, tgt, tk_ids, tk_logits in teacher_rows(
                model, rows, layers=c.layers, dtype=getattr(torch, c.dtype), topk=cfg.needed_topk(),
                pad_id=pad_id, device=device, batch_size=c.batch_size):
            cache.add(r["id"], r["form"], hidden, layers=c.layers, input_ids=inp, positions=pos,
                      target_ids=tgt, topk_ids=tk_ids, topk_logits=tk_logits)
            n += 1
    return n


@task(name="cache_teacher", cache_policy=NONE)
def cache_teacher_stage(cfg: PipelineConfig, fp: str, upstream: dict[str, StageRef],
                        force: bool = False) -> StageRef:
    def body(w) -> dict:
        from cot2align_core.modeling import load_model
        from cot2align_core.tokenization import pad_token_id

        tokenized = open_artifact(upstream["tokenize"].path)
        names = [s.name for s in tokenized.shards_of("teacher")]
        todo = [n for n in names if not w.has_shard(n.replace("teacher", "cache"))]
        device = resolve_device(cfg.cache_teacher.device)
        tok = load_side_tokenizer(cfg, "teacher", upstream)
        model = None
        if todo or not w.has_file("teacher_embeddings.safetensors"):
            model = load_model(teacher_model_path(cfg, upstream), cfg.teacher.dtype, device)
        if not w.has_file("teacher_embeddings.safetensors"):
            dt = getattr(torch, cfg.cache_teacher.dtype)
            embed = model.get_input_embeddings().weight.detach().to(dt).cpu()
            head = model.get_output_embeddings().weight.detach().to(dt).cpu() if needs_head(cfg) else None
            save_teacher_embeddings(w, embed, head)
        with Progress(len(todo), "cache_teacher: shards") as bar:
            for name in todo:
                cache_shard(cfg, w, tokenized, name, name.replace("teacher", "cache"), model,
                            pad_token_id(tok), device)
                bar.update()
                kill_point("cache_teacher", "shard", len(w.done_shards()))
        rows = sum(s.rows for s in w.shard_records())
        return {"rows": rows, "layers": list(cfg.cache_teacher.layers),
                "dtype": cfg.cache_teacher.dtype, "topk": cfg.needed_topk(),
                "lm_head": needs_head(cfg)}

    return run_stage(cfg, "cache_teacher", fp, upstream, body, force=force)
