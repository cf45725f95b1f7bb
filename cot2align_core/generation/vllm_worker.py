"""The engine process of :class:`cot2align_core.generation.vllm.VLLMBackend`.

Run as ``python -m cot2align_core.generation.vllm_worker FD``: ``FD`` is one end of a socket
pair over which the parent sends pickled requests and this process answers them. It imports
only the standard library and vLLM (through :func:`serve`), owns one ``vllm.LLM`` whose engine
core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set by the parent in this
process's environment), and exits when the parent asks, when the socket closes, or when the
parent process is gone.

Messages (tuples, first item the kind)::

    parent -> worker                         worker -> parent
    ("start", model_dir, engine_kwargs)      ("ready", info) | ("unsupported", reason)
                                             | ("error", traceback text)
    ("generate", prompts, sampling, seeds)   ("result", [[(text, token_ids, finish), ...], ...])
                                             | ("error", traceback text)
    ("close",)                               ("closed",), then exit
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection


def _exit_when_orphaned(parent_pid: int) -> None:
    """Once the parent is gone, end this process group (this worker and vLLM's engine-core
    processes under it; the worker leads a session of its own): killed runs leave no engine
    behind."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os.killpg(os.getpgid(0), signal.SIGKILL)
    os._exit(3)


def _unsupported_reason(model_dir: str) -> str | None:
    from vllm import ModelRegistry

    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        archs = json.load(f).get("architectures") or []
    if not archs:
        return "config.json names no architectures"
    if not any(a in ModelRegistry.get_supported_archs() for a in archs):
        return f"vLLM does not support architecture(s) {archs}"
    return None


def _start(model_dir: str, engine_kwargs: dict):
    import vllm
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(model=model_dir, **engine_kwargs)
    config = llm.llm_engine.vllm_config
    info = {
        "max_model_len": int(config.model_config.max_model_len),
        "max_num_batched_tokens": int(config.scheduler_config.max_num_batched_tokens),
        "max_num_seqs": int(config.scheduler_config.max_num_seqs),
        "enable_chunked_prefill": bool(config.scheduler_config.enable_chunked_prefill),
        "vllm_version": vllm.__version__,
        "start_seconds": round(time.perf_counter() - t0, 2),
    }
    return llm, info


def _generate(llm, prompts: list[list[int]], sampling: dict, seeds: list[int]) -> list:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    greedy = sampling["temperature"] == 0.0
    params = [
        SamplingParams(
            n=1 if greedy else sampling["n"], temperature=sampling["temperature"],
            top_p=1.0 if greedy else sampling["top_p"], top_k=0, max_tokens=sampling["max_tokens"],
            seed=None if greedy else seed, stop=sampling["stop"], skip_special_tokens=True,
        )
        for seed in seeds
    ]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [
        [(o.text, [int(t) for t in o.token_ids], None if o.finish_reason is None else str(o.finish_reason))
         for o in sorted(ro.outputs, key=lambda o: o.index)]
        for ro in outputs
    ]


def serve(conn: Connection) -> None:
    """Answer the parent's messages until it closes the connection or asks to close."""
    llm = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        kind = msg[0]
        if kind == "close":
            conn.send(("closed",))
            return
        try:
            if kind == "start":
                reason = _unsupported_reason(msg[1])
                if reason is not None:
                    conn.send(("unsupported", reason))
                    return
                llm, info = _start(msg[1], msg[2])
                conn.send(("ready", info))
            elif kind == "generate":
                conn.send(("result", _generate(llm, msg[1], msg[2], msg[3])))
            else:
                conn.send(("error", f"unknown message {kind!r}"))
        except Exception:
            conn.send(("error", traceback.format_exc()))


def main(argv: list[str]) -> int:
    conn = Connection(int(argv[1]))
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    serve(conn)
    sys.stdout.flush()
    sys.stderr.flush()
    # No interpreter shutdown: vLLM's atexit hooks and thread joins add seconds or hang.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
