"""Stage ``prepare``: the task's rows, validated, as Parquet; tokenizers of scratch models.

Writes one shard per split, ``train`` / ``dev`` / ``eval`` (id, instruction, input, output,
rationale; see :data:`storage.schemas.ROWS_SCHEMA`), and, for a model built from scratch, its
tokenizer trained on the training texts of both forms under ``tokenizers/<side>/``. The dev
split (checkpoint selection) is the demo task's own, a file of its own, or rows held out from
train. Bad rows stop the stage with their line numbers (or are skipped and counted, with
``data.on_invalid_rows: skip``).
"""
from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from cot2align_core.config import PipelineConfig
from cot2align_core.data import LoadedSplit, load_splits
from storage.schemas import rows_table
from tasks.common import StageRef, logger
from tasks.registry import StageKey
from tasks.stage import open_store, run_stage


def _train_tokenizers(cfg: PipelineConfig, w, train_rows: list[dict]) -> dict[str, str]:
    from cot2align_core.modeling import train_tokenizer
    from cot2align_core.sft_data import tokenizer_corpus

    out = {}
    for side, model in (("teacher", cfg.teacher), ("student", cfg.student)):
        if model.scratch is None:
            continue
        rel = f"tokenizers/{side}"
        if not w.has_file(rel):
            tk = model.scratch.tokenizer
            train_tokenizer(tokenizer_corpus(train_rows), kind=tk.kind,
                            vocab_size=tk.vocab_size, out_dir=w.file_path(rel))
            w.add_file(rel)
        out[f"{side}_tokenizer"] = model.scratch.tokenizer.kind
    return out


@task(name="prepare", cache_policy=NONE)
def prepare_stage(cfg: PipelineConfig, key: StageKey, fp: str, upstream: dict[str, StageRef],
                  force: bool = False) -> StageRef:
    # Rows are read and validated before the artifact is opened: bad data leaves no trace.
    splits: dict[str, LoadedSplit] | None = None
    if force or open_store(cfg).get("prepare", fp) is None:
        splits = load_splits(cfg.data)

    def body(w) -> dict:
        summary = {}
        for name, split in splits.items():
            w.write_shard(name, rows_table(split.rows))
            summary[f"{name}_rows"] = len(split.rows)
            summary[f"{name}_skipped"] = len(split.skipped)
            if split.skipped:
                w.info[f"{name}_skipped_rows"] = split.skipped[:1000]
                logger().warning("%s: skipped %d invalid rows", split.source, len(split.skipped))
        summary.update(_train_tokenizers(cfg, w, splits["train"].rows))
        return summary

    return run_stage(cfg, key, fp, upstream, body, force=force)
