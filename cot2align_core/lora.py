"""LoRA (Hu et al. 2021, arXiv:2106.09685) without peft: small and direct, nanoGPT/torchtune style.

The paper trains its 1.1B+ models (TinyLLaMA-1.1B, Mistral-7B) with LoRA, rank 256 in the
config; everything smaller is fully fine-tuned. A LoRA layer keeps the pretrained weight W
frozen and learns a low-rank update:

    y = x W^T + b  +  (dropout(x) A^T B^T) * (alpha / r)

    x: [..., in]    W: [out, in]    A (lora_A): [r, in]    B (lora_B): [out, r]

A starts kaiming-uniform(a=sqrt(5)) (the nn.Linear default, as in the LoRA reference code
and peft), B starts at zero, so B A = 0 and the wrapped model computes exactly what the base
model computes until the first optimizer step. Per wrapped layer the adapter has
r * (in + out) parameters instead of in * out.

alpha default: alpha = rank, i.e. scale alpha / r = 1 (peft's default is lora_alpha=8, which
at r=256 would shrink the update by 32; alpha = 2r is another common choice). With scale 1
the learning rate means the same thing whatever the rank. Pass `alpha=` to change it.

Usage:

    names = apply_lora(model, rank=256)        # in place; everything but A, B is frozen
    train(model, ...)                           # AdamW sees only params with requires_grad
    merge_lora(model)                           # W += scale * B @ A, plain layers put back
    model.save_pretrained(out_dir)              # ordinary checkpoint (transformers, vLLM)

Before merging, `model.save_pretrained` would write keys like `...q_proj.base.weight` that
transformers cannot load; merge first. `lora_state_dict(model)` gives just the adapters,
which `model.load_state_dict(sd, strict=False)` puts back on a model with the same adapters.

GPT-2's `Conv1D` stores its weight transposed, [in, out] (y = x W + b); LoRALinear handles
both layouts, and merging adds (B A)^T to a Conv1D weight.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

try:  # GPT-2 style layer with a transposed [in, out] weight
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a project dependency
    Conv1D = None  # type: ignore[assignment,misc]

# Default targets by `model.config.model_type`: every projection in attention and the MLP.
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": LLAMA_TARGETS,
    "mistral": LLAMA_TARGETS,
    "qwen2": LLAMA_TARGETS,
    "gpt2": GPT2_TARGETS,
}


def _is_conv1d(module: nn.Module) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


def _is_supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


class LoRALinear(nn.Module):
    """A frozen nn.Linear / Conv1D plus a trainable low-rank update.

        y = base(x) + (dropout(x) @ A^T @ B^T) * scaling,   scaling = alpha / rank

    base: the wrapped layer, weight [out, in] (nn.Linear) or [in, out] (Conv1D); its weight
          and bias are frozen here.
    lora_A: [rank, in], kaiming-uniform(a=sqrt(5));  lora_B: [out, rank], zeros.
    Both are created with the base weight's dtype and device.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        if not _is_supported(base):
            raise TypeError(f"LoRALinear wraps nn.Linear or transformers Conv1D, got {type(base).__name__}")
        if int(rank) != rank or rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.base = base
        self.fan_in_fan_out = _is_conv1d(base)  # Conv1D: weight is [in, out]
        w = base.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / self.rank
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out]."""
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # [..., out]
        return self.base(x) + update * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in the base weight's layout ([out, in], or [in, out] for Conv1D),
        computed in float32 at least and returned in the base weight's dtype."""
        dt = torch.promote_types(self.lora_A.dtype, torch.float32)
        delta = (self.lora_B.to(dt) @ self.lora_A.to(dt)) * self.scaling  # [out, in]
        if self.fan_in_fan_out:
            delta = delta.T
        return delta.to(self.base.weight.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """Fold the update into the base weight (W += delta, in place) and return the base
        layer. The base parameters keep requires_grad=False."""
        self.base.weight.add_(self.delta_weight())
        return self.base

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, conv1d={self.fan_in_fan_out}")


def _output_embedding_ids(model: nn.Module) -> set[int]:
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except Exception:
        head = None
    return {id(head)} if head is not None else set()


def _matches(name: str, targets: Iterable[str]) -> bool:
    """peft-style: a target matches the full dotted name or its last components."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora(
    model: nn.Module,
    *,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: Iterable[str] | None = None,
) -> list[str]:
    """Wrap the target layers of `model` in LoRALinear, in place, and freeze everything else.

    rank: r.  alpha: scale is alpha / r; None means alpha = r (scale 1).  dropout: on the
    adapter's input only.  target_modules: names matched against the full dotted module
    name or its trailing components ("q_proj" matches "model.layers.0.self_attn.q_proj").
    None picks by `model.config.model_type` (Llama/Mistral/Qwen2: q,k,v,o,gate,up,down_proj;
    GPT-2: c_attn, c_proj, c_fc) and otherwise every nn.Linear / Conv1D except the output
    embeddings (LM head).

    Afterwards only lora_A / lora_B have requires_grad=True: embeddings, LM head, norms and
    biases are frozen. Returns the dotted names of the replaced layers, in module order.
    Raises ValueError (naming the model class and the available layer names) when nothing
    matches, when a target is not a Linear/Conv1D, or when the model already has adapters.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already has LoRA adapters; merge_lora() it first")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    excluded = _output_embedding_ids(model)
    linear_names = [n for n, m in model.named_modules() if _is_supported(m) and id(m) not in excluded]

    if target_modules is None and model_type in DEFAULT_TARGETS:
        target_modules = DEFAULT_TARGETS[model_type]
    if target_modules is None:  # fallback: every Linear/Conv1D but the LM head
        names = [n for n in linear_names if n.rpartition(".")[2] != "lm_head"]
    else:
        if isinstance(target_modules, str):
            target_modules = [target_modules]
        targets = list(target_modules)
        names = []
        for n, m in model.named_modules():
            if not n or not _matches(n, targets):
                continue
            if not _is_supported(m):
                raise ValueError(
                    f"LoRA target {n!r} of {type(model).__name__} is a {type(m).__name__}, not an "
                    f"nn.Linear or Conv1D")
            names.append(n)
    if not names:
        available = sorted({n.rpartition(".")[2] for n in linear_names})
        raise ValueError(
            f"No LoRA target matched in {type(model).__name__} (model_type={model_type!r}) for "
            f"target_modules={None if target_modules is None else list(target_modules)}; "
            f"available Linear/Conv1D module names: {available}")

    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        _set_submodule(model, n, LoRALinear(model.get_submodule(n), rank=rank, alpha=alpha, dropout=dropout))
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += alpha/r * B @ A; for Conv1D the
    transpose) and put the plain nn.Linear / Conv1D back, in place. Returns `model`, which
    then has exactly the architecture and state-dict keys of the original, so
    `model.save_pretrained` writes a checkpoint that transformers and vLLM load without this
    module.

    requires_grad is left as it is: the base weights stay frozen (as does everything
    apply_lora froze). To fine-tune the merged model fully, call `requires_grad_(True)`.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for n in names:
        _set_submodule(model, n, model.get_submodule(n).merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights: {"<layer>.lora_A": [r, in], "<layer>.lora_B": [out, r]}
    (detached, same storage). Restore with `model.load_state_dict(sd, strict=False)` on a
    model that went through the same apply_lora."""
    out: dict[str, torch.Tensor] = {}
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            prefix = f"{n}." if n else ""
            out[prefix + "lora_A"] = m.lora_A.detach()
            out[prefix + "lora_B"] = m.lora_B.detach()
    return out


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(number of parameters with requires_grad, total number of parameters); tied
    parameters (e.g. GPT-2's wte / lm_head) are counted once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
