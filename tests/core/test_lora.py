"""LoRA without peft: identity at init, freezing, parameter count, training, merging (Linear
and GPT-2 Conv1D), save/load of the merged model, finite-difference gradients, errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from cot2align_core.lora import LoRALinear, apply_lora, lora_state_dict, merge_lora, trainable_parameters
from cot2align_core.training import _param_groups

RANK = 4


def _llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(cfg).eval()


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100)).eval()


BUILDERS = {"llama": _llama, "gpt2": _gpt2}
# (in, out) of every default target: Llama q,k,v,o (64->64), gate/up (64->128), down (128->64);
# GPT-2 c_attn (32->96), attn c_proj (32->32), c_fc (32->128), mlp c_proj (128->32).
SHAPES = {
    "llama": [(64, 64)] * 4 + [(64, 128), (64, 128), (128, 64)],
    "gpt2": [(32, 96), (32, 32), (32, 128), (128, 32)],
}


def _ids(seed=1, B=2, T=7):
    return torch.randint(0, 100, (B, T), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _train_a_few_steps(model, steps=2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = _ids(seed=2, B=2, T=8)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_apply_is_identity_at_init_and_freezes_everything_else(arch):
    base = BUILDERS[arch]()
    model = copy.deepcopy(base)
    names = apply_lora(model, rank=RANK)
    assert len(names) == 2 * len(SHAPES[arch])  # 2 layers
    for n in names:
        m = model.get_submodule(n)
        assert isinstance(m, LoRALinear) and m.scaling == 1.0  # alpha defaults to rank
        assert m.fan_in_fan_out == (arch == "gpt2")
    ids = _ids()
    with torch.no_grad():
        a = model(input_ids=ids, output_hidden_states=True)
        b = base(input_ids=ids, output_hidden_states=True)
    assert torch.equal(a.logits, b.logits)
    assert len(a.hidden_states) == len(b.hidden_states)
    for ha, hb in zip(a.hidden_states, b.hidden_states):
        assert torch.equal(ha, hb)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert trainable == {f"{n}.{ab}" for n in names for ab in ("lora_A", "lora_B")}
    assert not model.get_input_embeddings().weight.requires_grad
    assert not model.get_output_embeddings().weight.requires_grad
    expected = sum(RANK * (i + o) for i, o in SHAPES[arch]) * 2
    n_train, n_total = trainable_parameters(model)
    assert n_train == expected
    assert n_total == sum(p.numel() for p in base.parameters()) + expected
    # The training loop builds its AdamW groups from requires_grad: only the adapters.
    groups, _ = _param_groups(model, [], lr=1e-3, weight_decay=0.1)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_train_merge_and_reload(arch, tmp_path):
    base = BUILDERS[arch]()
    model = copy.deepcopy(base)
    names = apply_lora(model, rank=RANK, alpha=2 * RANK, dropout=0.1)
    _train_a_few_steps(model)
    ids = _ids()
    adapted = _logits(model, ids)
    assert not torch.allclose(adapted, _logits(base, ids), atol=1e-4)
    # Frozen weights did not move.
    for (n, p), (nb, pb) in zip(
        ((n, p) for n, p in model.named_parameters() if "lora_" not in n), base.named_parameters()
    ):
        assert n.replace(".base.", ".") == nb and torch.equal(p, pb)

    sd = {k: v.clone() for k, v in lora_state_dict(model).items()}
    assert set(sd) == {f"{n}.{ab}" for n in names for ab in ("lora_A", "lora_B")}

    merged = merge_lora(model)
    assert merged is model
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    layer_type = Conv1D if arch == "gpt2" else nn.Linear
    assert all(type(model.get_submodule(n)) is layer_type for n in names)
    assert set(model.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(_logits(model, ids), adapted, atol=1e-5, rtol=0)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(base)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=0, rtol=0)

    # The adapter-only state dict restores the adapted model on a fresh copy of the base.
    again = copy.deepcopy(base)
    apply_lora(again, rank=RANK, alpha=2 * RANK, dropout=0.1)
    missing, unexpected = again.load_state_dict(sd, strict=False)
    assert not unexpected and not any("lora_" in k for k in missing)
    torch.testing.assert_close(_logits(again.eval(), ids), adapted, atol=0, rtol=0)


@pytest.mark.parametrize("conv1d", [False, True])
def test_lora_linear_math_and_gradient_against_finite_differences(conv1d):
    torch.manual_seed(0)
    d_in, d_out, r, alpha = 5, 3, 2, 3.0
    layer = (Conv1D(d_out, d_in) if conv1d else nn.Linear(d_in, d_out)).double()
    lora = LoRALinear(layer, rank=r, alpha=alpha)
    assert lora.lora_A.shape == (r, d_in) and lora.lora_B.shape == (d_out, r)
    assert torch.count_nonzero(lora.lora_B) == 0
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(4, 2, d_in, dtype=torch.float64)
    w_out = torch.randn(4, 2, d_out, dtype=torch.float64)

    # Explicit formula: y = x W^T + b + (x A^T B^T) * alpha / r, with W as [out, in].
    W = layer.weight.T if conv1d else layer.weight
    expected = x @ W.T + layer.bias + (x @ lora.lora_A.T @ lora.lora_B.T) * (alpha / r)
    torch.testing.assert_close(lora(x), expected, atol=1e-12, rtol=0)

    def loss():
        return (lora(x) * w_out).sum()

    loss().backward()
    assert layer.weight.grad is None and layer.bias.grad is None  # frozen
    eps = 1e-6
    for p in (lora.lora_A, lora.lora_B):
        numeric = torch.zeros_like(p)
        with torch.no_grad():
            for i in range(p.numel()):
                old = p.view(-1)[i].item()
                p.view(-1)[i] = old + eps
                up = loss()
                p.view(-1)[i] = old - eps
                down = loss()
                p.view(-1)[i] = old
                numeric.view(-1)[i] = (up - down) / (2 * eps)
        torch.testing.assert_close(p.grad, numeric, atol=1e-7, rtol=1e-6)

    # Merging folds exactly the same update into the weight, in the layer's own layout.
    y = lora(x).detach()
    merged = lora.merged()
    assert merged is layer
    torch.testing.assert_close(merged(x), y, atol=1e-12, rtol=0)


def test_fallback_targets_every_linear_but_the_lm_head():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
            self.lm_head = nn.Linear(8, 10, bias=False)

        def forward(self, ids):
            return self.lm_head(self.mlp(self.embed(ids)))

    model = Tiny()
    assert apply_lora(model, rank=2) == ["mlp.0", "mlp.2"]
    assert trainable_parameters(model)[0] == 2 * (8 + 16) + 2 * (16 + 8)
    # An explicit full dotted name works too.
    other = Tiny()
    assert apply_lora(other, rank=2, target_modules=["mlp.2"]) == ["mlp.2"]


def test_clear_errors():
    model = _llama()
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.*q_proj"):
        apply_lora(model, rank=RANK, target_modules=["c_attn"])
    with pytest.raises(ValueError, match=r"embed_tokens.*Embedding"):
        apply_lora(model, rank=RANK, target_modules=["embed_tokens"])
    # Nothing was changed by the failed calls.
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    apply_lora(model, rank=RANK)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, rank=RANK)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(3, 3), rank=0)
