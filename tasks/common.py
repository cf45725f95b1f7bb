"""What every stage task shares: references to artifacts, upstream lookup, models and
tokenizers by side, devices, logging, preflight checks.

A stage's artifact lives at ``<store>/<stage>/<fingerprint>/``; the stage graph and the
fingerprints are the registry's (:mod:`tasks.registry`).
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from cot2align_core.config import PipelineConfig
from storage.store import ArtifactStore
from tasks.registry import StageKey, plan, upstream_keys


class StageError(RuntimeError):
    """A stage that cannot run; the message says what is missing and what to run."""


@dataclass(frozen=True)
class StageRef:
    """The small reference a stage task returns (never tensors): where its artifact is.
    ``key`` is the stage instance (``tokenize``, ``distill[sft,seed=0]``)."""

    key: str
    fingerprint: str
    path: str
    reused: bool = False
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def stage_key(self) -> StageKey:
        return StageKey.parse(self.key)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def upstream_refs(store: ArtifactStore, cfg: PipelineConfig, key: StageKey,
                  fps: dict[StageKey, str] | None = None) -> dict[str, StageRef]:
    """The complete upstream artifacts of ``key`` for this config, or a StageError naming the
    one that is missing and the command that makes it."""
    fps = fps or plan(cfg)
    refs = {}
    for up in upstream_keys(cfg, key):
        art = store.get(up.stage, fps[up])
        if art is None:
            raise StageError(
                f"stage {str(key)!r} needs the {str(up)!r} artifact of this config "
                f"({store.root}/{up.stage}/{fps[up]}), which is missing or incomplete. "
                f"Run `cot2align stage {up.stage} CONFIG` first, or the whole pipeline with "
                "`cot2align run CONFIG`."
            )
        refs[str(up)] = StageRef(key=str(up), fingerprint=fps[up], path=str(art.path), reused=True)
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


def checked_files(ref: StageRef, relpath: str) -> str:
    """The path of an artifact's side files (a saved model, a tokenizer), re-hashed against
    its manifest first: a damaged file is an error naming it and the repair, never loaded."""
    from storage.store import open_artifact

    art = open_artifact(ref.path)
    art.verify_files(relpath)
    return str(art.file_path(relpath))


def teacher_model_path(cfg: PipelineConfig, upstream: dict[str, StageRef]) -> str:
    """The teacher to load: the fine-tuned one of teacher_sft (checked), else the configured
    pretrained one."""
    if "teacher_sft" in upstream:
        return checked_files(upstream["teacher_sft"], "model")
    return cfg.teacher.pretrained


def tokenizer_path(cfg: PipelineConfig, side: str, upstream: dict[str, StageRef]) -> str:
    """Where ``side``'s tokenizer is: trained by prepare (scratch models; checked) or the
    pretrained model's."""
    model = cfg.teacher if side == "teacher" else cfg.student
    if model.scratch is not None:
        return checked_files(upstream["prepare"], f"tokenizers/{side}")
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


def preflight(cfg: PipelineConfig, keys: list[StageKey] | None = None) -> None:
    """Checks that fail in seconds what would otherwise fail deep inside a stage: data files,
    local model folders, and a store that can hold what the run will write (a store whose
    artifacts are all sound is reused read-only: nothing is written, nothing is asked)."""
    import os

    from cot2align_core.data import DataError

    for key in ("train_path", "dev_path", "eval_path"):
        path = getattr(cfg.data, key)
        if cfg.data.source == "jsonl" and path and not os.path.isfile(os.path.expandvars(path)):
            raise DataError(f"data.{key}: file not found: {path} (run from the directory the "
                            "path is relative to, or give an absolute path)")
    for side, model in (("teacher", cfg.teacher), ("student", cfg.student)):
        ref = model.pretrained
        if ref is None:
            continue
        looks_like_path = ref.startswith(("/", ".", "~")) or ref.count("/") > 1
        if looks_like_path and not os.path.exists(os.path.expanduser(ref)):
            raise StageError(
                f"{side}.pretrained: {ref!r} does not exist. Give a folder written by "
                "save_pretrained, or a hub id (org/name) cached on this machine.")
    store = ArtifactStore(cfg.store)
    fps = plan(cfg)
    keys = list(fps) if keys is None else keys
    if not all(store.check(k.stage, fps[k]).ok for k in keys):
        store.check_writable()


def fitted_rows(cfg: PipelineConfig, upstream: dict[str, StageRef], rows: list[dict],
                form: str):
    """``(rows whose prompt in ``form`` fits, FitStats)``: a row whose prompt is too long for
    ``tokenize.max_prompt_length`` with either tokenizer has its input cut
    (``tokenize.truncate_input``), exactly as tokenize will cut it; a row whose instruction and
    template alone do not fit is left out (and counted)."""
    from cot2align_core.fitting import FitStats, PromptFit, fit_prompt

    toks = {side: load_side_tokenizer(cfg, side, upstream) for side in ("teacher", "student")}
    stats, out = FitStats(), []
    for row in rows:
        fit = stats.add(fit_prompt(row, form, toks, cfg.tokenize.max_prompt_length,
                                   cfg.tokenize.truncate_input))
        if isinstance(fit, PromptFit):
            out.append(dict(fit.row))
    return out, stats


