"""Response positions, response CE, same-vocabulary KD and ULD against naive float64 loops."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cot2align_core.losses import (KD_KINDS, gather_positions, kd_divergence, pack_left,
                                   response_ce, response_positions, topk_kd_divergence, uld_loss)


def _response_mask(gen, B, T, *, min_prompt=0):
    """Random right-padded rows: prompt (>= min_prompt tokens), response, padding."""
    rm = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        length = int(torch.randint(1, T + 1, (1,), generator=gen))
        prompt = int(torch.randint(min_prompt, length + 1, (1,), generator=gen))
        rm[b, prompt:length] = 1
    return rm


def _softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


# ------------------------------------------------------------------------------- positions
def test_response_positions_match_naive_listing():
    gen = torch.Generator().manual_seed(0)
    rm = _response_mask(gen, 7, 11)
    rm[0] = 0  # no response at all
    rm[1, :] = 1  # response from position 0: nothing predicts token 0
    index, mask = response_positions(rm)
    want = [[p for p in range(rm.shape[1] - 1) if rm[b, p + 1]] for b in range(rm.shape[0])]
    assert index.shape[1] == max(len(w) for w in want)
    for b, w in enumerate(want):
        assert mask[b].sum().item() == len(w)
        assert index[b, : len(w)].tolist() == w
        assert not mask[b, len(w):].any()
    x = torch.randn(7, 11, 3)
    g = gather_positions(x, index, mask)
    for b, w in enumerate(want):
        for r, p in enumerate(w):
            assert torch.equal(g[b, r], x[b, p])
        assert (g[b, len(w):] == 0).all()


def test_response_positions_edge_shapes():
    index, mask = response_positions(torch.zeros(3, 1, dtype=torch.long))
    assert index.shape == (3, 0) and mask.shape == (3, 0)
    index, mask = response_positions(torch.zeros(0, 5, dtype=torch.long))
    assert index.shape == (0, 0)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        response_positions(torch.zeros(5))
    idx, m = pack_left(torch.tensor([[0, 1, 0, 1], [1, 1, 1, 0]], dtype=torch.bool))
    assert idx.tolist() == [[1, 3, 0], [0, 1, 2]]
    assert m.tolist() == [[True, True, False], [True] * 3]


# ------------------------------------------------------------------------------- CE
def _naive_ce(logits, ids, rm):
    total, n = 0.0, 0
    B, T, _ = logits.shape
    for b in range(B):
        for p in range(T - 1):
            if rm[b, p + 1]:
                z = logits[b, p].double().numpy()
                lse = math.log(sum(math.exp(v - z.max()) for v in z)) + z.max()
                total += lse - z[int(ids[b, p + 1])]
                n += 1
    return total / n


def test_response_ce_matches_naive_and_ignores_prompt_and_padding():
    gen = torch.Generator().manual_seed(1)
    B, T, V = 5, 9, 13
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=gen)
    rm = _response_mask(gen, B, T, min_prompt=1)
    rm[0, 2:5] = 1
    got = response_ce(logits, ids, rm)
    assert got.item() == pytest.approx(_naive_ce(logits, ids, rm), rel=1e-10)
    # Changing prompt/padding logits or ids at unpredicted places changes nothing.
    logits2 = logits.clone()
    for b in range(B):
        for p in range(T):
            if not (p + 1 < T and rm[b, p + 1]):
                logits2[b, p] = torch.randn(V, generator=gen, dtype=torch.float64) * 5
    assert response_ce(logits2, ids, rm).item() == pytest.approx(got.item(), rel=1e-12)


def test_response_ce_gradcheck_and_empty():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 4, (2, 5), generator=gen)
    rm = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    assert torch.autograd.gradcheck(lambda z: response_ce(z, ids, rm), (logits,))
    empty = response_ce(logits, ids, torch.zeros_like(rm))
    assert empty.item() == 0.0
    empty.backward()  # attached, zero gradient
    assert (logits.grad == 0).all()


def test_response_ce_shape_errors():
    with pytest.raises(ValueError, match="agree"):
        response_ce(torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        response_ce(torch.randn(2, 5), torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5))


# ------------------------------------------------------------------------------- KD
def _naive_div(zs, zt, kind, T, skew):
    q = _softmax(np.asarray(zs) / T)
    p = _softmax(np.asarray(zt) / T)

    def kl(a, b):
        return sum(ai * math.log(ai / bi) for ai, bi in zip(a, b) if ai > 0)

    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "js":
        m = [(pi + qi) / 2 for pi, qi in zip(p, q)]
        return 0.5 * kl(p, m) + 0.5 * kl(q, m)
    if kind == "skewed_forward_kl":
        return kl(p, [skew * pi + (1 - skew) * qi for pi, qi in zip(p, q)])
    if kind == "skewed_reverse_kl":
        return kl(q, [skew * qi + (1 - skew) * pi for pi, qi in zip(p, q)])
    if kind == "tvd":
        return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_kd_divergence_matches_naive(kind):
    gen = torch.Generator().manual_seed(3)
    B, R, V = 3, 7, 11
    zs = torch.randn(B, R, V, generator=gen, dtype=torch.float64) * 2
    zt = torch.randn(B, R, V, generator=gen, dtype=torch.float64) * 2
    mask = torch.rand(B, R, generator=gen) < 0.6
    mask[0, 0] = True
    T, skew = 1.7, 0.23
    got = kd_divergence(zs, zt, mask, kind=kind, temperature=T, skew=skew)
    vals = [_naive_div(zs[b, r].numpy(), zt[b, r].numpy(), kind, T, skew)
            for b in range(B) for r in range(R) if mask[b, r]]
    assert got.item() == pytest.approx(sum(vals) / len(vals), rel=1e-9, abs=1e-12)
    # float32 input is computed in float32 and agrees closely
    got32 = kd_divergence(zs.float(), zt.float(), mask, kind=kind, temperature=T, skew=skew)
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(got.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_kd_divergence_gradcheck_and_zero_at_equality(kind):
    gen = torch.Generator().manual_seed(4)
    zs = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    if kind != "tvd":  # |p - q| is not differentiable where p = q; elsewhere it is
        assert torch.autograd.gradcheck(
            lambda z: kd_divergence(z, zt, mask, kind=kind, temperature=2.0, skew=0.1), (zs,))
    same = kd_divergence(zt, zt.clone(), mask, kind=kind)
    assert abs(same.item()) < 1e-12


def test_kd_divergence_errors_and_empty_mask():
    z = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="kind"):
        kd_divergence(z, z, torch.ones(2, 3, dtype=torch.bool), kind="kl")
    with pytest.raises(ValueError, match="same shape"):
        kd_divergence(z, torch.randn(2, 3, 5), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        kd_divergence(z, z, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        kd_divergence(z, z, torch.ones(2, 3, dtype=torch.bool), temperature=0)
    assert kd_divergence(z, z + 1, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0


def test_topk_kd_is_renormalised_over_topk_and_exact_for_full_k():
    gen = torch.Generator().manual_seed(5)
    B, R, V, k = 2, 4, 9, 3
    zs = torch.randn(B, R, V, generator=gen, dtype=torch.float64)
    zt = torch.randn(B, R, V, generator=gen, dtype=torch.float64)
    mask = torch.ones(B, R, dtype=torch.bool)
    mask[1, 3] = False
    top = zt.topk(k, dim=-1)
    got = topk_kd_divergence(zs, top.indices, top.values, mask, kind="reverse_kl", temperature=1.3)
    vals = []
    for b in range(B):
        for r in range(R):
            if mask[b, r]:
                ids = top.indices[b, r].tolist()
                vals.append(_naive_div(zs[b, r, ids].numpy(), zt[b, r, ids].numpy(),
                                       "reverse_kl", 1.3, 0.1))
    assert got.item() == pytest.approx(np.mean(vals), rel=1e-9)
    full = zt.topk(V, dim=-1)
    exact = kd_divergence(zs, zt, mask, kind="reverse_kl", temperature=1.3)
    assert topk_kd_divergence(zs, full.indices, full.values, mask, kind="reverse_kl",
                              temperature=1.3).item() == pytest.approx(exact.item(), rel=1e-10)
    with pytest.raises(ValueError, match="one vocabulary"):
        topk_kd_divergence(zs, top.indices + V, top.values, mask)


# ------------------------------------------------------------------------------- ULD
def _naive_uld(zs, ms, zt, mt, T):
    per_example = []
    for b in range(zs.shape[0]):
        s_pos = [r for r in range(zs.shape[1]) if ms[b, r]]
        t_pos = [r for r in range(zt.shape[1]) if mt[b, r]]
        n = min(len(s_pos), len(t_pos))
        if n == 0:
            continue
        tot = 0.0
        for r in range(n):
            q = sorted(_softmax(zs[b, s_pos[r]].numpy() / T), reverse=True)
            p = sorted(_softmax(zt[b, t_pos[r]].numpy() / T), reverse=True)
            size = max(len(q), len(p))
            q = list(q) + [0.0] * (size - len(q))
            p = list(p) + [0.0] * (size - len(p))
            tot += sum(abs(a - c) for a, c in zip(q, p))
        per_example.append(tot / n)
    return sum(per_example) / len(per_example)


@pytest.mark.parametrize("V_s,k", [(13, 7), (6, 11), (9, 9)])
def test_uld_matches_naive(V_s, k):
    gen = torch.Generator().manual_seed(6 + V_s + k)
    B, R_s, R_t = 4, 6, 8
    zs = torch.randn(B, R_s, V_s, generator=gen, dtype=torch.float64) * 2
    zt = torch.randn(B, R_t, k, generator=gen, dtype=torch.float64) * 2
    # left-packed masks of different lengths; example 2 has no student positions
    ns, nt = [6, 3, 0, 5], [2, 8, 4, 5]
    ms = torch.arange(R_s)[None] < torch.tensor(ns)[:, None]
    mt = torch.arange(R_t)[None] < torch.tensor(nt)[:, None]
    got = uld_loss(zs, ms, zt, mt, temperature=1.5)
    assert got.item() == pytest.approx(_naive_uld(zs, ms, zt, mt, 1.5), rel=1e-9)


def test_uld_pairs_by_rank_for_unpacked_masks_and_gradcheck():
    gen = torch.Generator().manual_seed(7)
    zs = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(2, 4, 4, generator=gen, dtype=torch.float64)
    ms = torch.tensor([[False, True, False, True, True], [True, True, False, False, False]])
    mt = torch.tensor([[True, True, False, True], [False, True, False, False]])
    got = uld_loss(zs, ms, zt, mt, temperature=1.0)
    assert got.item() == pytest.approx(_naive_uld(zs.detach(), ms, zt, mt, 1.0), rel=1e-9)
    assert torch.autograd.gradcheck(lambda z: uld_loss(z, ms, zt, mt, temperature=1.0), (zs,))


def test_uld_edge_cases():
    z = torch.randn(2, 3, 5)
    nothing = uld_loss(z, torch.zeros(2, 3, dtype=torch.bool), torch.randn(2, 3, 4),
                       torch.ones(2, 3, dtype=torch.bool))
    assert nothing.item() == 0.0
    same = uld_loss(z, torch.ones(2, 3, dtype=torch.bool), z[..., torch.randperm(5)],
                    torch.ones(2, 3, dtype=torch.bool))
    assert same.item() == pytest.approx(0.0, abs=1e-6)  # sorting ignores the vocabulary order
    with pytest.raises(ValueError, match="batch sizes"):
        uld_loss(z, torch.ones(2, 3), torch.randn(3, 3, 4), torch.ones(3, 3))
    with pytest.raises(ValueError, match="teacher_mask"):
        uld_loss(z, torch.ones(2, 3), torch.randn(2, 3, 4), torch.ones(2, 4))
