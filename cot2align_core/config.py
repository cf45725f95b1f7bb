"""The pipeline's configuration: one YAML file, validated.

Every section is a pydantic model that forbids unknown keys, so a typo is an error that names
the key's full path (``generate.temprature``) and, where one is close, the key that was meant.
Wrong types are reported the same way. Which fields each stage reads (and so fingerprints) is
declared once, in the stage registry (``tasks/registry.py``).

Students: ``distill.objective`` and ``distill.training`` define the main student;
``distill.students`` declares more students beside it, each as overrides of those two
sections (a grid of baselines and ablations in a few lines), and ``distill.seeds`` trains every
student once per training seed.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

#: KD bases that compare two distributions over one vocabulary (teacher and student share a
#: tokenizer); ``cot2align_core.losses.kd_divergence`` defines them.
SAME_VOCAB_KD_BASES = ("forward_kl", "reverse_kl", "js", "skewed_forward_kl",
                       "skewed_reverse_kl", "tvd")
KD_BASES = ("none", "dskd", "uld", "mined", *SAME_VOCAB_KD_BASES)
#: The temperature each KD base runs at when ``kd_temperature`` is not given: its own paper's
#: or code's. ULD (Boizard et al. 2024) uses 1; DSKD's scripts, which CoT2Align's build on,
#: run DSKD, MinED and vanilla KD at 2.
KD_TEMPERATURES = {"none": 1.0, "dskd": 2.0, "uld": 1.0, "mined": 2.0,
                   **{kind: 2.0 for kind in SAME_VOCAB_KD_BASES}}


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names each bad key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- data
class DemoDataConfig(_Section):
    """The project's arithmetic task (cot2align_core.demo_task): train and eval splits are
    disjoint sets of expressions."""

    n_train: int = Field(2000, ge=1)
    n_dev: int = Field(200, ge=0)
    n_eval: int = Field(200, ge=1)
    seed: int = 0
    n_operands: int = Field(3, ge=2)
    min_operand: int = Field(0, ge=0)
    max_operand: int = Field(9, ge=0)
    ops: str = "+-"


class DataConfig(_Section):
    """Where the task's rows come from.

    ``source: demo`` generates the project's small reasoning task (gold rationales, checkable
    answers). ``source: jsonl`` reads DSKD/Dolly-format files (``instruction``, ``input``,
    ``output``; ``prompt`` and ``rationale`` optional).
    """

    source: Literal["demo", "jsonl"] = "demo"
    demo: DemoDataConfig = DemoDataConfig()
    train_path: str | None = None
    # The dev split (checkpoint selection): a file of its own, or rows held out from train.
    dev_path: str | None = None
    dev_from_train: int = Field(0, ge=0)
    eval_path: str | None = None
    max_train_rows: int | None = Field(None, ge=1)
    max_eval_rows: int | None = Field(None, ge=1)
    # The paper gave a CoT form only to examples with a non-empty ``input`` (every demo row
    # has one).
    cot_requires_input: bool = True
    # What to do with rows missing a field or with an empty output: stop with the row numbers
    # (default), or skip them and count them in the manifest.
    on_invalid_rows: Literal["error", "skip"] = "error"
    # Answers are checkable (exact match is meaningful, rationales can be filtered), and how
    # an answer is read and compared (cot2align_core.answers): the first integer of the answer
    # line ("number"), or the normalised answer line ("text").
    checkable_answers: bool = True
    answer_format: Literal["number", "text"] = "number"

    @model_validator(mode="after")
    def _paths(self):
        if self.source == "jsonl" and not self.train_path:
            raise ValueError("data.source is 'jsonl' but data.train_path is not set")
        if self.dev_path and self.dev_from_train:
            raise ValueError("set data.dev_path or data.dev_from_train, not both")
        return self

    def has_dev_split(self) -> bool:
        if self.source == "demo":
            return self.demo.n_dev > 0
        return bool(self.dev_path or self.dev_from_train)


# --------------------------------------------------------------------------- models
class TokenizerConfig(_Section):
    """A tokenizer trained on the task's text (for models built from scratch)."""

    kind: Literal["bpe", "unigram", "wordpiece", "char"] = "bpe"
    vocab_size: int = Field(512, ge=16)


