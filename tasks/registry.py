"""The stage graph, declared once: every stage is one :class:`StageSpec` in :data:`STAGES`.

    prepare -> teacher_sft? -> generate -> tokenize -> cache_teacher -> distill[...] -> evaluate

A record says what the stage reads from the config (``params``: what its fingerprint hashes
besides the upstream fingerprints), which stages it reads (``upstream``), its format version,
and where its Prefect task is (imported only when the stage runs, so that ``plan`` and the
store commands start no Prefect and import no torch). ``plan``, the flows, the command line and
``prefect.yaml`` (checked by a test) all derive from this table; adding a stage is one module
in ``tasks/`` and one row here.

``distill`` has one instance per student and training seed, named by a :class:`StageKey`
(``distill[sft,seed=1]``); every other stage has one instance. Fingerprints hash *resolved*
values (every default filled in by the config model), so a default written out and a default
left out give one fingerprint, and changing a default in the code changes it. An option added
after artifacts exist is hashed only away from the value that behaves as the code did before
it (:data:`ADDED_OPTIONS`), so adding it invalidates nothing; setting it does.
"""
from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

from cot2align_core.config import ConfigError, PipelineConfig
from storage.fingerprint import fingerprint

__all__ = ["StageKey", "StageSpec", "STAGES", "STAGE_NAMES", "spec", "enabled_specs", "instances",
           "upstream_keys", "plan", "stage_params"]


@dataclass(frozen=True, order=True)
class StageKey:
    """One instance of a stage: ``prepare``, or a student ``distill[<label>,seed=<seed>]``."""

    stage: str
    label: str | None = None
    seed: int | None = None

    _PATTERN = re.compile(r"^(?P<stage>[a-z_]+)(\[(?P<label>[^,\]]+),seed=(?P<seed>-?\d+)\])?$")

    def __str__(self) -> str:
        if self.label is None:
            return self.stage
        return f"{self.stage}[{self.label},seed={self.seed}]"

    @classmethod
    def parse(cls, text: str) -> "StageKey":
        m = cls._PATTERN.match(text.strip())
        if m is None or m["stage"] not in STAGE_NAMES:
            raise ConfigError(f"{text!r} is not a stage: expected one of {', '.join(STAGE_NAMES)}, "
                              "or a student as distill[<label>,seed=<n>]")
        seed = None if m["seed"] is None else int(m["seed"])
        return cls(m["stage"], m["label"], seed)


def _always(cfg: PipelineConfig) -> bool:
    return True


@dataclass(frozen=True)
class StageSpec:
    """One stage of the graph.

    Attributes
    ----------
    name : the stage's name, also its folder in the store.
    version : bump it when what the stage writes changes meaning or layout.
    upstream : stages whose artifacts it reads (every enabled instance of each).
    params : ``(cfg, key, digest) -> dict``: the resolved config values the stage reads, and
        the content digests (``digest(path) -> sha256 | None``) of the local files and folders
        it reads (data files, model and tokenizer folders; None for a hub id).
    task : ``"module:function"`` of its Prefect task, imported when the stage runs.
    enabled : ``cfg -> bool``: whether this config has the stage at all.
    per_student : one instance per (student, training seed) instead of one.
    gpu : the stage runs models (tagged for concurrency limits on GPU machines).
    """

    name: str
    version: int
    upstream: tuple[str, ...]
    params: Callable[[PipelineConfig, StageKey, "Digest"], dict[str, Any]]
    task: str
    enabled: Callable[[PipelineConfig], bool] = _always
    per_student: bool = False
    gpu: bool = False
    description: str = ""

    def load_task(self):
        module, _, name = self.task.partition(":")
        return getattr(importlib.import_module(module), name)


# ------------------------------------------------------------------------- what stages read
Digest = Callable[[str | None], str | None]


def _dump(model) -> dict[str, Any]:
    return model.model_dump(mode="json")


#: Options added to the objective after artifacts were made with it: (path in the dumped
#: objective, the value that behaves as the code did before the option existed). At that value
#: they are left out of the fingerprint.
ADDED_OPTIONS: tuple[tuple[tuple[str, ...], Any], ...] = (
    (("ot", "map"), "linear"),
    (("ot", "center"), False),
    (("ot", "map_init"), "random"),
)


def _objective_params(objective) -> dict[str, Any]:
    out = _dump(objective)
    for path, before in ADDED_OPTIONS:
        *parents, leaf = path
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and node.get(leaf) == before:
            del node[leaf]
    return out