def teacher_num_layers(cfg: PipelineConfig) -> int:
    """The teacher's depth (the objective maps depth-fraction OT layers with it)."""
    if cfg.teacher.scratch is not None:
        return cfg.teacher.scratch.num_layers
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(cfg.teacher.pretrained).num_hidden_layers
    except OSError as exc:
        from cot2align_core.config import ConfigError

        raise ConfigError(
            f"teacher.pretrained: cannot read the config of {cfg.teacher.pretrained!r} "
            "(needed for the teacher's depth, to place the depth-fraction OT layers): "
            f"{str(exc).splitlines()[0]} Download the model first (`huggingface-cli download "
            f"{cfg.teacher.pretrained}`), point teacher.pretrained at a local folder, or use "
            "only the embedding and last layers in ot.layers.") from None


def cached_teacher_layers(cfg: PipelineConfig) -> list[int]:
    """The teacher layers cache_teacher stores: ``cache_teacher.layers`` and every layer an
    objective of the config reads (the last one; a depth-fraction OT layer maps to the
    teacher's own index), in increasing depth with ``-1`` (the last) at the end."""
    layers = set(cfg.cache_teacher.layers) | {-1}
    fractions = any(o.uses_ot and any(x not in ("embedding", "last") for x in o.ot.layers)
                    for o in cfg.objectives())
    if fractions:  # only then the objective module (torch) and the teacher's depth are needed
        from cot2align_core.objective import teacher_layers_needed

        depth = teacher_num_layers(cfg)
        for o in cfg.objectives():
            layers |= set(teacher_layers_needed(o, depth))
    return sorted(layers, key=lambda i: (i == -1, i))


def build_objective(cfg: PipelineConfig, objective_cfg, upstream: dict[str, StageRef],
                    student_dim: int, teacher_dim: int):
    """The student's training objective; MinED's vocabulary map is built from both tokenizers."""
    from cot2align_core.objective import CoT2AlignObjective

    vocab_map = None
    if objective_cfg.uses_kd and objective_cfg.kd_base == "mined":
        from cot2align_core.mined import build_vocab_mapping

        vocab_map = build_vocab_mapping(load_side_tokenizer(cfg, "teacher", upstream),
                                        load_side_tokenizer(cfg, "student", upstream))
    return CoT2AlignObjective(objective_cfg, student_dim=student_dim, teacher_dim=teacher_dim,
                              teacher_num_layers=teacher_num_layers(cfg), vocab_map=vocab_map)


def anchor_maps(cfg: PipelineConfig, objective, upstream: dict[str, StageRef], model,
                teacher_embed) -> int:
    """With ``ot.map_init: anchors``, start the embedding layer's map at the rotation that
    carries the student's embeddings of the tokens spelled the same in both vocabularies onto
    the teacher's (:meth:`cot2align_core.objective.OTAlignment.init_from_anchors`). Returns
    the number of anchor pairs (0 when the option is off)."""
    o = objective.config
    if not (o.uses_ot and o.ot.map_init == "anchors"):
        return 0
    if objective.ot.embedding_map() is None:
        logger().info("ot.map_init 'anchors' has no embedding map to start here (space %s, "
                      "layers %s): every map starts at random", o.ot.space, o.ot.layers)
        return 0
    import torch

    from cot2align_core.mined import same_spelling_pairs

    student_embed = model.get_input_embeddings().weight
    s_ids, t_ids = same_spelling_pairs(load_side_tokenizer(cfg, "teacher", upstream),
                                       load_side_tokenizer(cfg, "student", upstream),
                                       teacher_vocab_size=teacher_embed.shape[0],
                                       student_vocab_size=student_embed.shape[0])
    if len(s_ids) < 2:
        raise ValueError(f"ot.map_init 'anchors': the student's and the teacher's tokenizers "
                         f"share {len(s_ids)} spelling(s), too few to place the embedding "
                         "map; set ot.map_init: random")
    objective.ot.init_from_anchors(
        student_embed.detach()[torch.tensor(s_ids, device=student_embed.device)],
        teacher_embed[torch.tensor(t_ids, device=teacher_embed.device)])
    logger().info("embedding map started on %d tokens spelled the same in both vocabularies",
                  len(s_ids))
    return len(s_ids)


def teacher_tensors(cache_artifact, device: str):
    """(embedding matrix, LM head or None) of the teacher, saved beside its cache, as float32."""
    import torch

    from storage.teacher_embeddings import TEACHER_EMBEDDINGS, load_teacher_embeddings

    cache_artifact.verify_files(TEACHER_EMBEDDINGS)
    emb = load_teacher_embeddings(cache_artifact)
    embed = emb["embed"].to(device=device, dtype=torch.float32)
    head = emb.get("lm_head")
    return embed, (None if head is None else head.to(device=device, dtype=torch.float32))
