"""DSKD with cross-model attention: shapes, a naive float64 re-implementation, gradient flow."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cot2align_core.dskd import CrossModelAttention, dskd_loss

D_S, D_T, V_S, V_T = 6, 5, 11, 9


def _inputs(seed, B=3, R_s=5, R_t=4, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    ns, nt = [5, 2, 4][:B], [3, 4, 1][:B]
    d = dict(
        student_logits=torch.randn(B, R_s, V_S, generator=gen, dtype=dtype),
        student_hidden=torch.randn(B, R_s, D_S, generator=gen, dtype=dtype),
        student_input_ids=torch.randint(0, V_S, (B, R_s), generator=gen),
        student_target_ids=torch.randint(0, V_S, (B, R_s), generator=gen),
        student_mask=torch.arange(R_s)[None] < torch.tensor(ns)[:, None],
        student_embed=torch.randn(V_S, D_S, generator=gen, dtype=dtype),
        student_head=torch.randn(V_S, D_S, generator=gen, dtype=dtype),
        teacher_hidden=torch.randn(B, R_t, D_T, generator=gen, dtype=dtype) * 3,
        teacher_input_ids=torch.randint(0, V_T, (B, R_t), generator=gen),
        teacher_target_ids=torch.randint(0, V_T, (B, R_t), generator=gen),
        teacher_mask=torch.arange(R_t)[None] < torch.tensor(nt)[:, None],
        teacher_embed=torch.randn(V_T, D_T, generator=gen, dtype=dtype) * 0.1,
        teacher_head=torch.randn(V_T, D_T, generator=gen, dtype=dtype),
    )
    d["teacher_logits"] = torch.randn(B, R_t, V_T, generator=gen, dtype=dtype) * 2
    return d


def _cma(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return CrossModelAttention(D_S, D_T).to(dtype)


def _np(t):
    return t.detach().double().numpy()


def _naive_dskd(cma, d, T):
    """Per example and per position, in numpy float64."""
    Wq, bq = _np(cma.query.weight), _np(cma.query.bias)
    Wt, bt = _np(cma.t2s.weight), _np(cma.t2s.bias)
    Ws, bs = _np(cma.s2t.weight), _np(cma.s2t.bias)
    E_s, H_s, E_t, H_t = (_np(d[k]) for k in ("student_embed", "student_head", "teacher_embed",
                                               "teacher_head"))
    B = d["student_logits"].shape[0]
    sm, tm = d["student_mask"], d["teacher_mask"]
    s_pos = [[r for r in range(sm.shape[1]) if sm[b, r]] for b in range(B)]
    t_pos = [[u for u in range(tm.shape[1]) if tm[b, u]] for b in range(B)]

    def std(vectors):
        x = np.concatenate([np.ravel(v) for v in vectors])
        return math.sqrt(((x - x.mean()) ** 2).sum() / (x.size - 1))

    t_in = {(b, u): E_t[int(d["teacher_input_ids"][b, u])] for b in range(B) for u in t_pos[b]}
    t_tg = {(b, u): E_t[int(d["teacher_target_ids"][b, u])] for b in range(B) for u in t_pos[b]}
    t_h = {(b, u): _np(d["teacher_hidden"][b, u]) for b in range(B) for u in t_pos[b]}
    sd_k = std([np.concatenate([t_in[k], t_tg[k]]) for k in t_in])
    sd_h, sd_e = std(list(t_h.values())), std(list(t_tg.values()))

    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()

    def kl(p, q):
        return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))

    ce_sum = kd_sum = s2t_sum = 0.0
    n_s = sum(len(p) for p in s_pos)
    for b in range(B):
        keys = {u: np.concatenate([t_in[b, u], t_tg[b, u]]) / sd_k for u in t_pos[b]}
        vals = {u: Wt @ (t_h[b, u] / sd_h + t_tg[b, u] / sd_e) + bt for u in t_pos[b]}
        scores = {}
        for r in s_pos[b]:
            q = Wq @ np.concatenate([E_s[int(d["student_input_ids"][b, r])],
                                     E_s[int(d["student_target_ids"][b, r])]]) + bq
            for u in t_pos[b]:
                scores[r, u] = float(q @ keys[u]) / math.sqrt(2 * D_T)
        for r in s_pos[b]:
            w = softmax(np.array([scores[r, u] for u in t_pos[b]]))
            h = sum(wi * vals[u] for wi, u in zip(w, t_pos[b]))
            z = H_s @ h
            y = int(d["student_target_ids"][b, r])
            ce_sum += -math.log(softmax(z)[y])
            if int(np.argmax(z)) == y:
                kd_sum += kl(softmax(z / T), softmax(_np(d["student_logits"][b, r]) / T))
        for u in t_pos[b]:
            w = softmax(np.array([scores[r, u] for r in s_pos[b]]))
            h = sum(wi * (Ws @ _np(d["student_hidden"][b, r]) + bs) for wi, r in zip(w, s_pos[b]))
            z = H_t @ h
            s2t_sum += kl(softmax(_np(d["teacher_logits"][b, u]) / T), softmax(z / T))
    # DSKD divides every term by the student token count (s2t_kd too).
    return {"t2s_ce": ce_sum / n_s, "t2s_kd": kd_sum / n_s, "s2t_kd": s2t_sum / n_s}


def test_cma_shapes():
    cma = CrossModelAttention(D_S, D_T)
    assert cma.query.in_features == 2 * D_S and cma.query.out_features == 2 * D_T
    d = _inputs(0, dtype=torch.float32)
    out = cma(student_hidden=d["student_hidden"],
              student_input_embeds=d["student_embed"][d["student_input_ids"]],
              student_target_embeds=d["student_embed"][d["student_target_ids"]],
              student_mask=d["student_mask"], teacher_hidden=d["teacher_hidden"],
              teacher_input_embeds=d["teacher_embed"][d["teacher_input_ids"]],
              teacher_target_embeds=d["teacher_embed"][d["teacher_target_ids"]],
              teacher_mask=d["teacher_mask"])
    assert out.t2s_hidden.shape == (3, 5, D_S)
    assert out.s2t_hidden.shape == (3, 4, D_T)
    assert out.scores.shape == (3, 5, 4)
    with pytest.raises(ValueError, match="teacher_mask"):
        cma(student_hidden=d["student_hidden"],
            student_input_embeds=d["student_embed"][d["student_input_ids"]],
            student_target_embeds=d["student_embed"][d["student_target_ids"]],
            student_mask=d["student_mask"], teacher_hidden=d["teacher_hidden"],
            teacher_input_embeds=d["teacher_embed"][d["teacher_input_ids"]],
            teacher_target_embeds=d["teacher_embed"][d["teacher_target_ids"]],
            teacher_mask=d["teacher_mask"][:, :2])
    with pytest.raises(ValueError, match="widths"):
        CrossModelAttention(D_S + 1, D_T)(
            student_hidden=d["student_hidden"], student_input_embeds=None,
            student_target_embeds=None, student_mask=None, teacher_hidden=d["teacher_hidden"],
            teacher_input_embeds=None, teacher_target_embeds=None, teacher_mask=None)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_dskd_loss_matches_naive(seed):
    cma = _cma(seed)
    d = _inputs(seed)
    # t2s_kd only counts the positions where the carried teacher predicts the target: sharpen
    # the t2s projection until there are some, so that the term is not trivially 0.
    for _ in range(5):
        _, parts = dskd_loss(cma, **d)
        if parts["t2s_acc"] > 0:
            break
        with torch.no_grad():
            cma.t2s.weight.mul_(3)
            cma.t2s.bias.normal_()
    T = 1.6
    loss, parts = dskd_loss(cma, **d, temperature=T)
    want = _naive_dskd(cma, d, T)
    for k, v in want.items():
        assert parts[k].item() == pytest.approx(v, rel=1e-8, abs=1e-12), k
    assert want["t2s_kd"] > 0
    assert loss.item() == pytest.approx(sum(want.values()), rel=1e-8)
    assert 0 < parts["t2s_acc"].item() <= 1 and 0 <= parts["s2t_acc"].item() <= 1


def test_dskd_topk_with_full_k_equals_full_logits():
    cma = _cma(2)
    d = _inputs(2)
    full, _ = dskd_loss(cma, **d)
    top = d["teacher_logits"].topk(V_T, dim=-1)
    d2 = dict(d, teacher_logits=top.values)
    topk, _ = dskd_loss(cma, **d2, teacher_topk_ids=top.indices)
    assert topk.item() == pytest.approx(full.item(), rel=1e-10)
    with pytest.raises(ValueError, match="top-k"):
        dskd_loss(cma, **dict(d, teacher_logits=top.values[..., :3]))


def test_dskd_gradient_flow():
    cma = _cma(3, torch.float32)
    d = _inputs(3, dtype=torch.float32)
    d["teacher_hidden"] = d["teacher_hidden"].half()  # a float16 cache
    for k in ("student_logits", "student_hidden", "student_embed", "student_head", "teacher_embed",
              "teacher_head"):
        d[k].requires_grad_(True)
    with torch.no_grad():
        cma.t2s.weight.mul_(20)
    loss, parts = dskd_loss(cma, **d)
    loss.backward()
    for name, p in cma.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert d["student_hidden"].grad.abs().sum() > 0  # through s2t
    assert d["student_logits"].grad.abs().sum() > 0  # through t2s_kd
    for k in ("student_embed", "student_head", "teacher_embed", "teacher_head"):
        assert d[k].grad is None, k  # used detached, as in DSKD
    # Padded positions get no gradient.
    assert (d["student_hidden"].grad[~d["student_mask"]] == 0).all()
    assert (d["student_logits"].grad[~d["student_mask"]] == 0).all()


def test_dskd_gradcheck_small():
    cma = _cma(4)
    d = _inputs(4, B=2, R_s=3, R_t=3)
    hid = d.pop("student_hidden").requires_grad_(True)
    logits = d.pop("student_logits").requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda h, z: dskd_loss(cma, student_hidden=h, student_logits=z, **d)[0], (hid, logits),
        fast_mode=True)
