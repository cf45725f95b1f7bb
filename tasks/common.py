"""What every stage task shares: the stage graph, fingerprints, references, logging.

A stage's artifact lives at ``<store>/<stage>/<fingerprint>/``; the fingerprint hashes the
config fields the stage reads (:func:`cot2align_core.config.stage_params`), its upstream
fingerprints and its format version. :func:`plan` computes every fingerprint of a config
without running anything, so a single stage can find its upstream artifacts and a rerun of a
finished pipeline finds everything in place.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from cot2align_core.config import PipelineConfig, stage_params
from storage.store import ArtifactStore, fingerprint

# Bump a stage's version when what it writes changes meaning or layout.
STAGE_VERSIONS = {
    "prepare": 1, "teacher_sft": 1, "generate": 1, "tokenize": 1,
    "cache_teacher": 1, "distill": 1, "evaluate": 1,
}


class StageError(RuntimeError):
    """A stage that cannot run; the message says what is missing and what to run."""


@dataclass(frozen=True)
class StageRef:
    """The small reference a stage task returns (never tensors): where its artifact is."""

    stage: str
    fingerprint: str
    path: str
    reused: bool = False
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def upstream_of(cfg: PipelineConfig, stage: str) -> list[str]:
    """The stages whose artifacts ``stage`` reads, in this config (``distill:<name>`` is the
    student of evaluation baseline ``name``)."""
    sft = ["teacher_sft"] if cfg.teacher_sft.enabled else []
    baselines = [f"distill:{name}" for name in cfg.evaluate.baselines]
    return {
        "prepare": [],
        "teacher_sft": ["prepare"],
        "generate": ["prepare", *sft],
        "tokenize": ["prepare", "generate"],
        "cache_teacher": ["prepare", "tokenize", *sft],
        "distill": ["prepare", "tokenize", "cache_teacher"],
        "evaluate": ["prepare", *sft, "distill", *baselines],
    }[stage]


def plan(cfg: PipelineConfig) -> dict[str, str]:
    """Fingerprint of every stage of this config (plus ``distill:<baseline>`` variants)."""
    fps: dict[str, str] = {}
    order = ["prepare", "teacher_sft", "generate", "tokenize", "cache_teacher", "distill"]
    for stage in order:
        if stage == "teacher_sft" and not cfg.teacher_sft.enabled:
            continue
        fps[stage] = fingerprint(stage, stage_params(cfg, stage),
                                 {u: fps[u] for u in upstream_of(cfg, stage)},
                                 STAGE_VERSIONS[stage])
    for name, variant in baseline_configs(cfg).items():
        fps[f"distill:{name}"] = fingerprint(
            "distill", stage_params(variant, "distill"),
            {u: fps[u] for u in upstream_of(variant, "distill")}, STAGE_VERSIONS["distill"])
    fps["evaluate"] = fingerprint("evaluate", stage_params(cfg, "evaluate"),
                                  {u: fps[u] for u in upstream_of(cfg, "evaluate")},
                                  STAGE_VERSIONS["evaluate"])
    return fps


def baseline_configs(cfg: PipelineConfig) -> dict[str, PipelineConfig]:
    """A copy of the config per evaluation baseline, its distill objective replaced."""
    out = {}
    for name, objective in cfg.evaluate.baselines.items():
        variant = cfg.model_copy(deep=True)
        variant.distill.objective = objective
        out[name] = variant
    return out


def upstream_refs(store: ArtifactStore, cfg: PipelineConfig, stage: str,
                  fps: dict[str, str] | None = None) -> dict[str, StageRef]:
    """The complete upstream artifacts of ``stage`` for this config, or a StageError."""
    fps = fps or plan(cfg)
    refs = {}
    for up in upstream_of(cfg, stage):
        name = up.split(":")[0]
        art = store.get(name, fps[up])
        if art is None:
            raise StageError(
                f"stage {stage!r} needs the {up!r} artifact of this config "
                f"({store.root}/{name}/{fps[up]}), which is missing or incomplete. "
                f"Run `cot2align stage {name} CONFIG` first, or the whole pipeline with "
                "`cot2align run CONFIG`."
            )
        refs[up] = StageRef(stage=name, fingerprint=fps[up], path=str(art.path), reused=True)
    return refs


def logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run, a plain logger elsewhere."""
    try:
        from prefect import get_run_logger
        from prefect.exceptions import MissingContextError

        try:
            return get_run_logger()
        except MissingContextError:
            pass
    except ImportError:  # pragma: no cover
        pass
    return logging.getLogger("cot2align")


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    box = {"start": time.time()}
    try:
        yield box
    finally:
        box["seconds"] = time.time() - box["start"]


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"device {name!r} was asked for but CUDA is not available here; "
                         "set the stage's device to 'auto' or 'cpu'")
    return name


def teacher_model_path(cfg: PipelineConfig, upstream: dict[str, StageRef]) -> str:
    """The teacher to load: the fine-tuned one of teacher_sft, else the configured pretrained."""
    from pathlib import Path

    if "teacher_sft" in upstream:
        return str(Path(upstream["teacher_sft"].path) / "model")
    return cfg.teacher.pretrained


def tokenizer_path(cfg: PipelineConfig, side: str, upstream: dict[str, StageRef]) -> str:
    """Where ``side``'s tokenizer is: trained by prepare (scratch models) or the pretrained's."""
    from pathlib import Path

    model = cfg.teacher if side == "teacher" else cfg.student
    if model.scratch is not None:
        return str(Path(upstream["prepare"].path) / "tokenizers" / side)
    return model.pretrained


def load_side_tokenizer(cfg: PipelineConfig, side: str, upstream: dict[str, StageRef]):
    """The tokenizer of ``side``, checked; a missing pad token falls back to eos, with a note."""
    from cot2align_core.modeling import load_tokenizer
    from cot2align_core.tokenization import check_tokenizer

    tok = load_tokenizer(tokenizer_path(cfg, side, upstream))
    check_tokenizer(tok, side)
    if tok.pad_token_id is None:
        logger().warning(
            "%s tokenizer has no pad token: padding with its eos token (id %d); padded "
            "positions are masked out of every loss. Set tokenizer.pad_token to silence this.",
            side, tok.eos_token_id)
    return tok


def preflight(cfg: PipelineConfig) -> None:
    """Checks that fail in seconds what would otherwise fail deep inside a stage."""
    import os

    from cot2align_core.data import DataError

    for key in ("train_path", "eval_path"):
        path = getattr(cfg.data, key)
        if cfg.data.source == "jsonl" and path and not os.path.isfile(os.path.expandvars(path)):
            raise DataError(f"data.{key}: file not found: {path} (run from the directory the "
                            "path is relative to, or give an absolute path)")
    ArtifactStore(cfg.store).check_writable()
    for side, model in (("teacher", cfg.teacher), ("student", cfg.student)):
        ref = model.pretrained
        if ref is None:
            continue
        looks_like_path = ref.startswith(("/", ".", "~")) or ref.count("/") > 1
        if looks_like_path and not os.path.exists(os.path.expanduser(ref)):
            raise StageError(
                f"{side}.pretrained: {ref!r} does not exist. Give a folder written by "
                "save_pretrained, or a hub id (org/name) cached on this machine.")