class ScratchModelConfig(_Section):
    arch: Literal["llama", "gpt2"] = "llama"
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(2, ge=1)
    intermediate_size: int | None = None
    max_position_embeddings: int = 512
    tokenizer: TokenizerConfig = TokenizerConfig()

    @model_validator(mode="after")
    def _heads(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        return self


class ModelConfig(_Section):
    """Either ``pretrained`` (a hub id or a local folder) or ``scratch`` (built on the spot)."""

    pretrained: str | None = None
    scratch: ScratchModelConfig | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # LoRA is how the paper trains the 1.1B+ students; full fine-tuning otherwise.
    lora_rank: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.pretrained is None) == (self.scratch is None):
            raise ValueError("set exactly one of 'pretrained' (hub id or folder) or 'scratch'")
        return self


# --------------------------------------------------------------------------- training
class TrainingConfig(_Section):
    steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    checkpoint_every: int = Field(100, ge=1)
    keep_last: int = Field(2, ge=1)
    max_length: int = Field(512, ge=8)
    device: str = "auto"

    @model_validator(mode="after")
    def _budget(self):
        if self.steps is None and self.epochs is None:
            raise ValueError("set 'steps' or 'epochs'")
        return self


class TeacherSFTConfig(_Section):
    enabled: bool = True
    training: TrainingConfig = TrainingConfig(steps=600, batch_size=32, lr=3e-3)
    # Train on both forms: standard (gold answer) and CoT (gold rationale) where the data has one.
    use_gold_rationales: bool = True


# --------------------------------------------------------------------------- stages
class GenerateConfig(_Section):
    backend: Literal["auto", "vllm", "hf"] = "auto"
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    seed: int = 0
    # Keep only rationales whose final answer matches gold (needs checkable answers).
    filter_correct: bool = False
    shard_size: int = Field(256, ge=1)
    # A shard's generation that takes longer is stopped (the engine killed) and retried.
    shard_timeout_s: float = Field(1800.0, gt=0)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    max_model_len: int | None = None


class TokenizeConfig(_Section):
    max_length: int = Field(512, ge=8)
    # A prompt longer than this (for either tokenizer) has its row's input cut, from its end
    # or its middle, never the instruction or the template; teacher and student keep the same
    # text. Every stage that renders prompts (teacher_sft, generate, tokenize, evaluate) fits
    # them this way.
    max_prompt_length: int = Field(256, ge=1)
    truncate_input: Literal["end", "middle"] = "end"
    shard_size: int = Field(1024, ge=1)
    # Precompute MinED token alignments (student position -> teacher position) for the KD base.
    mined_alignment: bool = False


class CacheTeacherConfig(_Section):
    # HF hidden_states indices of the layers to cache; -1 = the last layer. The embedding layer
    # (index 0) is never cached per example: it is recomputed from the token ids and the
    # teacher's embedding matrix, saved once per artifact.
    layers: list[int] = [-1]
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    # Top-k teacher logits per position for the logit-based KD bases; 0 = none; None = chosen
    # from the distill objective (needed by uld, mined, same-vocabulary KD).
    topk: int | None = None
    batch_size: int = Field(16, ge=1)
    shard_size: int = Field(512, ge=1)
    device: str = "auto"


#: An OT layer: ``"embedding"`` (the token embeddings of the response tokens), ``"last"`` (the
#: last hidden layer) or a depth fraction in (0, 1), mapped to each model by its own depth
#: (hidden_states index ``round(f * num_layers)``; ``0.5`` is the middle layer of both).
OTLayer = Literal["embedding", "last"] | Annotated[float, Field(gt=0, lt=1)]


