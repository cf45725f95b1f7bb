"""What every generation backend shares: settings, results, seeds, the prompt-length guard,
token-budget batching and the per-call timeout.

Determinism contract
--------------------
``generate(prompts, sampling, seeds)`` takes one seed per prompt. Completion ``j`` of prompt
``i`` is a function of (model weights, the prompt's token ids, ``seeds[i] + j``, sampling
settings) only: it does not depend on which other prompts are in the call, on their order, on
how the caller shards the data, or on how the backend splits a call into batches. The generate
stage derives ``seeds[i]`` from (global seed, example id) with :func:`derive_seed`, so a resumed
or re-sharded run reproduces its outputs. When ``seeds`` is None, each prompt's seed is
``derive_seed(sampling.seed, prompt_text)`` (content-derived, hence also batch independent).

Prompt tokens
-------------
Prompts are encoded here, by :func:`cot2align_core.tokenization.prompt_token_ids` (the
tokenizer's bos when it adds one, then the text without special tokens): the same function the
tokenize stage uses for the prompt part of a training sequence, so a model is given exactly the
token prefix it was trained on. Engines get token ids, never text.

Prompt-length guard
-------------------
A prompt longer than ``min(max_prompt_tokens, max_model_len - sampling.max_tokens)`` is, per
``prompt_overflow``: ``"truncate_left"`` (keep a leading bos and the last tokens), ``"skip"``
(no completions: its result is an empty list) or ``"error"`` (ValueError naming the prompts).
Empty prompts are skipped. Callers that must keep the instruction fit their rows first
(:func:`cot2align_core.fitting.fit_prompt` cuts the row's input, never the instruction); the
guard is the last line of defence. What it did is in ``backend.last_prompt_report``.

Batching and timeout
--------------------
A call is split into batches whose prompts fit the engine's limits together (the vLLM backend:
prompt tokens x samples <= ``max_num_batched_tokens`` and at most ``max_num_seqs`` sequences, so
every batch is prefilled in one engine step). ``timeout_s`` bounds the whole call: past it the
backend stops the work (the vLLM backend kills its engine process, which restarts on the next
call) and raises :class:`GenerationTimeout`, which names the call and the setting to raise.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

logger = logging.getLogger("cot2align_core.generation")

PromptOverflow = Literal["truncate_left", "skip", "error"]
OVERFLOW_CHOICES = ("truncate_left", "skip", "error")

# Seeds stay below 2**62 so that seed + j (n > 1 children) fits torch's 64-bit seed.
SEED_LIMIT = 2**62


class GenerationError(RuntimeError):
    """Generation failed; the message says what happened and what to change."""


class GenerationTimeout(GenerationError):
    """A generate call ran past its timeout; the engine was stopped (it restarts on the next
    call, so a retry of the same call starts from a fresh engine)."""


class DeadlinePassed(Exception):
    """Raised inside a backend when a call's deadline has passed (turned into
    :class:`GenerationTimeout` by :meth:`GenerationBackend.generate`)."""


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings shared by all backends.

    Greedy when ``temperature == 0`` (then ``top_p`` and the seeds are ignored and ``n``
    copies of the one greedy completion are returned). Defaults are the paper's CoT
    sampling: temperature 1.0, top_p 1.0, one sample, 256 new tokens. ``stop`` strings end a
    completion; as in vLLM, the text is cut before the stop string and ``token_ids`` keep the
    tokens up to the one that completed it. EOS always ends a completion (its id is kept in
    ``token_ids``, not in ``text``). ``seed`` is only used when ``generate`` gets no seeds.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int = 0
    stop: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingConfig.n must be an int >= 1, got {self.n!r}")
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"SamplingConfig.max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"SamplingConfig.seed must be an int >= 0, got {self.seed!r}")
        stop = self.stop
        if stop is not None:
            stop = (stop,) if isinstance(stop, str) else tuple(stop)
            if any(not isinstance(s, str) or s == "" for s in stop):
                raise ValueError(f"SamplingConfig.stop must hold non-empty strings, got {self.stop!r}")
            object.__setattr__(self, "stop", stop or None)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def sequences_per_prompt(self) -> int:
        """Sequences an engine runs per prompt (greedy runs one and copies it)."""
        return 1 if self.greedy else self.n

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop) if self.stop else None
        return d


@dataclass(frozen=True)
class Completion:
    """One generated continuation. ``finish_reason``: ``"stop"`` (EOS or a stop string),
    ``"length"`` (max_tokens reached) or whatever else vLLM reports (e.g. ``"abort"``)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    num_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": list(self.token_ids),
                "finish_reason": self.finish_reason, "num_tokens": self.num_tokens}


@dataclass(frozen=True)
class PromptIssue:
    index: int
    id: str | None
    num_tokens: int
    action: str  # "truncated" | "skipped"
    kept_tokens: int
    reason: str


@dataclass
class PromptReport:
    """What the prompt-length guard did during the last ``generate`` call."""

    limit: int | None = None
    issues: list[PromptIssue] = field(default_factory=list)

    @property
    def truncated(self) -> list[PromptIssue]:
        return [i for i in self.issues if i.action == "truncated"]

    @property
    def skipped(self) -> list[PromptIssue]:
        return [i for i in self.issues if i.action == "skipped"]


