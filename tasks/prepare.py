"""Stage ``prepare``: the task's rows, validated, as Parquet; tokenizers of scratch models.

Writes ``train.parquet`` / ``eval.parquet`` (id, instruction, input, output, rationale) and,
for a model built from scratch, its tokenizer trained on the training texts of both forms under
``tokenizers/<side>/``. Bad rows stop the stage with their line numbers (or are skipped and
counted, with ``data.on_invalid_rows: skip``).
"""
from __future__ import annotations

import os

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NONE

from cot2align_core.config import PipelineConfig
from cot2align_core.data import LoadedSplit, read_jsonl, validate_rows
from tasks.common import StageRef, logger
from tasks.stage import open_store, run_stage

ROWS_SCHEMA = pa.schema([
    ("id", pa.string()), ("instruction", pa.string()), ("input", pa.string()),
    ("output", pa.string()), ("rationale", pa.string()),
])


def load_splits(cfg: PipelineConfig) -> dict[str, LoadedSplit]:
    d = cfg.data
    if d.source == "demo":
        from cot2align_core.demo_task import make_demo_rows

        task_args = dict(n_operands=d.demo.n_operands, min_operand=d.demo.min_operand,
                         max_operand=d.demo.max_operand, ops=d.demo.ops)
        train = make_demo_rows(d.demo.n_train, d.demo.seed, split="train", **task_args)
        test = make_demo_rows(d.demo.n_eval, d.demo.seed, split="test", **task_args)
        return {"train": validate_rows(train, "demo task (train)", "train"),
                "eval": validate_rows(test, "demo task (test)", "eval")}
    out = {"train": read_jsonl(os.path.expandvars(d.train_path), "train", d.on_invalid_rows,
                               d.max_train_rows)}
    if d.eval_path:
        out["eval"] = read_jsonl(os.path.expandvars(d.eval_path), "eval", d.on_invalid_rows,
                                 d.max_eval_rows)
    return out


def rows_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(
        [{k: r.get(k) for k in ROWS_SCHEMA.names} for r in rows], schema=ROWS_SCHEMA)


def read_rows(artifact, split: str) -> list[dict]:
    """The rows of ``split`` ("train" or "eval") of a prepare artifact ([] when absent)."""
    if split not in {s.name for s in artifact.shards}:
        return []
    return artifact.read_table(split).to_pylist()


@task(name="prepare", cache_policy=NONE)
def prepare_stage(cfg: PipelineConfig, fp: str, upstream: dict[str, StageRef],
                  force: bool = False) -> StageRef:
    # Rows are read and validated before the artifact is opened: bad data leaves no trace.
    splits = None if (open_store(cfg).get("prepare", fp) and not force) else load_splits(cfg)

    def body(w) -> dict:
        summary = {}
        for name, split in splits.items():
            w.write_shard(name, rows_table(split.rows))
            summary[f"{name}_rows"] = len(split.rows)
            summary[f"{name}_skipped"] = len(split.skipped)
            if split.skipped:
                w.info[f"{name}_skipped_rows"] = split.skipped[:1000]
                logger().warning("%s: skipped %d invalid rows", split.source, len(split.skipped))
        train_rows = splits["train"].rows
        for side, model in (("teacher", cfg.teacher), ("student", cfg.student)):
            if model.scratch is None:
                continue
            from cot2align_core.modeling import train_tokenizer
            from cot2align_core.sft_data import tokenizer_corpus

            rel = f"tokenizers/{side}"
            if not w.has_file(rel):
                tk = model.scratch.tokenizer
                out = w.file_path(rel)
                train_tokenizer(tokenizer_corpus(train_rows), kind=tk.kind,
                                vocab_size=tk.vocab_size, out_dir=out)
                w.add_file(rel)
            summary[f"{side}_tokenizer"] = f"{model.scratch.tokenizer.kind}"
        return summary

    return run_stage(cfg, "prepare", fp, upstream, body, force=force)