def _scratch_tokenizers(cfg: PipelineConfig) -> dict[str, Any]:
    return {side: (_dump(m.scratch.tokenizer) if m.scratch is not None else None)
            for side, m in (("teacher", cfg.teacher), ("student", cfg.student))}


def _prepare_params(cfg: PipelineConfig, key: StageKey, digest: Digest) -> dict[str, Any]:
    # The data section, the data files' contents, and, for models built from scratch, their
    # tokenizer settings (prepare trains those tokenizers); nothing a student's dtype or LoRA
    # rank could rerun.
    files = {}
    if cfg.data.source == "jsonl":
        files = {k: digest(os.path.expandvars(p)) for k in ("train_path", "dev_path", "eval_path")
                 if (p := getattr(cfg.data, k))}
    return {"data": _dump(cfg.data), "data_files": files,
            "scratch_tokenizers": _scratch_tokenizers(cfg)}


def _model(cfg: PipelineConfig, side: str, digest: Digest) -> dict[str, Any]:
    """A model's settings and, for a local folder, its content."""
    m = cfg.teacher if side == "teacher" else cfg.student
    return {**_dump(m), "content": digest(m.pretrained)}


def _teacher_sft_params(cfg: PipelineConfig, key: StageKey, digest: Digest) -> dict[str, Any]:
    t = _dump(cfg.teacher_sft)
    t["training"].pop("device")
    # The SFT examples cut prompts at tokenize.max_prompt_length.
    return {"teacher": _model(cfg, "teacher", digest), "teacher_sft": t, "seed": cfg.seed,
            "max_prompt_length": cfg.tokenize.max_prompt_length,
            "truncate_input": cfg.tokenize.truncate_input,
            "cot_requires_input": cfg.data.cot_requires_input}


def _tokenizers(cfg: PipelineConfig, digest: Digest) -> dict[str, Any]:
    """Pretrained tokenizers by name and content; scratch ones come with prepare's fingerprint."""
    return {side: {"name": m.pretrained, "content": digest(m.pretrained)}
            for side, m in (("teacher", cfg.teacher), ("student", cfg.student))}


def _prompt_fit(cfg: PipelineConfig, digest: Digest) -> dict[str, Any]:
    """What decides how a long prompt is cut: the limit, the mode, and both tokenizers (the
    cut text must fit both)."""
    return {"max_prompt_length": cfg.tokenize.max_prompt_length,
            "truncate_input": cfg.tokenize.truncate_input, "tokenizers": _tokenizers(cfg, digest)}


def _generate_params(cfg: PipelineConfig, key: StageKey, digest: Digest) -> dict[str, Any]:
    g = _dump(cfg.generate)
    g.pop("shard_timeout_s")  # how long to wait, not what is written
    return {"generate": g, "teacher": _model(cfg, "teacher", digest),
            "cot_requires_input": cfg.data.cot_requires_input,
            "prompt_fit": _prompt_fit(cfg, digest)}


def _tokenize_params(cfg: PipelineConfig, key: StageKey, digest: Digest) -> dict[str, Any]:
    return {"tokenize": _dump(cfg.tokenize), "mined": cfg.needs_mined_alignment(),
            "cot_requires_input": cfg.data.cot_requires_input,
            "tokenizers": _tokenizers(cfg, digest)}


def _cache_teacher_params(cfg: PipelineConfig, key: StageKey, digest: Digest) -> dict[str, Any]:
    from tasks.common import cached_teacher_layers

    c = _dump(cfg.cache_teacher)
    c.pop("device")
    c.pop("batch_size")  # does not change what is cached
    c["layers"] = cached_teacher_layers(cfg)  # the config's and every objective's
    # The teacher is the SFT one (its fingerprint covers the teacher) or the pretrained one.
    return {"cache_teacher": c, "topk": cfg.needed_topk(), "lm_head": cfg.needs_teacher_head(),
            "teacher": _model(cfg, "teacher", digest)}


def _distill_params(cfg: PipelineConfig, key: StageKey, digest: Digest) -> dict[str, Any]:
    st = cfg.resolve_student(key.label)
    t = _dump(st.training)
    t.pop("device")
    selection = _dump(cfg.distill.selection)
    selection["metric"] = cfg.selection_metric()
    # The label is not hashed: two labels with one objective share one artifact.
    return {"objective": _objective_params(st.objective), "training": t,
            "student": _model(cfg, "student", digest),
            "seed": key.seed, "selection": selection if selection["every"] else None,
            "health_every": cfg.distill.health_every}


