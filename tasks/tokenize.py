"""Stage ``tokenize``: every example in its standard and CoT forms, for both tokenizers.

The standard form is the Alpaca prompt -> gold answer; the CoT form is the paper's CoT prompt
-> the teacher's rationale + "Therefore, the answer is: " + gold answer, for examples whose
rationale was kept by ``generate`` (the first kept sample). One shard per side per chunk of
examples (``teacher-00000``, ``student-00000``...). With a MinED KD base, each student row
carries its alignment to the teacher row of the same example and form.
"""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from cot2align_core.config import PipelineConfig
from cot2align_core.fitting import FitStats, FittedExample, fit_example
from cot2align_core.tokenization import TokenizedExample, response_ids
from storage.schemas import read_rows, tokenized_table
from storage.store import open_artifact
from tasks.common import StageRef, load_side_tokenizer, logger, tokenizer_path
from tasks import cluster
from tasks.registry import StageKey
from tasks.stage import Progress, kill_point, run_shard, run_stage


def chosen_rationales(generate_artifact) -> dict[str, str]:
    """Example id -> the first kept rationale (lowest sample index)."""
    table = generate_artifact.read_kind("rationales", ["id", "rationale", "kept", "sample_index"])
    best: dict[str, tuple[int, str]] = {}
    for r in table.to_pylist():
        if r["kept"] and (r["id"] not in best or r["sample_index"] < best[r["id"]][0]):
            best[r["id"]] = (r["sample_index"], r["rationale"])
    return {k: v for k, (_, v) in best.items()}


def example_forms(rows: list[dict], rationales: dict[str, str]) -> list[tuple[dict, str, str | None]]:
    out = []
    for row in rows:
        out.append((row, "standard", None))
        if row["id"] in rationales:
            out.append((row, "cot", rationales[row["id"]]))
    return out


def _abs(path: str) -> str:
    import os

    return os.path.abspath(path) if os.path.exists(path) else path


def as_row(ex: TokenizedExample) -> dict:
    return dict(id=ex.id, form=ex.form, text=ex.text, input_ids=ex.input_ids,
                response_mask=ex.response_mask, offsets_start=ex.offsets_start,
                offsets_end=ex.offsets_end, prompt_tokens=ex.prompt_tokens)


@task(name="tokenize-shard", task_run_name="tokenize-shard-{index}", retries=1, cache_policy=NONE)
def tokenize_shard(cfg: PipelineConfig, writer, index: int, items, toks, mined: bool) -> dict:
    t = cfg.tokenize
    stats = FitStats()
    fitted = [stats.add(fit_example(row, form, rationale, toks, max_length=t.max_length,
                                    max_prompt_length=t.max_prompt_length,
                                    mode=t.truncate_input))
              for row, form, rationale in items]
    kept = [f for f in fitted if isinstance(f, FittedExample)]
    encoded = {side: [f.sides[side] for f in kept] for side in toks}
    teacher_rows = [as_row(e) for e in encoded["teacher"]]
    student_rows = [as_row(e) for e in encoded["student"]]
    if mined:
        from cot2align_core.mined import TokenNormalizer, alignment_tensor, min_edit_alignment

        norm = {side: TokenNormalizer.from_tokenizer(tok) for side, tok in toks.items()}
        for srow, s_ex, t_ex in zip(student_rows, encoded["student"], encoded["teacher"]):
            t_strs = norm["teacher"].tokens(toks["teacher"], response_ids(t_ex))
            s_strs = norm["student"].tokens(toks["student"], response_ids(s_ex))
            pairs = min_edit_alignment(t_strs, s_strs)
            srow["mined_alignment"] = alignment_tensor(pairs, len(s_strs)).tolist()
    writer.write_shard(f"teacher-{index:05d}", tokenized_table(teacher_rows, "teacher"),
                       kind="teacher")
    kill_point("tokenize", "half-shard", index)  # crash tests: a task killed between its shards
    writer.write_shard(f"student-{index:05d}", tokenized_table(student_rows, "student"),
                       kind="student", info={"fit": stats.as_dict()})
    return stats.as_dict()


def _tokenize_chunks(cfg: PipelineConfig, w, chunks: list, toks: dict, mined: bool) -> None:
    """Write the chunks' shards not yet whole: on Ray, one CPU task per chunk; here, one after
    another."""
    names = [(f"teacher-{i:05d}", f"student-{i:05d}") for i in range(len(chunks))]
    todo = [i for i, pair in enumerate(names) if not all(map(w.has_shard, pair))]
    if todo and cluster.uses_ray(cfg):
        calls = [cluster.ShardCall(names[i], dict(cfg=cfg, index=i, items=chunks[i], toks=toks,
                                                  mined=mined)) for i in todo]
        cluster.run_shards(cfg, w, tokenize_shard, calls, num_gpus=0, desc="tokenize: shards",
                           stage="tokenize")
        return
    with Progress(len(chunks), "tokenize: shards") as bar:
        for i in range(len(chunks)):
            if i in todo:
                run_shard(tokenize_shard, cfg, w, i, chunks[i], toks, mined)
            bar.update()


@task(name="tokenize", cache_policy=NONE)
def tokenize_stage(cfg: PipelineConfig, key: StageKey, fp: str, upstream: dict[str, StageRef],
                   force: bool = False) -> StageRef:
    def body(w) -> dict:
        rows = read_rows(open_artifact(upstream["prepare"].path), "train")
        rationales = chosen_rationales(open_artifact(upstream["generate"].path))
        items = example_forms(rows, rationales)
        toks = {side: load_side_tokenizer(cfg, side, upstream) for side in ("teacher", "student")}
        # Where the tokenizers are, for `cot2align inspect` (info is not fingerprinted).
        w.info["tokenizers"] = {side: _abs(tokenizer_path(cfg, side, upstream)) for side in toks}
        size = cfg.tokenize.shard_size
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        mined = cfg.needs_mined_alignment()
        _tokenize_chunks(cfg, w, chunks, toks, mined)
        fit = FitStats()  # every shard's counts, whether written now or before a crash
        for rec in w.shard_records():
            if rec.kind == "student":
                fit += FitStats.from_dict(rec.info["fit"])
        logger().info(fit.log_line("tokenize"))
        w.info["fit"] = fit.as_dict()
        n_cot = sum(1 for _, f, _ in items if f == "cot")
        return {"examples": len(rows), "standard": len(rows), "cot": n_cot, **fit.summary(),
                "mined_alignment": mined}

    return run_stage(cfg, key, fp, upstream, body, force=force)