class OTConfig(_Section):
    """The OT alignment terms of CoT2Align (``cot2align_core.objective``).

    ``eps``, ``max_iter``, ``tol`` and ``grad`` are Sinkhorn's (``cot2align_core.ot``);
    ``max_iter`` is 100, the authors' setting: late in training ``tol`` would take up to 1000
    iterations on some problems, and a batch waits for its slowest one (3.2x slower training
    on the demo, no better student: README "Results"). ``eps`` is in cost units (the cosine
    cost lies in [0, 2]); 0.05 separates aligned from unrelated sequences, the released
    code's 10 does not. ``pairs`` weighs the main and cross pairs; ``weight`` the whole OT
    sum. ``layers`` are the layers of the main pairs, ``cross_layers`` (some of them;
    default: the same) those of the cross pairs.

    ``space``: where the two sides are compared. ``teacher`` (default): one learned linear map
    per layer carries the student's states to the teacher's width; the cached teacher states
    are fixed, so the map cannot make the cost small by collapsing them. ``student``: the
    paper's one learned map, shared by the layers, carries the teacher's states to the
    student's width; both sides then move, and they collapse onto one direction together
    (measured on the demo: projected teacher states at mean cosine 0.98-0.99 to their
    centroid, and a worse student; the table is in ``cot2align_core.objective``).

    ``map``: the learned map(s) of ``space``. ``linear`` (default): affine. ``orthogonal``: a
    semi-orthogonal matrix without bias; it keeps the angles between the states it maps, so
    the cosine cost sees the mapped side's own geometry, rotated: the map cannot gather the
    states onto one direction.

    ``center``: subtract from each side, in the common space, the mean of its valid states over
    the batch (per pair and layer) before the cost. The states of a layer share a direction
    (mean cosine to their centroid 0.47 for the teacher's embedding rows of the demo, 0.78 for
    the mapped student's); the cosine cost of uncentred states is lowered by moving every
    student state towards it, whatever the example. Centred, a collapsed side costs 1 against
    every teacher alike. Default off.

    Both were tried against the demo's weakest term, the embedding layer of the main pair,
    whose own/shuffled ratio depends on the training seed (0.88, 0.94, 0.53 for seeds 0-2 of
    the default objective). On seed 1 (dev-split greedy exact match of the default: 86.5):
    ``orthogonal`` 0.94 (dev 83.5), ``center`` 0.93 with the mapped states spread (0.25
    against 0.79; dev 76.0). Neither lowers it, so neither is the default: the map does not
    collapse there, the student's response-token embeddings do not line up with the
    teacher's token by token. ``map_init: anchors`` (below) does lower it.

    ``map_init``: how the embedding layer's map starts. ``random`` (default): PyTorch's
    initialisation, like every other map. ``anchors``: the rotation that best carries the
    student's input embeddings of the tokens spelled the same in both vocabularies onto the
    teacher's (orthogonal Procrustes; bias 0; ``cot2align_core.objective.OTAlignment.
    init_from_anchors``). It acts on that map only: with ``space: student`` or without the
    embedding layer in ``layers`` (a student derived from one that sets it) it changes nothing.
    Measured on the demo (README "Results"): from a random start seed 1's main embedding term
    ends at own/shuffled 0.94 (no token information); started on the 70 anchors, every seed
    ends at 0.45-0.51. ``configs/demo.yaml`` sets it.

    ``cross_marginals``: ``balanced`` (the paper) transports all of both sides' mass in the
    cross pairs too; ``relaxed_cot`` frees the CoT side's marginal there (each token of the
    standard form sends its mass to the CoT tokens most like it; rationale tokens without a
    counterpart carry none; ``cot2align_core.objective.one_sided_transport``).

    ``layer_weighting``: ``fixed`` sums the layers with weight 1; ``uncertainty`` learns one
    log-variance ``s_l`` per layer (Kendall et al. 2018) and adds ``exp(-s_l) OT_l + s_l``.
    """

    cost: Literal["cosine", "sq_euclidean", "attention"] = "cosine"
    eps: float = Field(0.05, gt=0)
    max_iter: int = Field(100, ge=1)
    tol: float = Field(1e-4, gt=0)
    grad: Literal["envelope", "unroll"] = "envelope"
    layers: list[OTLayer] = ["embedding", "last"]
    cross_layers: list[OTLayer]
    pairs: dict[Literal["main", "cross_a", "cross_b"], Annotated[float, Field(ge=0)]] = {
        "main": 1.0, "cross_a": 1.0, "cross_b": 1.0,
    }
    weight: float = Field(1.0, ge=0)
    space: Literal["teacher", "student"] = "teacher"
    map: Literal["linear", "orthogonal"] = "linear"
    map_init: Literal["random", "anchors"] = "random"
    center: bool = False
    cross_marginals: Literal["balanced", "relaxed_cot"] = "balanced"
    layer_weighting: Literal["fixed", "uncertainty"] = "fixed"

    @model_validator(mode="before")
    @classmethod
    def _cross_layers(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("cross_layers") is None:
            data = {**data, "cross_layers": data.get("layers", cls.model_fields["layers"].default)}
        return data

    @model_validator(mode="after")
    def _distinct_layers(self):
        if not self.layers:
            raise ValueError("ot.layers is empty: give at least one of embedding, last, or a "
                             "depth fraction in (0, 1)")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"ot.layers names a layer twice: {self.layers}")
        extra = [x for x in self.cross_layers if x not in self.layers]
        if extra or len(set(self.cross_layers)) != len(self.cross_layers):
            raise ValueError(f"ot.cross_layers {self.cross_layers} must be distinct layers "
                             f"of ot.layers {self.layers}")
        return self