@dataclass(frozen=True)
class BackendOptions:
    """Settings every backend takes.

    ``dtype``: ``"auto"`` (float32 on CPU for HF; vLLM's choice, bfloat16 on CPU, for vLLM),
    ``"float32"``, ``"bfloat16"``, ``"float16"``. ``max_model_len``: prompt + completion
    tokens (default: the model config's ``max_position_embeddings``). ``max_prompt_tokens``,
    ``prompt_overflow``: the prompt-length guard (module docstring). ``add_bos``: put the
    tokenizer's bos in front of a prompt when the tokenizer adds one to a plain encode.
    """

    dtype: str = "auto"
    max_model_len: int | None = None
    max_prompt_tokens: int | None = None
    prompt_overflow: PromptOverflow = "truncate_left"
    add_bos: bool = True

    def __post_init__(self) -> None:
        if self.prompt_overflow not in OVERFLOW_CHOICES:
            raise ValueError(f"prompt_overflow must be one of {OVERFLOW_CHOICES}, got {self.prompt_overflow!r}")
        for key in ("max_model_len", "max_prompt_tokens"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{key} must be an int >= 1 or None, got {value!r}")


def derive_seed(global_seed: int, key: str | int) -> int:
    """A per-example seed from (global seed, example id): stable across processes and runs
    (SHA-256, not Python's salted ``hash``), in ``[0, 2**62)``."""
    digest = hashlib.sha256(f"{int(global_seed)}\x1f{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % SEED_LIMIT


def token_budget_batches(lengths: Sequence[int], budget: int | None,
                         max_count: int | None = None) -> list[list[int]]:
    """Split prompt indices, in order, into consecutive batches whose summed ``lengths`` stay
    within ``budget`` and that hold at most ``max_count`` prompts (None: no bound). A single
    prompt longer than the budget is a batch of its own (the engine limits are checked before).
    """
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        full = (budget is not None and used + n > budget) or (max_count is not None and len(current) >= max_count)
        if current and full:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        batches.append(current)
    return batches


def _describe_ids(ids: Sequence[Any] | None) -> str:
    if not ids:
        return ""
    return f" (ids {ids[0]} .. {ids[-1]})" if len(ids) > 1 else f" (id {ids[0]})"


class GenerationBackend(ABC):
    """Common interface: :meth:`generate`, :meth:`close`, context manager.

    Subclasses set ``tokenizer`` and ``max_model_len`` and implement ``_generate_batch``
    (generate for length-checked token prompts, raising :class:`DeadlinePassed` past the
    deadline) and ``close``; they may bound batches (``_batch_limits``) and react to a
    timeout (``_abandon``: stop whatever still runs).
    """

    name: str = "base"
    tokenizer: Any
    max_model_len: int | None

    def __init__(self, options: BackendOptions) -> None:
        self.options = options
        self.last_prompt_report = PromptReport()
        self._closed = False

    @abstractmethod
    def _generate_batch(self, token_prompts: list[list[int]], sampling: SamplingConfig,
                        seeds: list[int], deadline: float | None) -> list[list[Completion]]:
        """Completions for already-tokenized, length-checked prompts."""

    @abstractmethod
    def close(self) -> None:
        """Free the engine/model. Idempotent."""

    def _batch_limits(self, sampling: SamplingConfig) -> tuple[int | None, int | None]:
        """(token budget, prompt count) bounds of one batch; None: unbounded."""
        return None, None

    def _abandon(self) -> None:
        """Stop work left running after a timeout (default: nothing runs in the background)."""

    # --- public API ---------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], sampling: SamplingConfig,
                 seeds: Sequence[int] | None = None, *, ids: Sequence[Any] | None = None,
                 timeout_s: float | None = None) -> list[list[Completion]]:
        """One list of ``sampling.n`` completions per prompt (an empty list for a prompt the
        length guard skipped). ``seeds``: one per prompt (module docstring); ``ids``: example
        ids for log lines, the report and errors; ``timeout_s``: bound on the whole call
        (None: none), past which :class:`GenerationTimeout` is raised."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        prompts, seed_list = self._check_call(prompts, sampling, seeds, ids, timeout_s)
        token_prompts, self.last_prompt_report = self._prepare_prompts(prompts, sampling, ids)
        keep = [i for i, t in enumerate(token_prompts) if t is not None]
        results: list[list[Completion]] = [[] for _ in prompts]
        per_seq = sampling.sequences_per_prompt
        budget, max_count = self._batch_limits(sampling)
        batches = token_budget_batches([len(token_prompts[i]) * per_seq for i in keep], budget,
                                       None if max_count is None else max(1, max_count // per_seq))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for done, batch in enumerate(batches):
            chosen = [keep[b] for b in batch]
            try:
                out = self._generate_batch([token_prompts[i] for i in chosen], sampling,
                                           [seed_list[i] for i in chosen], deadline)
            except DeadlinePassed:
                self._abandon()
                raise GenerationTimeout(
                    f"{self.name}: a generate call of {len(prompts)} prompts{_describe_ids(ids)} "
                    f"ran past its timeout of {timeout_s:g} s ({done} of {len(batches)} batches "
                    "done); the engine was stopped and starts again on the next call. A call "
                    "that is just slow needs a larger timeout (timeout_s; generate.shard_timeout_s "
                    "in the pipeline config) or fewer prompts per call (generate.shard_size)."
                ) from None
            for i, comps in zip(chosen, out):
                results[i] = comps
        return results

    def _check_call(self, prompts, sampling, seeds, ids, timeout_s) -> tuple[list[str], list[int]]:
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        prompts = list(prompts)
        if any(not isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        if ids is not None and len(ids) != len(prompts):
            raise ValueError(f"got {len(ids)} ids for {len(prompts)} prompts")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
        if seeds is None:
            return prompts, [derive_seed(sampling.seed, p) for p in prompts]
        seed_list = [int(s) for s in seeds]
        if len(seed_list) != len(prompts):
            raise ValueError(f"got {len(seed_list)} seeds for {len(prompts)} prompts")
        bad = [s for s in seed_list if not (0 <= s < SEED_LIMIT)]
        if bad:
            raise ValueError(f"seeds must lie in [0, 2**62); got e.g. {bad[0]} (use derive_seed)")
        return prompts, seed_list

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # best effort; explicit close() is the contract
        try:
            if not getattr(self, "_closed", True):
                self.close()
        except Exception:
            pass

    # --- prompt handling ----------------------------------------------------------------
    def prompt_limit(self, sampling: SamplingConfig) -> int | None:
        """Most prompt tokens a call with ``sampling`` accepts (None: no limit)."""
        limit = None
        if self.max_model_len is not None:
            limit = self.max_model_len - sampling.max_tokens
            if limit < 1:
                raise ValueError(f"max_tokens={sampling.max_tokens} leaves no room for a prompt "
                                 f"within max_model_len={self.max_model_len}")
        if self.options.max_prompt_tokens is not None:
            limit = self.options.max_prompt_tokens if limit is None else min(limit, self.options.max_prompt_tokens)
        return limit

    def encode_prompt(self, prompt: str) -> list[int]:
        """The token ids an engine is given for ``prompt`` (module docstring)."""
        from cot2align_core.tokenization import prompt_token_ids

        return prompt_token_ids(self.tokenizer, prompt, add_bos=self.options.add_bos)

    def _prepare_prompts(self, prompts: list[str], sampling: SamplingConfig,
                         ids: Sequence[Any] | None) -> tuple[list[list[int] | None], PromptReport]:
        limit = self.prompt_limit(sampling)
        report = PromptReport(limit=limit)
        out: list[list[int] | None] = []
        for i, prompt in enumerate(prompts):
            toks = self.encode_prompt(prompt)
            pid = None if ids is None else str(ids[i])
            if not toks:
                report.issues.append(PromptIssue(i, pid, 0, "skipped", 0, "empty prompt"))
                out.append(None)
            elif limit is not None and len(toks) > limit:
                reason = f"{len(toks)} prompt tokens > limit {limit}"
                kept = self._truncate_left(toks, limit) if self.options.prompt_overflow == "truncate_left" else None
                action = "skipped" if kept is None else "truncated"
                report.issues.append(PromptIssue(i, pid, len(toks), action, len(kept or ()), reason))
                out.append(kept)
            else:
                out.append(toks)
        self._report_issues(report, sampling)
        return out, report

    def _truncate_left(self, toks: list[int], limit: int) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None and toks[0] == bos and limit >= 2:
            return [toks[0]] + toks[len(toks) - (limit - 1):]
        return toks[len(toks) - limit:]

    def _report_issues(self, report: PromptReport, sampling: SamplingConfig) -> None:
        too_long = [x for x in report.issues if x.reason != "empty prompt"]
        if self.options.prompt_overflow == "error" and too_long:
            desc = ", ".join(f"#{x.index}" + (f" (id {x.id})" if x.id else "") + f": {x.num_tokens}"
                             for x in too_long[:10])
            raise ValueError(
                f"{len(too_long)} prompt(s) longer than the limit of {report.limit} tokens "
                f"(max_model_len={self.max_model_len}, max_tokens={sampling.max_tokens}, "
                f"max_prompt_tokens={self.options.max_prompt_tokens}): {desc}")
        for kind in ("truncated", "skipped"):
            items = [x for x in report.issues if x.action == kind]
            if items:
                desc = "; ".join(f"#{x.index}" + (f" id={x.id}" if x.id else "") + f" ({x.reason})"
                                 for x in items[:10])
                more = f" and {len(items) - 10} more" if len(items) > 10 else ""
                logger.warning("%s: %d prompt(s) %s: %s%s", self.name, len(items), kind, desc, more)


def finish_stop_strings(text: str, stop: tuple[str, ...] | None) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string; (text, whether one was found)."""
    hits = [pos for pos in (text.find(s) for s in stop or ()) if pos != -1]
    if not hits:
        return text, False
    return text[:min(hits)], True
