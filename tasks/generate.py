"""Stage ``generate``: the teacher writes a chain-of-thought rationale for each training row.

The paper's CoT prompt ("... Let's think step by step.\\n") goes to the teacher through a
generation backend (vLLM in-process when installed, transformers otherwise). Each example's
sampling seed derives from (generate.seed, example id), so a shard's rows do not depend on which
other rows share its batch and a resumed run writes the same bytes. Shards of
``generate.shard_size`` rows are tasks with retries; a rerun after a crash writes only the
missing ones. With ``generate.filter_correct`` a rationale is kept only when its final answer
matches gold; counts of kept and filtered rows go to the manifest.
"""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from cot2align_core.answers import checker, split_rationale
from cot2align_core.config import PipelineConfig
from cot2align_core.data import has_cot_form
from cot2align_core.prompts import ANSWER_PREFIX, cot_prompt
from storage.schemas import rationales_table, read_rows
from storage.store import open_artifact
from tasks.common import StageRef, fitted_rows, logger, resolve_device, teacher_model_path
from tasks import cluster
from tasks.registry import StageKey
from tasks.stage import Progress, kill_point, run_shard, run_stage

def judge(cfg: PipelineConfig, rationale: str, answer_text: str,
          gold: str) -> tuple[str, bool, str | None]:
    """(prediction, kept, filter_reason) of one generated rationale."""
    prediction = answer_text
    if cfg.data.checkable_answers:
        check = checker(cfg.data.answer_format)
        prediction = (check.extract(ANSWER_PREFIX + answer_text) or "") if answer_text else ""
        if cfg.generate.filter_correct and not check.correct(prediction or None, gold):
            return prediction, False, "wrong_answer" if prediction else "no_answer"
    if not rationale.strip():
        return prediction, False, "empty"
    return prediction, True, None


@task(name="generate-shard", task_run_name="generate-{name}", retries=2, retry_delay_seconds=2,
      cache_policy=NONE)
def generate_shard(cfg: PipelineConfig, writer, name: str, rows: list[dict], backend) -> dict:
    from cot2align_core.generation import SamplingConfig, derive_seed

    g = cfg.generate
    sampling = SamplingConfig(n=g.n, temperature=g.temperature, top_p=g.top_p,
                              max_tokens=g.max_tokens, seed=g.seed)
    prompts = [cot_prompt(r) for r in rows]
    seeds = [derive_seed(g.seed, r["id"]) for r in rows]
    outputs = backend.generate(prompts, sampling, seeds, ids=[r["id"] for r in rows],
                               timeout_s=g.shard_timeout_s)
    out, kept = [], 0
    for row, prompt, seed, completions in zip(rows, prompts, seeds, outputs):
        for j, c in enumerate(completions):
            rationale, answer_text = split_rationale(c.text)
            prediction, ok, reason = judge(cfg, rationale, answer_text, row["output"])
            kept += ok
            out.append(dict(id=row["id"], prompt=prompt, rationale=rationale,
                            answer=row["output"], prediction=prediction, kept=ok,
                            filter_reason=reason, sample_index=j, temperature=g.temperature,
                            top_p=g.top_p, max_tokens=g.max_tokens, seed=seed + j))
    writer.write_shard(name, rationales_table(out), kind="rationales",
                       info={"kept": kept, "filtered": len(out) - kept})
    return {"rows": len(out), "kept": kept}


def open_backend(cfg: PipelineConfig, model_dir: str, kind: str, tokenizer=None,
                 engine_kwargs: dict | None = None):
    from cot2align_core.generation import HFOptions, VLLMOptions, make_backend

    g = cfg.generate
    device = resolve_device("auto")
    return make_backend(
        kind, model_dir,
        vllm=VLLMOptions(tensor_parallel_size=g.tensor_parallel_size,
                         gpu_memory_utilization=g.gpu_memory_utilization,
                         dtype=cfg.teacher.dtype, max_model_len=g.max_model_len,
                         engine_kwargs=engine_kwargs or {}),
        hf=HFOptions(device=device, dtype=cfg.teacher.dtype, max_model_len=g.max_model_len),
    )


@task(name="generate-shard", task_run_name="generate-{name}", retries=2, retry_delay_seconds=2,
      cache_policy=NONE)
def generate_shard_on_worker(cfg: PipelineConfig, writer, name: str, rows: list[dict],
                             model_dir: str) -> dict:
    """:func:`generate_shard` on a Ray worker, with an engine of its own on the GPUs the task
    was given (a live engine cannot travel). A tensor-parallel vLLM engine runs its ranks as
    processes of this worker (``mp``): it must not ask Ray for GPUs the task already holds."""
    extra = {"distributed_executor_backend": "mp"} if cfg.generate.tensor_parallel_size > 1 else {}
    backend = open_backend(cfg, model_dir, cfg.generate.backend, engine_kwargs=extra)
    try:
        return {**generate_shard.fn(cfg, writer, name, rows, backend),
                "backend": type(backend).__name__}
    finally:
        backend.close()


def _generate_shards(cfg: PipelineConfig, w, shards: dict[str, list[dict]], todo: list[str],
                     model_dir: str) -> str:
    """Write the ``todo`` shards: on Ray, one task per shard; here, one after another through
    one engine. Returns the backend used, for the summary."""
    if cluster.uses_ray(cfg):
        calls = [cluster.ShardCall((name,), dict(cfg=cfg, name=name, rows=shards[name],
                                                  model_dir=model_dir)) for name in todo]
        gpus = cluster.shard_gpus(cfg, cfg.generate.tensor_parallel_size)
        done = cluster.run_shards(cfg, w, generate_shard_on_worker, calls, num_gpus=gpus,
                                  desc="generate: rationale shards", stage="generate")
        return f"{done[0]['backend']} on ray workers"
    backend = open_backend(cfg, model_dir, cfg.generate.backend)
    try:
        with Progress(len(todo), "generate: rationale shards") as bar:
            for name in todo:
                run_shard(generate_shard, cfg, w, name, shards[name], backend)
                bar.update()
                kill_point("generate", "shard", len(w.done_shards()))
    finally:
        backend.close()
    return type(backend).__name__


@task(name="generate", cache_policy=NONE)
def generate_stage(cfg: PipelineConfig, key: StageKey, fp: str, upstream: dict[str, StageRef],
                   force: bool = False) -> StageRef:
    def body(w) -> dict:
        candidates = [r for r in read_rows(open_artifact(upstream["prepare"].path), "train")
                      if has_cot_form(r, cfg.data.cot_requires_input)]
        rows, fit = fitted_rows(cfg, upstream, candidates, "cot")
        logger().info(fit.log_line("generate"))
        w.info["fit"] = fit.as_dict()
        size = cfg.generate.shard_size
        shards = {f"rationales-{i // size:05d}": rows[i:i + size] for i in range(0, len(rows), size)}
        todo = [n for n in shards if not w.has_shard(n)]
        if len(todo) < len(shards):
            logger().info("generate: %d of %d shards already done, resuming",
                          len(shards) - len(todo), len(shards))
        used = "none (all shards done)"
        if todo:
            used = _generate_shards(cfg, w, shards, todo, teacher_model_path(cfg, upstream))
        kept = sum(s.info.get("kept", 0) for s in w.shard_records())
        total = sum(s.rows for s in w.shard_records())
        return {"examples": len(candidates), **fit.summary(), "rationales": total,
                "kept": kept, "kept_rate": round(kept / max(total, 1), 4),
                "filtered": total - kept, "backend": used}

    return run_stage(cfg, key, fp, upstream, body, force=force)
