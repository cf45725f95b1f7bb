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
from cot2align_core.teacher_states import teacher_rows
from storage.schemas import read_tokenized
from storage.store import open_artifact
from storage.teacher_cache import TeacherCacheWriter
from storage.teacher_embeddings import save_teacher_embeddings
from tasks.common import (StageRef, cached_teacher_layers, load_side_tokenizer, resolve_device,
                          teacher_model_path)
from tasks import cluster
from tasks.registry import StageKey
from tasks.stage import Progress, kill_point, run_shard, run_stage


@task(name="cache-teacher-shard", task_run_name="cache_teacher-{out_name}", retries=2,
      retry_delay_seconds=2, cache_policy=NONE)
def cache_shard(cfg: PipelineConfig, writer, tokenized, name: str, out_name: str, model,
                pad_id: int, device: str) -> int:
    c, layers = cfg.cache_teacher, cached_teacher_layers(cfg)
    rows = read_tokenized(tokenized.read_table(name), as_torch=False)
    n = 0
    with TeacherCacheWriter(writer, out_name) as cache:
        for r, hidden, pos, inp, tgt, tk_ids, tk_logits in teacher_rows(
                model, rows, layers=layers, dtype=getattr(torch, c.dtype), topk=cfg.needed_topk(),
                pad_id=pad_id, device=device, batch_size=c.batch_size):
            cache.add(r["id"], r["form"], hidden, layers=layers, input_ids=inp, positions=pos,
                      target_ids=tgt, topk_ids=tk_ids, topk_logits=tk_logits)
            n += 1
    return n


@task(name="cache-teacher-shard", task_run_name="cache_teacher-{out_name}", retries=2,
      retry_delay_seconds=2, cache_policy=NONE)
def cache_shard_on_worker(cfg: PipelineConfig, writer, tokenized_path: str, name: str,
                          out_name: str, model_dir: str, pad_id: int) -> int:
    """:func:`cache_shard` on a Ray worker: it loads the teacher on the device it was given."""
    from cot2align_core.modeling import load_model

    device = resolve_device(cfg.cache_teacher.device)
    model = load_model(model_dir, cfg.teacher.dtype, device)
    return cache_shard.fn(cfg, writer, open_artifact(tokenized_path), name, out_name, model,
                          pad_id, device)


def _cache_shards(cfg: PipelineConfig, w, tokenized_path: str, todo: list[str],
                  model_dir: str, model, pad_id: int, device: str) -> None:
    """Write the cache shards of the ``todo`` tokenized shards: on Ray, one task per shard
    (each loads the teacher on its GPU); here, one after another with ``model``."""
    out = {name: name.replace("teacher", "cache") for name in todo}
    if todo and cluster.uses_ray(cfg):
        calls = [cluster.ShardCall((out[n],), dict(cfg=cfg, tokenized_path=tokenized_path,
                                                   name=n, out_name=out[n], model_dir=model_dir,
                                                   pad_id=pad_id)) for n in todo]
        cluster.run_shards(cfg, w, cache_shard_on_worker, calls, num_gpus=cluster.shard_gpus(cfg),
                           desc="cache_teacher: shards", stage="cache_teacher")
        return
    tokenized = open_artifact(tokenized_path)
    with Progress(len(todo), "cache_teacher: shards") as bar:
        for name in todo:
            run_shard(cache_shard, cfg, w, tokenized, name, out[name], model, pad_id, device)
            bar.update()
            kill_point("cache_teacher", "shard", len(w.done_shards()))


@task(name="cache_teacher", cache_policy=NONE)
def cache_teacher_stage(cfg: PipelineConfig, key: StageKey, fp: str,
                        upstream: dict[str, StageRef], force: bool = False) -> StageRef:
    def body(w) -> dict:
        from cot2align_core.modeling import load_model
        from cot2align_core.tokenization import pad_token_id

        tokenized = open_artifact(upstream["tokenize"].path)
        names = [s.name for s in tokenized.shards_of("teacher")]
        todo = [n for n in names if not w.has_shard(n.replace("teacher", "cache"))]
        on_ray = cluster.uses_ray(cfg)
        # On Ray the workers run the teacher; here it only gives its embedding matrix.
        device = "cpu" if on_ray else resolve_device(cfg.cache_teacher.device)
        tok = load_side_tokenizer(cfg, "teacher", upstream)
        need_embeddings = not w.has_file("teacher_embeddings.safetensors")
        model_dir = teacher_model_path(cfg, upstream) if todo or need_embeddings else None
        model = None
        if (todo and not on_ray) or need_embeddings:
            model = load_model(model_dir, cfg.teacher.dtype, device)
        if need_embeddings:
            dt = getattr(torch, cfg.cache_teacher.dtype)
            embed = model.get_input_embeddings().weight.detach().to(dt).cpu()
            head = model.get_output_embeddings().weight.detach().to(dt).cpu() if cfg.needs_teacher_head() else None
            save_teacher_embeddings(w, embed, head)
        _cache_shards(cfg, w, upstream["tokenize"].path, todo, model_dir, model,
                      pad_token_id(tok), device)
        rows = sum(s.rows for s in w.shard_records())
        return {"rows": rows, "layers": cached_teacher_layers(cfg),
                "dtype": cfg.cache_teacher.dtype, "topk": cfg.needed_topk(),
                "lm_head": cfg.needs_teacher_head()}

    return run_stage(cfg, key, fp, upstream, body, force=force)