def _evaluate_params(cfg: PipelineConfig, key: StageKey, digest: Digest) -> dict[str, Any]:
    students = {str(k): k.label for k in instances(cfg, spec("distill"))}
    # The models' dtypes and the teacher are covered by the upstream fingerprints.
    return {"evaluate": _dump(cfg.evaluate), "checkable": cfg.data.checkable_answers,
            "answer_format": cfg.data.answer_format, "students": students,
            "main": cfg.distill.label, "prompt_fit": _prompt_fit(cfg, digest)}


STAGES: tuple[StageSpec, ...] = (
    StageSpec("prepare", 2, (), _prepare_params, "tasks.prepare:prepare_stage",
              description="Validate the task's rows (train, dev, eval) and train the "
                          "tokenizers of models built from scratch."),
    StageSpec("teacher_sft", 1, ("prepare",), _teacher_sft_params,
              "tasks.teacher_sft:teacher_sft_stage", enabled=lambda c: c.teacher_sft.enabled,
              gpu=True, description="Fine-tune the teacher on both forms of the task."),
    StageSpec("generate", 1, ("prepare", "teacher_sft"), _generate_params,
              "tasks.generate:generate_stage", gpu=True,
              description="The teacher writes a chain-of-thought rationale per training row "
                          "(vLLM)."),
    StageSpec("tokenize", 1, ("prepare", "generate"), _tokenize_params,
              "tasks.tokenize:tokenize_stage",
              description="Both forms of every example, tokenized by both tokenizers."),
    StageSpec("cache_teacher", 1, ("prepare", "tokenize", "teacher_sft"), _cache_teacher_params,
              "tasks.cache_teacher:cache_teacher_stage", gpu=True,
              description="The teacher's hidden states at the response positions, cached "
                          "to Parquet."),
    StageSpec("distill", 2, ("prepare", "tokenize", "cache_teacher"), _distill_params,
              "tasks.distill:distill_stage", per_student=True, gpu=True,
              description="Train every student (CoT2Align, baselines, ablations) per training "
                          "seed from the cached teacher states."),
    StageSpec("evaluate", 2, ("prepare", "teacher_sft", "tokenize", "cache_teacher", "distill"),
              _evaluate_params, "tasks.evaluate:evaluate_stage", gpu=True,
              description="Score every student and the teacher on the eval split; write "
                          "the report."),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
_BY_NAME = {s.name: s for s in STAGES}


def spec(name: str) -> StageSpec:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown stage {name!r}; stages are: {', '.join(STAGE_NAMES)}") from None


def enabled_specs(cfg: PipelineConfig) -> list[StageSpec]:
    return [s for s in STAGES if s.enabled(cfg)]


def instances(cfg: PipelineConfig, stage: StageSpec) -> list[StageKey]:
    """The instances of one stage in this config (none when the stage is disabled)."""
    if not stage.enabled(cfg):
        return []
    if not stage.per_student:
        return [StageKey(stage.name)]
    return [StageKey(stage.name, st.label, seed)
            for st in cfg.students() for seed in cfg.training_seeds()]


def upstream_keys(cfg: PipelineConfig, key: StageKey) -> list[StageKey]:
    """The instances whose artifacts ``key`` reads, in this config."""
    return [k for name in spec(key.stage).upstream for k in instances(cfg, spec(name))]


def content_digests(cfg: PipelineConfig) -> Digest:
    """``digest(path)``: the content digest of a local file or folder (cached in the store,
    re-hashed only when a file's size or time changes), None for a hub id or no path."""
    from storage.store import ArtifactStore

    store = ArtifactStore(cfg.store)
    memo: dict[str, str | None] = {}

    def digest(path: str | None) -> str | None:
        if path is None:
            return None
        if path not in memo:
            memo[path] = store.content_digest(path)
        return memo[path]

    return digest


def stage_params(cfg: PipelineConfig, key: StageKey, digest: Digest | None = None) -> dict[str, Any]:
    return spec(key.stage).params(cfg, key, digest or content_digests(cfg))


def plan(cfg: PipelineConfig) -> dict[StageKey, str]:
    """Fingerprint of every stage instance of this config, in run order."""
    digest = content_digests(cfg)
    fps: dict[StageKey, str] = {}
    for stage in enabled_specs(cfg):
        for key in instances(cfg, stage):
            ups = {str(u): fps[u] for u in upstream_keys(cfg, key)}
            fps[key] = fingerprint(stage.name, stage_params(cfg, key, digest), ups, stage.version)
    return fps