class ObjectiveConfig(_Section):
    """L = (1-alpha) CE + alpha (kd_weight KD_base + ot.weight sum_pairs sum_layers OT).

    ``ot: null`` is the KD base alone; ``alpha: 0`` plain SFT. ``kd_temperature`` defaults to
    the base's own (:data:`KD_TEMPERATURES`), filled in when the config is read, so the
    resolved value is what is stored and fingerprinted. ``skew`` is the lambda of the skewed
    divergences; ``dskd_divergence`` the divergence of DSKD's t2s KD term. ``projector_lr`` is
    the learning rate of the objective's own parameters (OT maps, DSKD's attention).
    """

    alpha: float = Field(0.5, ge=0, le=1)
    kd_base: Literal[KD_BASES] = "dskd"  # type: ignore[valid-type]
    kd_temperature: float = Field(gt=0)
    kd_weight: float = Field(1.0, ge=0)
    skew: float = Field(0.1, ge=0, le=1)
    dskd_divergence: Literal[SAME_VOCAB_KD_BASES] = "forward_kl"  # type: ignore[valid-type]
    ot: OTConfig | None = OTConfig()
    projector_lr: float = Field(1e-3, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _base_temperature(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kd_temperature") is None:
            base = data.get("kd_base", cls.model_fields["kd_base"].default)
            # An unknown base is reported by its own field; 1.0 only keeps a second,
            # misleading "kd_temperature missing" out of that message.
            data = {**data, "kd_temperature": KD_TEMPERATURES.get(base, 1.0)}
        return data

    @property
    def uses_kd(self) -> bool:
        return self.alpha > 0 and self.kd_base != "none" and self.kd_weight > 0

    @property
    def uses_ot(self) -> bool:
        return (self.alpha > 0 and self.ot is not None and self.ot.weight > 0
                and any(w > 0 for w in self.ot.pairs.values()))

    @property
    def same_vocabulary(self) -> bool:
        """The KD base needs teacher and student to share one vocabulary."""
        return self.kd_base in SAME_VOCAB_KD_BASES

    def describe(self) -> str:
        """``sft``, ``<kd base>``, ``<kd base>+ot`` or ``ot``: what the student trains with."""
        parts = ([self.kd_base] if self.uses_kd else []) + (["ot"] if self.uses_ot else [])
        return "+".join(parts) or "sft"


class SelectionConfig(_Section):
    """The best checkpoint on the dev split, as the paper keeps the best by dev ROUGE-L.

    Every ``every`` steps (and at the last step) the student answers ``max_rows`` dev rows
    greedily in each of ``forms``; the step with the best mean score is the one saved.
    ``every: 0`` keeps the last step's weights.
    """

    every: int = Field(0, ge=0)
    # auto: exact match when answers are checkable, ROUGE-L otherwise.
    metric: Literal["auto", "exact_match", "rougeL"] = "auto"
    max_rows: int = Field(100, ge=1)
    forms: list[Literal["standard", "cot"]] = ["standard", "cot"]
    max_tokens: int = Field(64, ge=1)


class StudentConfig(_Section):
    """One more student: overrides of ``distill.objective`` and ``distill.training``, merged
    key by key (``ot: null`` removes the OT terms; ``ot: {pairs: {cross_b: 0}}`` changes one
    pair's weight and keeps the rest). A derived default follows its source: a student that
    sets another ``kd_base`` without a ``kd_temperature`` runs at that base's own temperature
    (``KD_TEMPERATURES``); one that sets ``ot.layers`` without ``ot.cross_layers`` has its
    cross pairs on those layers."""

    objective: dict[str, Any] = {}
    training: dict[str, Any] = {}


class DistillConfig(_Section):
    # The main student, named ``label`` in reports.
    label: str = "cot2align"
    objective: ObjectiveConfig = ObjectiveConfig()
    training: TrainingConfig = TrainingConfig(epochs=10, batch_size=32, lr=5e-4)
    # More students trained beside the main one (baselines, ablations), by label.
    students: dict[str, StudentConfig] = {}
    # Training seeds (model initialisation and data order): every student is trained once per
    # seed; the report gives mean and std over them. None: the config's ``seed``.
    seeds: list[int] | None = Field(None, min_length=1)
    selection: SelectionConfig = SelectionConfig()
    # Students trained at the same time, each in its own process; 1: one after another.
    parallel: int = Field(1, ge=1)
    # Every N steps the OT terms' health (own vs shuffled teacher, spread of the projected
    # teacher states) is measured on a fixed probe batch and kept in the history; 0: off.
    health_every: int = Field(100, ge=0)


class EvaluateConfig(_Section):
    """The eval split, answered by every student (and the teacher) in each form.

    ``decoding``: ``greedy`` (one pass) and/or ``sampled`` (the paper's: temperature 1, one
    pass per seed of ``seeds``). Paired differences between students come with 95% intervals
    from ``bootstrap`` resamples over eval rows and training seeds.
    """

    decoding: list[Literal["greedy", "sampled"]] = Field(["greedy", "sampled"], min_length=1)
    seeds: list[int] = [0, 1, 2, 3, 4]
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    max_rows: int | None = Field(None, ge=1)
    backend: Literal["auto", "vllm", "hf"] = "hf"
    forms: list[Literal["standard", "cot"]] = ["standard"]
    include_teacher: bool = True
    bootstrap: int = Field(1000, ge=100)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        if isinstance(data, dict) and "baselines" in data:
            raise ValueError(
                "evaluate.baselines has moved to distill.students: declare each baseline there "
                "as overrides of distill.objective, e.g. `distill: {students: {sft: {objective: "
                "{alpha: 0.0, kd_base: none, ot: null}}}}`")
        return data


class ClusterConfig(_Section):
    """Where the stages run: in this process (``engine: local``, the default) or on a Ray
    cluster (``engine: ray``): shard stages submit their shards as Ray tasks with resource
    requests, and distill / teacher_sft train on ``workers`` ranks launched by Ray Train.

    No stage reads this section into its fingerprint: how a stage runs is not what it writes,
    so switching engines reuses every artifact.
    """

    engine: Literal["local", "ray"] = "local"
    # null: start a Ray cluster on this machine for the run (or join RAY_ADDRESS when set);
    # "auto": join the cluster `ray start` runs on this machine; or a cluster's address
    # ("ray://head:10001", "head:6379").
    address: str | None = None
    # A cluster started for the run (address null): the CPUs and GPUs it may use (null: all of
    # this machine's) and its object store size.
    num_cpus: int | None = Field(None, ge=1)
    num_gpus: int | None = Field(None, ge=0)
    object_store_gib: float | None = Field(None, gt=0)
    # GPUs of one shard task of generate (times generate.tensor_parallel_size), cache_teacher
    # and evaluate; null: 1 when the cluster has GPUs, else 0. A fraction packs several small
    # models on one GPU (give vLLM a matching generate.gpu_memory_utilization).
    num_gpus_per_shard: float | None = Field(None, ge=0)
    num_cpus_per_shard: float = Field(1.0, gt=0)
    # Ray's reruns of a shard task whose worker died (killed, out of memory, node lost); an
    # exception raised by the shard is retried by its Prefect task instead.
    worker_retries: int = Field(3, ge=0)
    # Ranks of distill and teacher_sft (Ray Train workers; one GPU each when the cluster has
    # GPUs). The global batch stays training.batch_size: each rank takes batch / workers.
    workers: int = Field(1, ge=1)
    num_cpus_per_worker: float = Field(1.0, gt=0)
    # ddp: a full replica per rank; fsdp: parameters, gradients and optimizer state sharded
    # over the ranks (FSDP2), for a student that does not fit on one GPU.
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # Restarts of the training ranks after one fails; each restart resumes from the last
    # checkpoint.
    max_failures: int = Field(2, ge=0)
    # Ray runtime environment of the tasks and ranks (env_vars, working_dir, pip); null: the
    # project as installed on every node.
    runtime_env: dict[str, Any] | None = None


@dataclass(frozen=True)
class Student:
    """A resolved student: its label and its full objective and training sections."""

    label: str
    objective: ObjectiveConfig
    training: TrainingConfig


#: Settings whose default is derived from another one when the config is read: (source,
#: derived) key paths in an objective section.
_DERIVED = ((("kd_base",), ("kd_temperature",)), (("ot", "layers"), ("ot", "cross_layers")))


def _rederive(merged: dict[str, Any], override: dict[str, Any]) -> None:
    """A student's override that changes a source setting but not the setting derived from it
    gets the derived default again (another KD base: its own temperature; other OT layers:
    the cross pairs on those layers)."""
    def get(d, path):
        for key in path:
            if not isinstance(d, dict) or key not in d:
                return None, False
            d = d[key]
        return d, True

    for source, derived in _DERIVED:
        if get(override, source)[1] and not get(override, derived)[1]:
            parent, found = get(merged, derived[:-1])
            if found and isinstance(parent, dict):
                parent[derived[-1]] = None


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class PipelineConfig(_Section):
    name: str = "demo"
    store: str = "./artifacts"
    seed: int = 0
    # torch intra-op threads for this run (None: torch's default, one per core). Tiny models on
    # a CPU train several times faster on 1 thread than on 2 that contend with other work.
    threads: int | None = Field(None, ge=1)
    data: DataConfig = DataConfig()
    teacher: ModelConfig
    student: ModelConfig
    teacher_sft: TeacherSFTConfig = TeacherSFTConfig()
    generate: GenerateConfig = GenerateConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    cache_teacher: CacheTeacherConfig = CacheTeacherConfig()
    distill: DistillConfig = DistillConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _consistency(self):
        if self.teacher.scratch is not None and not self.teacher_sft.enabled:
            raise ValueError(
                "teacher is built from scratch but teacher_sft.enabled is false: an untrained "
                "teacher writes noise; enable teacher_sft or give teacher.pretrained"
            )
        if self.generate.filter_correct and not self.data.checkable_answers:
            raise ValueError(
                "generate.filter_correct needs data.checkable_answers: true "
                "(free-form answers cannot be checked)"
            )
        students = self.students()  # resolves and validates every student's overrides
        t_scratch, s_scratch = self.teacher.scratch, self.student.scratch
        for st in students:
            if not st.objective.same_vocabulary:
                continue
            if t_scratch and s_scratch:
                differ = t_scratch.tokenizer != s_scratch.tokenizer
            else:
                # A tokenizer trained on the task never shares a pretrained model's vocabulary.
                # (Two pretrained models may share one: checked when the tokenizers load.)
                differ = (t_scratch is None) != (s_scratch is None)
            if differ:
                raise ValueError(
                    f"{self._student_key(st.label)}.kd_base {st.objective.kd_base!r} needs one "
                    "vocabulary, but the teacher and student tokenizers differ; use dskd, uld "
                    "or mined")
        if self.distill.selection.every and not self.data.has_dev_split():
            raise ValueError(
                "distill.selection.every > 0 selects the best checkpoint on a dev split, but "
                "there is none: set data.dev_path, data.dev_from_train (rows held out from "
                "train), or data.demo.n_dev; or set distill.selection.every: 0")
        if self.distill.label in self.distill.students:
            raise ValueError(f"distill.students.{self.distill.label}: the label is the main "
                             "student's (distill.label); pick another name")
        # Every prompt must leave room for a response (prompts are cut to max_prompt_length).
        limits = [("tokenize.max_length", self.tokenize.max_length)]
        if self.teacher_sft.enabled:
            limits.append(("teacher_sft.training.max_length", self.teacher_sft.training.max_length))
        for key, value in limits:
            if self.tokenize.max_prompt_length >= value:
                raise ValueError(
                    f"tokenize.max_prompt_length ({self.tokenize.max_prompt_length}) leaves no room "
                    f"for a response within {key} ({value}); lower it or raise {key}"
                )
        return self

    # ------------------------------------------------------------------ derived
    def _student_key(self, label: str) -> str:
        if label == self.distill.label:
            return "distill.objective"
        return f"distill.students.{label}.objective"

    def students(self) -> list[Student]:
        """Every student this config trains, the main one first, overrides resolved."""
        d = self.distill
        out = [Student(d.label, d.objective, d.training)]
        for label, spec in d.students.items():
            parts = {}
            for section, model, base in (("objective", ObjectiveConfig, d.objective),
                                         ("training", TrainingConfig, d.training)):
                override = getattr(spec, section)
                merged = _deep_merge(base.model_dump(mode="json"), override)
                if section == "objective":
                    _rederive(merged, override)
                try:
                    parts[section] = model.model_validate(merged)
                except ValidationError as err:
                    raise _NestedConfigError(_error_lines(
                        err, model, prefix=f"distill.students.{label}.{section}")) from None
            out.append(Student(label, parts["objective"], parts["training"]))
        return out

    def resolve_student(self, label: str) -> Student:
        for st in self.students():
            if st.label == label:
                return st
        known = [st.label for st in self.students()]
        raise ConfigError(f"no student {label!r} in this config; its students are {known}")

    def training_seeds(self) -> list[int]:
        return list(self.distill.seeds) if self.distill.seeds is not None else [self.seed]

    def objectives(self) -> list[ObjectiveConfig]:
        """The distill objectives this config trains (every student's)."""
        return [st.objective for st in self.students()]

    def needed_topk(self) -> int:
        """Top-k teacher logits the students' KD bases need (0: none)."""
        if self.cache_teacher.topk is not None:
            return self.cache_teacher.topk
        needs = any(o.alpha > 0 and o.kd_base not in ("none", "dskd") for o in self.objectives())
        return 64 if needs else 0

    def needs_teacher_head(self) -> bool:
        """DSKD needs the teacher's LM head (saved once beside the cache)."""
        return any(o.alpha > 0 and o.kd_base == "dskd" for o in self.objectives())

    def needs_mined_alignment(self) -> bool:
        return self.tokenize.mined_alignment or any(
            o.alpha > 0 and o.kd_base == "mined" for o in self.objectives()
        )

    def selection_metric(self) -> str:
        m = self.distill.selection.metric
        if m == "auto":
            return "exact_match" if self.data.checkable_answers else "rougeL"
        return m


# --------------------------------------------------------------------------- loading
def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def _section_of(ann: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the section model a field's annotation holds, whether it sits in a dict or list)."""
    if _is_model(ann):
        return ann, False
    origin = get_origin(ann)
    args = get_args(ann)
    if origin in (dict, list) and args:
        inner, _ = _section_of(args[-1])
        return inner, inner is not None
    for cand in args:  # X | None
        inner, keyed = _section_of(cand)
        if inner is not None:
            return inner, keyed
    return None, False


def _known_keys(model: type[BaseModel], path: list[str | int]) -> list[str]:
    """Field names of the section that ``path`` points into (for did-you-mean hints)."""
    current: Any = model
    parts = list(path)
    while parts:
        part = parts.pop(0)
        if isinstance(part, int) or not _is_model(current):
            return []
        field = current.model_fields.get(part)
        if field is None:
            return []
        current, keyed = _section_of(field.annotation)
        if current is None:
            return []
        if keyed:  # evaluate.baselines.<name>: the next part is a key, not a field
            if not parts:
                return []
            parts.pop(0)
    return list(current.model_fields) if _is_model(current) else []


class _NestedConfigError(Exception):
    """Errors of a section validated inside a model validator (students' overrides); not a
    ValueError, so that pydantic lets it through to :func:`parse_config` unwrapped."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def format_validation_error(err: ValidationError, source: str) -> str:
    return "\n".join([f"invalid config {source}:", *_error_lines(err, PipelineConfig)])


def _error_lines(err: ValidationError, root: type[BaseModel], prefix: str = "") -> list[str]:
    lines = []
    for e in err.errors():
        loc = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        key = ".".join([prefix] * bool(prefix) + [str(p) for p in loc]) or "(top level)"
        if e["type"] == "extra_forbidden":
            hint = ""
            known = _known_keys(root, list(loc[:-1]))
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            if close:
                path = [prefix] * bool(prefix) + [*map(str, loc[:-1]), close[0]]
                hint = f" (did you mean '{'.'.join(path)}'?)"
            elif known:
                hint = f" (known keys here: {', '.join(known)})"
            lines.append(f"  {key}: unknown key{hint}")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{shown}")
    return lines


def parse_config(data: dict[str, Any], source: str = "<dict>") -> PipelineConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping of keys")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    except _NestedConfigError as err:
        raise ConfigError("\n".join([f"invalid config {source}:", *err.lines])) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (give a path to a YAML config, e.g. "
                          "configs/demo.yaml)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config {path} is not UTF-8 text: {err}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {path}: the top level must be a mapping of keys, "
                          f"not a {type(data).__name__}")
    return data


def read_config_data(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The raw mapping of a YAML config, with ``extends: <file>`` resolved: the named config
    (relative to this one's folder) is read first and this one's keys are merged over it,
    section by section (a key set to null replaces the section)."""
    path = Path(path)
    data = _read_yaml(path)
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"invalid config {path}: extends must be a file name, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in _seen or base_path == path.resolve():
        raise ConfigError(f"invalid config {path}: extends {base} makes a cycle")
    return _deep_merge(read_config_data(base_path, (*_seen, path.resolve())), data)


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read and validate a YAML config. ``overrides`` are ``dotted.key=value`` strings (YAML
    values), applied after ``extends`` is resolved."""
    data = read_config_data(path)
    for item in overrides or []:
        apply_override(data, item)
    source = str(path) + (f" (with --set {', '.join(overrides)})" if overrides else "")
    return parse_config(data, source)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set ``dotted.key=value`` in the raw config mapping; the value is parsed as YAML.

    Missing (or null) sections on the way are created, so ``distill.objective.ot.eps=0.1``
    works on a config whose ``ot`` is null or absent.
    """
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    parts = [p.strip() for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"override {item!r}: empty key in {key.strip()!r} (expected key.path=value)")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: the value is not valid YAML: {err}") from None
    node = data
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(
                f"override {item!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
    node[parts[-1]] = value


def config_dump(cfg: PipelineConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
