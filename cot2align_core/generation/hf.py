"""``transformers`` generation on a model folder or on a model already in memory.

Sampling: ``generate`` draws from the global torch RNG and has no per-row generator, so sampled
generation runs one sequence at a time inside ``torch.random.fork_rng`` seeded with
``seeds[i] + j`` (the caller's RNG state is left untouched). Greedy decoding is batched with left
padding (``HFOptions.batch_size`` rows, sorted by length) and does not depend on the batch
beyond floating-point noise (the tests check batched == unbatched). This backend does not give
the same samples as vLLM: only greedy output is comparable across backends.

Timeout: the model runs in the calling thread, so a deadline is checked after every decoding
step (a stopping criterion) and between sequences; a single forward pass is not interrupted.
"""
from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from typing import Any

from cot2align_core.generation.base import (
    BackendOptions,
    Completion,
    DeadlinePassed,
    GenerationBackend,
    SamplingConfig,
    finish_stop_strings,
)


@dataclass(frozen=True)
class HFOptions(BackendOptions):
    """:class:`BackendOptions` plus ``device`` (default: the model's device for an in-memory
    model, else ``"cuda"`` when available, else ``"cpu"``) and ``batch_size`` (rows per greedy
    batch). ``dtype="auto"`` is float32 on CPU and the checkpoint's dtype on CUDA."""

    device: str | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")


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
            if row not in self.stop_at:
                text = self.tokenizer.decode(gen[row, -self.window:].tolist(), skip_special_tokens=True)
                if any(s in text for s in self.stop):
                    self.stop_at[row] = gen.shape[1]
            done[row] = row in self.stop_at
        return done


class _DeadlineCriteria:
    """Stops every row once ``time.monotonic()`` passes ``deadline``."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        passed = time.monotonic() > self.deadline
        return torch.full((input_ids.shape[0],), passed, dtype=torch.bool, device=input_ids.device)


class HFBackend(GenerationBackend):
    """``transformers`` generation.

    ``model_dir_or_model``: a folder written by ``save_pretrained`` (loaded by
    :func:`cot2align_core.modeling.load_model`: safetensors only) or a ``PreTrainedModel``
    (then ``tokenizer`` is required; the model stays where it is and its train/eval mode is
    restored after each call). ``tokenizer``: a tokenizer or its folder (default: the model
    folder). ``max_model_len`` defaults to the config's ``max_position_embeddings``.
    """

    name = "hf"

    def __init__(self, model_dir_or_model: Any, tokenizer: Any = None,
                 options: HFOptions | None = None) -> None:
        options = options or HFOptions()
        super().__init__(options)
        import torch

        from cot2align_core.modeling import load_model, load_tokenizer

        self._owns_model = isinstance(model_dir_or_model, (str, os.PathLike))
        if self._owns_model:
            device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = "float32" if options.dtype == "auto" and device.startswith("cpu") else options.dtype
            self.model = load_model(model_dir_or_model, dtype, device)
            tokenizer = model_dir_or_model if tokenizer is None else tokenizer
        else:
            if tokenizer is None:
                raise ValueError("HFBackend with an in-memory model needs a tokenizer")
            self.model = model_dir_or_model
            if options.device is not None and torch.device(options.device) != self._model_device():
                self.model.to(options.device)
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.device = self._model_device()
        self.max_model_len = options.max_model_len or getattr(self.model.config, "max_position_embeddings", None)
        self.eos_token_ids = self._eos_ids()
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else (self.eos_token_ids or [0])[0])

    def _eos_ids(self) -> list[int]:
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos: list[int] = []
        for e in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]) + [self.tokenizer.eos_token_id]:
            if e is not None and int(e) not in eos:
                eos.append(int(e))
        return eos

    def _model_device(self):
        import torch

        try:
            return next(self.model.parameters()).device
        except StopIteration:  # pragma: no cover
            return torch.device("cpu")

    def _generation_config(self, sampling: SamplingConfig):
        from transformers import GenerationConfig

        kw: dict[str, Any] = dict(
            max_new_tokens=sampling.max_tokens, num_beams=1, num_return_sequences=1,
            eos_token_id=self.eos_token_ids or None, pad_token_id=self.pad_token_id,
            # Neutral values: otherwise generate() fills them from the model's
            # generation_config / library defaults (e.g. top_k=50 when sampling).
            repetition_penalty=1.0, no_repeat_ngram_size=0, typical_p=1.0, epsilon_cutoff=0.0,
            eta_cutoff=0.0,
        )
        if sampling.greedy:
            kw.update(do_sample=False, temperature=1.0, top_p=1.0)
        else:
            kw.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        return GenerationConfig(**kw)

    def _run(self, rows: list[list[int]], sampling: SamplingConfig,
             deadline: float | None) -> list[Completion]:
        """Generate for a batch of token rows (left padded); one completion per row."""
        import torch
        from transformers import StoppingCriteriaList

        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            attention[i, width - len(r):] = 1
        criteria = StoppingCriteriaList()
        stop_crit = _StopStringCriteria(self.tokenizer, sampling.stop, width) if sampling.stop else None
        if stop_crit is not None:
            criteria.append(stop_crit)
        if deadline is not None:
            criteria.append(_DeadlineCriteria(deadline))
        out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                  generation_config=self._generation_config(sampling),
                                  stopping_criteria=criteria)
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlinePassed
        return [self._completion(toks, row, stop_crit, sampling) for row, toks in enumerate(out[:, width:].tolist())]

    def _completion(self, toks: list[int], row: int, stop_crit, sampling: SamplingConfig) -> Completion:
        eos = set(self.eos_token_ids)
        cut, finish = len(toks), None
        for k, t in enumerate(toks):
            if t in eos:
                cut, finish = k + 1, "stop"
                break
        if stop_crit is not None and stop_crit.stop_at.get(row, cut + 1) < cut:
            cut, finish = stop_crit.stop_at[row], None
        toks = toks[:cut]
        text, hit = finish_stop_strings(self.tokenizer.decode(toks, skip_special_tokens=True), sampling.stop)
        finish = "stop" if hit else (finish or "length")
        return Completion(text=text, token_ids=tuple(toks), finish_reason=finish, num_tokens=len(toks))

    def _generate_batch(self, token_prompts, sampling, seeds, deadline):
        import torch

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                if sampling.greedy:
                    return self._greedy(token_prompts, sampling, deadline)
                devices = [self.device.index or 0] if self.device.type == "cuda" else []
                results = []
                for toks, seed in zip(token_prompts, seeds):
                    comps = []
                    for j in range(sampling.n):
                        with torch.random.fork_rng(devices=devices):
                            torch.manual_seed(seed + j)
                            comps.append(self._run([toks], sampling, deadline)[0])
                    results.append(comps)
                return results
        finally:
            if was_training:
                self.model.train()

    def _greedy(self, token_prompts, sampling, deadline) -> list[list[Completion]]:
        # Sorted by length so that batches hold similar lengths (less padding).
        order = sorted(range(len(token_prompts)), key=lambda i: len(token_prompts[i]))
        by_index: dict[int, Completion] = {}
        for start in range(0, len(order), self.options.batch_size):
            chunk = order[start:start + self.options.batch_size]
            for i, c in zip(chunk, self._run([token_prompts[i] for i in chunk], sampling, deadline)):
                by_index[i] = c
        return [[by_index[i]] * sampling.n for i in range(len(token_prompts))]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        model, self.model = getattr(self, "model", None), None
        if self._owns_model and model is not None:
            del model
            gc.collect()
