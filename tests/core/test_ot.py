"""Tests of cot2align_core.ot: batched Sinkhorn against POT, gradients, costs, the OT loss.

Inputs are fresh random tensors (and shapes) on every run; each test prints its seed, which
pytest shows when the test fails, so that a failure can be replayed with COT2ALIGN_TEST_SEED.
"""
from __future__ import annotations

import math

import numpy as np
import ot as pot
import pytest
import torch

from benchmarks.ot_discrimination import discrimination_check
from cot2align_core.ot import (
    COST_KINDS,
    DEFAULT_COST,
    DEFAULT_EPS,
    SinkhornResult,
    attention_cost,
    cosine_cost,
    ot_alignment_loss,
    pairwise_cost,
    sinkhorn,
    sq_euclidean_cost,
)

F64 = torch.float64
# Converged to float64 precision. Entropic OT with small eps on tiny problems can converge
# arbitrarily slowly (a 2x2 cost near a permutation: the off-diagonal mass is exp(-dC/eps)),
# in POT too; the tests that need convergence use eps large enough against their cost range.
TIGHT = dict(tol=1e-12, max_iter=50_000)


def randint(g, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def padded_problem(g, B, n_max, m_max, *, dtype=F64, n_min=1, m_min=1, weights="random"):
    """Costs [B, N, M] with unequal valid lengths per problem, weights 0 on the padding.

    Problem 0 has a single row and problem 1 a single column (when B allows): the edge cases
    always appear. Padded cost entries are garbage (large), which the solver must ignore.
    """
    ns = [randint(g, n_min, n_max) for _ in range(B)]
    ms = [randint(g, m_min, m_max) for _ in range(B)]
    if B > 1:
        ns[0], ms[1] = 1, 1
    # 2x2 problems near a permutation converge arbitrarily slowly for small eps (see TIGHT).
    ms = [3 if (n, m) == (2, 2) else m for n, m in zip(ns, ms)]
    N, M = max(ns), max(ms)
    C = torch.rand(B, N, M, generator=g, dtype=dtype)
    a = torch.zeros(B, N, dtype=dtype)
    b = torch.zeros(B, M, dtype=dtype)
    for k in range(B):
        if weights == "random":
            a[k, : ns[k]] = torch.rand(ns[k], generator=g, dtype=dtype) + 0.2
            b[k, : ms[k]] = torch.rand(ms[k], generator=g, dtype=dtype) + 0.2
        else:
            a[k, : ns[k]] = 1
            b[k, : ms[k]] = 1
        C[k, ns[k] :, :] = 1e3
        C[k, :, ms[k] :] = 1e3
    return C, a, b, ns, ms


# ------------------------------------------------------------------------------------------
# Against POT
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1.0, 0.2, 0.05])
def test_plans_and_values_match_pot_on_padded_batch(g, eps):
    C, a, b, ns, ms = padded_problem(g, 5, 17, 23)
    res = sinkhorn(C, a, b, eps=eps, **TIGHT)
    assert isinstance(res, SinkhornResult)
    assert res.plan.shape == C.shape and res.value.shape == (5,)
    for k in range(5):
        n, m = ns[k], ms[k]
        ak, bk = a[k, :n] / a[k, :n].sum(), b[k, :m] / b[k, :m].sum()
        Ck = C[k, :n, :m]
        T_ref = pot.sinkhorn(
            ak, bk, Ck, eps, method="sinkhorn_log", numItermax=1_000_000, stopThr=1e-14
        )
        ref = pot.solve(Ck, ak, bk, reg=eps, method="sinkhorn_log", max_iter=1_000_000, tol=1e-14)
        T = res.plan[k]
        torch.testing.assert_close(T[:n, :m], T_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(T[:n, :m], ref.plan, atol=1e-5, rtol=0)
        assert torch.all(T[n:, :] == 0) and torch.all(T[:, m:] == 0)  # padding exactly 0
        assert abs(float(res.value[k]) - float((T_ref * Ck).sum())) < 1e-5
        assert abs(float(res.value[k]) - float(ref.value_linear)) < 1e-5
        # reg_value is POT's objective <T, C> + eps KL(T || a b^T).
        assert abs(float(res.reg_value[k]) - float(ref.value)) < 1e-5
    assert float(res.marginal_error.max()) < 1e-10
    assert torch.isfinite(res.plan).all()


def test_uniform_weights_match_pot_batched_solver(g):
    B, n, m = randint(g, 2, 6), randint(g, 2, 30), randint(g, 2, 30)
    C = torch.rand(B, n, m, generator=g, dtype=F64)
    res = sinkhorn(C, eps=0.05, **TIGHT)  # a = b = None: uniform
    ref = pot.batch.solve_batch(C, reg=0.05, method="log_sinkhorn", max_iter=100_000, tol=1e-13, grad="detach")
    torch.testing.assert_close(res.plan, ref.plan, atol=1e-8, rtol=0)
    torch.testing.assert_close(res.value, ref.value_linear, atol=1e-8, rtol=0)
    for k in range(B):
        v = pot.sinkhorn2(
            torch.full((n,), 1 / n, dtype=F64), torch.full((m,), 1 / m, dtype=F64), C[k], 0.05,
            method="sinkhorn_log", numItermax=100_000, stopThr=1e-13,
        )
        assert abs(float(v) - float(res.value[k])) < 1e-8


def test_unbatched_and_broadcast_weights(g):
    n, m = randint(g, 1, 12), randint(g, 1, 12)
    C = torch.rand(n, m, generator=g, dtype=F64)
    a = torch.rand(n, generator=g, dtype=F64) + 0.1
    b = torch.rand(m, generator=g, dtype=F64) + 0.1
    single = sinkhorn(C, a, b, eps=0.1, **TIGHT)
    assert single.plan.shape == (n, m) and single.value.dim() == 0 and single.n_iter.dim() == 0
    # 1-D weights broadcast over a batched cost; weights are normalised (scale-free).
    batch = sinkhorn(torch.stack([C, C, C]), 3 * a, b, eps=0.1, **TIGHT)
    for k in range(3):
        torch.testing.assert_close(batch.plan[k], single.plan, atol=1e-12, rtol=0)
    torch.testing.assert_close(single.plan.sum(1), a / a.sum(), atol=1e-12, rtol=0)


def test_result_of_a_problem_does_not_depend_on_the_batch(g):
    C, a, b, ns, ms = padded_problem(g, 6, 20, 20)
    batch = sinkhorn(C, a, b, eps=0.05, tol=1e-9)
    for k in range(6):
        alone = sinkhorn(C[k], a[k], b[k], eps=0.05, tol=1e-9)
        torch.testing.assert_close(batch.plan[k], alone.plan, atol=1e-10, rtol=0)
        assert int(batch.n_iter[k]) == int(alone.n_iter)


def bmm_calls(monkeypatch, run):
    """``run()``'s result and the (first, second) operand shapes of every ``torch.bmm`` it made."""
    calls, bmm = [], torch.bmm

    def spy(x, y, **kw):
        calls.append((x.shape, y.shape))
        return bmm(x, y, **kw)

    monkeypatch.setattr(torch, "bmm", spy)
    try:
        return run(), calls
    finally:
        monkeypatch.setattr(torch, "bmm", bmm)


@pytest.mark.parametrize("grouped", [False, True])
def test_converged_problems_leave_the_iterations(g, monkeypatch, grouped):
    """On CPU a problem stops costing work once it converges: the batched mat-vecs run on the
    problems still iterating only, and every problem's plan is the one it gets alone."""
    import cot2align_core.ot as ot_module

    B = 9
    C, a, b, ns, ms = padded_problem(g, B, 24, 24, n_min=2, m_min=2)
    # Mixed convergence speeds: flat costs converge in one block, peaked ones take hundreds.
    scale = torch.rand(B, generator=g, dtype=F64).pow(3) * 3
    scale[0], scale[-1] = 0.01, 3.0  # at least one of each, whatever the draw
    C = C * scale[:, None, None]
    if grouped:
        monkeypatch.setattr(ot_module, "_CPU_BATCH_BYTES", 0)
        monkeypatch.setattr(ot_module, "_CPU_GROUP_BYTES", 3 * 2 * 8 * 24 * 24)
    kw = dict(eps=0.02, tol=1e-6, max_iter=300)
    batch, calls = bmm_calls(monkeypatch, lambda: sinkhorn(C, a, b, **kw))
    work = [x[0] for x, _ in calls]
    n_iter = batch.n_iter
    assert int(n_iter.min()) < int(n_iter.max())  # the draw mixes fast and slow problems
    # Two mat-vecs per problem and iteration (a few more when a block falls back to the log
    # domain, which does not call bmm): not the whole batch to the slowest one's end.
    assert sum(work) <= 2 * int(n_iter.sum())
    for k in range(B):
        alone = sinkhorn(C[k], a[k], b[k], **kw)
        assert int(batch.n_iter[k]) == int(alone.n_iter)
        torch.testing.assert_close(batch.plan[k], alone.plan, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_kernels_are_widened_onto_the_blas_path(g, monkeypatch, dtype):
    """Kernels under 400 entries are iterated with zero-weight columns of ones appended (torch's
    bmm loops plainly below that size): the plans are the narrow kernel's, to rounding."""
    import cot2align_core.ot as ot_module

    n, m = randint(g, 12, 30), randint(g, 5, 13)
    C, a, b, ns, ms = padded_problem(g, 6, n, m, dtype=dtype, n_min=2, m_min=2)
    C[0, ns[0]:, :] = float("nan")  # padding may hold anything
    kw = dict(eps=0.05, tol=1e-7 if dtype == F64 else 1e-5, max_iter=500)
    wide, calls = bmm_calls(monkeypatch, lambda: sinkhorn(C, a, b, **kw))
    shapes = [y[-2] * y[-1] for _, y in calls]
    box = max(ns) * max(ms)
    if box * 4 >= 400:  # widened unless it would more than quadruple
        assert shapes and min(shapes) >= 400, (box, set(shapes))
    monkeypatch.setattr(ot_module, "_CPU_BLAS_MIN_PRODUCT", 0)
    narrow = sinkhorn(C, a, b, **kw)
    atol = 1e-12 if dtype == F64 else 1e-6
    torch.testing.assert_close(wide.plan, narrow.plan, atol=atol, rtol=0)
    torch.testing.assert_close(wide.value, narrow.value, atol=atol, rtol=0)
    assert wide.n_iter.tolist() == narrow.n_iter.tolist()
    torch.testing.assert_close(wide.marginal_error, narrow.marginal_error, atol=atol, rtol=0)
    # Problems that stopped early did so because they met tol (a slow draw may use the budget).
    stopped = wide.n_iter < kw["max_iter"]
    assert bool((wide.marginal_error[stopped] <= 1.2 * kw["tol"]).all())


@pytest.mark.parametrize("eps", [0.05, 2e-3])
def test_cpu_groups_match_the_whole_batch(g, monkeypatch, eps):
    """Large CPU batches are iterated in cache-sized groups cropped to their valid entries."""
    import cot2align_core.ot as ot_module

    C, a, b, ns, ms = padded_problem(g, 7, 40, 40, n_min=2, m_min=2)
    C = C.clamp(max=1.0)
    C[0, ns[0]:, :] = float("nan")  # padding may hold anything
    kw = dict(eps=eps, tol=1e-9 if eps > 0.01 else 0, max_iter=400)
    monkeypatch.setattr(ot_module, "_CPU_BATCH_BYTES", 2**40)
    whole = sinkhorn(C, a, b, **kw)
    monkeypatch.setattr(ot_module, "_CPU_BATCH_BYTES", 0)
    # At most 1 or 2 problems per group (a box is at most the padded size).
    monkeypatch.setattr(ot_module, "_CPU_GROUP_BYTES", randint(g, 1, 2) * 2 * 8 * C.shape[1] * C.shape[2])
    groups = ot_module._groups(a > 0, b > 0, torch.zeros(7, dtype=torch.bool), 8)
    assert len(groups) > 1 and all(nr <= C.shape[1] and mc <= C.shape[2] for _, _, nr, mc in groups)
    Cg = C.clone().requires_grad_(True)
    grouped = sinkhorn(Cg, a, b, **kw)
    torch.testing.assert_close(grouped.plan, whole.plan, atol=1e-12, rtol=0)
    torch.testing.assert_close(grouped.value, whole.value, atol=1e-12, rtol=0)
    torch.testing.assert_close(grouped.reg_value, whole.reg_value, atol=1e-12, rtol=0)
    assert grouped.n_iter.tolist() == whole.n_iter.tolist()
    grouped.value.sum().backward()
    assert torch.equal(Cg.grad, grouped.plan)


def test_tol_and_max_iter(g):
    C = torch.rand(4, randint(g, 5, 30), randint(g, 5, 30), generator=g)
    fixed = sinkhorn(C, eps=0.05, tol=0, max_iter=37, check_every=10)
    assert fixed.n_iter.tolist() == [37] * 4  # tol=0: exactly max_iter
    conv = sinkhorn(C, eps=0.1, tol=1e-4)
    assert int(conv.n_iter.max()) < 1000
    assert float(conv.marginal_error.max()) <= 1.2e-4  # the returned plan's error (float32)
    assert (conv.n_iter % 10 == 0).all()  # checked once per block of check_every iterations


# ------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------


def central_difference(f, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    out = torch.zeros_like(x)
    with torch.no_grad():
        for idx in np.ndindex(*x.shape):
            xp, xm = x.clone(), x.clone()
            xp[idx] += h
            xm[idx] -= h
            out[idx] = (f(xp) - f(xm)) / (2 * h)
    return out


def test_envelope_gradient_is_the_plan_and_the_gradient_of_the_regularised_objective(g):
    """d value / d C = plan (by construction), which is d OT_eps / d C (envelope theorem)."""
    C, a, b, *_ = padded_problem(g, 3, 4, 5, n_min=2, m_min=2)  # problem 2 is not degenerate
    C.requires_grad_(True)
    eps = 0.2
    res = sinkhorn(C, a, b, eps=eps, **TIGHT)
    (dC,) = torch.autograd.grad(res.value.sum(), C)
    assert torch.equal(dC, res.plan)
    (dC_reg,) = torch.autograd.grad(sinkhorn(C, a, b, eps=eps, **TIGHT).reg_value.sum(), C)
    assert torch.equal(dC_reg, res.plan)
    fd = central_difference(lambda c: sinkhorn(c, a, b, eps=eps, **TIGHT).reg_value.sum(), C.detach())
    torch.testing.assert_close(fd, res.plan, atol=1e-7, rtol=0)
    # The plan is *not* the derivative of the transport cost <T*(C), C> itself: T* moves too.
    fd_lin = central_difference(lambda c: sinkhorn(c, a, b, eps=eps, **TIGHT).value.sum(), C.detach())
    assert float((fd_lin - res.plan).abs().max()) > 1e-4


def test_unrolled_gradient_matches_finite_differences(g):
    """Unrolled autodiff is the exact derivative of the computed value (fixed iterations)."""
    C, a, b, *_ = padded_problem(g, 3, 4, 5, n_min=2)
    C = C.clamp(max=1.0).requires_grad_(True)
    kw = dict(eps=0.1, tol=0, max_iter=23, check_every=5, grad="unroll")
    assert torch.autograd.gradcheck(lambda c: sinkhorn(c, a, b, **kw).value, (C,))
    assert torch.autograd.gradcheck(lambda c: sinkhorn(c, a, b, **kw).reg_value, (C,))
    assert torch.autograd.gradcheck(lambda c: sinkhorn(c, a, b, **kw).plan, (C,))
    # ...and through the (positive) weights.
    n, m = randint(g, 2, 4), randint(g, 2, 4)
    Cs = torch.rand(n, m, generator=g, dtype=F64)
    w = (torch.rand(n, generator=g, dtype=F64) + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: sinkhorn(Cs, w, **kw).value, (w,))
    # At convergence it is the derivative of <T*(C), C>, not the plan.
    res = sinkhorn(C, a, b, eps=0.3, grad="unroll", **TIGHT | dict(max_iter=3000))
    (dC,) = torch.autograd.grad(res.value.sum(), C)
    fd = central_difference(lambda c: sinkhorn(c, a, b, eps=0.3, **TIGHT).value.sum(), C.detach())
    torch.testing.assert_close(dC, fd, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", COST_KINDS)
def test_loss_gradient_wrt_student_states(g, kind):
    """Envelope: the gradient of the loss is that of sum_k OT_eps(C(x_k, y_k)) at convergence."""
    B, d = 3, randint(g, 2, 5)
    n, m = randint(g, 2, 5), randint(g, 2, 5)
    x = torch.randn(B, n, d, generator=g, dtype=F64)
    y = torch.randn(B, m, d, generator=g, dtype=F64)
    xm, ym = torch.ones(B, n), torch.ones(B, m)
    xm[1, n - 1 :] = 0
    ym[2, 1:] = 0
    eps = 0.5  # against cost ranges up to 4: well-conditioned, converges tightly
    x.requires_grad_(True)
    loss = ot_alignment_loss(x, y, xm, ym, cost=kind, eps=eps, reduction="sum", **TIGHT)
    (dx,) = torch.autograd.grad(loss, x)

    def objective(xx):
        C = pairwise_cost(xx, y, kind, y_mask=ym)
        return sinkhorn(C, xm.to(F64), ym.to(F64), eps=eps, **TIGHT).reg_value.sum()

    fd = central_difference(objective, x.detach())
    torch.testing.assert_close(dx, fd, atol=1e-6, rtol=1e-5)
    assert torch.all(dx[1, n - 1 :] == 0)  # padded student tokens get no gradient
    # Unrolled: gradcheck against the loss as computed (fixed iteration count).
    kw = dict(cost=kind, eps=eps, tol=0, max_iter=15, grad="unroll", reduction="mean")
    assert torch.autograd.gradcheck(lambda xx: ot_alignment_loss(xx, y, xm, ym, **kw), (x,))


def test_envelope_memory_does_not_grow_with_iterations(g):
    def saved_tensors(max_iter: int, grad: str) -> int:
        count = 0

        def pack(t):
            nonlocal count
            count += 1
            return t

        C = torch.rand(4, randint(g, 5, 40), randint(g, 5, 40), generator=g, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            res = sinkhorn(C, eps=0.05, tol=0, max_iter=max_iter, grad=grad)
            res.value.sum()
        return count

    envelope = [saved_tensors(k, "envelope") for k in (10, 100, 400)]
    assert envelope[0] == envelope[1] == envelope[2] <= 2
    unroll = [saved_tensors(k, "unroll") for k in (10, 100)]
    assert unroll[1] > 5 * unroll[0]  # documented: unrolling stores every iteration


# ------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad", ["envelope", "unroll"])
def test_empty_sides_give_zero_value_plan_and_gradient(g, grad):
    C, a, b, *_ = padded_problem(g, 4, 9, 9, dtype=torch.float32)
    a[1] = 0  # no source token
    b[2] = 0  # no target token
    a[3] = 0
    b[3] = 0
    C.requires_grad_(True)
    res = sinkhorn(C, a, b, eps=0.05, grad=grad)
    for k in (1, 2, 3):
        assert float(res.value[k].detach()) == 0 and float(res.reg_value[k].detach()) == 0
        assert torch.all(res.plan[k] == 0)
        assert int(res.n_iter[k]) == 0 and float(res.marginal_error[k]) == 0
    (res.value.sum() + res.reg_value.sum()).backward()
    assert torch.isfinite(C.grad).all()
    assert torch.all(C.grad[1:] == 0)
    assert float(res.value[0].detach()) > 0


def test_single_token_and_unequal_lengths(g):
    m = randint(g, 1, 30)
    b = torch.rand(m, generator=g, dtype=F64) + 0.1
    C = torch.rand(1, m, generator=g, dtype=F64)
    res = sinkhorn(C, None, b, eps=0.05)
    # One source token: the only feasible plan sends all of it along b.
    torch.testing.assert_close(res.plan[0], b / b.sum(), atol=1e-12, rtol=0)
    torch.testing.assert_close(res.value, (b / b.sum() * C[0]).sum(), atol=1e-12, rtol=0)
    res = sinkhorn(C.T.contiguous(), b, None, eps=0.05)
    torch.testing.assert_close(res.plan[:, 0], b / b.sum(), atol=1e-12, rtol=0)


def reference_log_sinkhorn(C, a, b, eps, n_iter):
    """Textbook log-domain Sinkhorn in float64 (u first, from f = g = 0), one problem."""
    K, la, lb = -C / eps, a.log(), b.log()
    u, v = la.clone(), lb.clone()
    for _ in range(n_iter):
        u = la - torch.logsumexp(K + v[None, :], 1)
        v = lb - torch.logsumexp(K + u[:, None], 0)
    return torch.exp(K + u[:, None] + v[None, :])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_eps_follows_the_log_domain_iterates(g, dtype):
    """eps = 1e-3 x the cost range: exp(-C/eps) underflows, the scalings must be stabilised.

    Convergence is slow there (thousands of iterations), so rather than converging, compare the
    iterates after a fixed number of iterations with a textbook log-domain loop in float64.
    """
    scale = 10.0 ** randint(g, 0, 2)
    C, a, b, ns, ms = padded_problem(g, 3, 16, 16, dtype=F64, n_min=2, m_min=2)
    C = C.clamp(max=1.0) * scale
    eps, n_iter = 1e-3 * scale, randint(g, 300, 1500)
    res = sinkhorn(C.to(dtype), a.to(dtype), b.to(dtype), eps=eps, tol=0, max_iter=n_iter)
    assert torch.isfinite(res.plan).all() and torch.isfinite(res.value).all()
    assert torch.isfinite(res.marginal_error).all() and res.n_iter.tolist() == [n_iter] * 3
    for k in (1, 2):
        n, m = ns[k], ms[k]
        ak, bk = a[k, :n] / a[k, :n].sum(), b[k, :m] / b[k, :m].sum()
        ref = reference_log_sinkhorn(C[k, :n, :m], ak, bk, eps, n_iter)
        l1 = float((res.plan[k, :n, :m].double() - ref).abs().sum())
        assert l1 < (1e-10 if dtype == F64 else 1e-4), l1
    # With a tolerance it stays finite also in float32 and gets as close to the marginals as
    # float64 does. Some problems need more than 20 000 iterations at eps = 1e-3 x range in
    # either precision (a 2 x 3 one drawn in CI needed 30 560, float32 and float64 alike), so
    # float64 with the same budget is the yardstick, not the tolerance.
    conv = sinkhorn(C.float(), a.float(), b.float(), eps=eps, tol=1e-3, max_iter=20_000)
    conv64 = sinkhorn(C, a, b, eps=eps, tol=1e-3, max_iter=20_000)
    assert torch.isfinite(conv.plan).all()
    errs = zip(conv.marginal_error.tolist(), conv64.marginal_error.tolist(), conv.n_iter.tolist())
    for err, err64, it in errs:
        assert err <= 1.1e-3 or (it == 20_000 and err <= err64 + 1e-4), (err, err64, it)


def test_non_finite_costs_on_padding_are_ignored(g):
    C, a, b, ns, ms = padded_problem(g, 3, 8, 8, dtype=torch.float32, n_min=2)
    clean = sinkhorn(C, a, b, eps=0.05)
    C[0, ns[0] :, :] = float("nan")
    C[2, :, ms[2] :] = float("inf")
    C.requires_grad_(True)
    res = sinkhorn(C, a, b, eps=0.05)
    torch.testing.assert_close(res.plan, clean.plan)
    res.value.sum().backward()
    assert torch.isfinite(C.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_costs_accumulate_in_float32(g, dtype):
    C, a, b, *_ = padded_problem(g, 3, 12, 12, dtype=torch.float32)
    C = C.clamp(max=2.0).to(dtype).requires_grad_(True)
    a, b = a.to(dtype), b.to(dtype)
    res = sinkhorn(C, a, b, eps=0.05)
    assert res.plan.dtype == torch.float32 and res.value.dtype == torch.float32
    ref = sinkhorn(C.detach().float(), a.float(), b.float(), eps=0.05)
    torch.testing.assert_close(res.plan, ref.plan, atol=1e-6, rtol=0)
    res.value.sum().backward()
    assert C.grad.dtype == dtype and torch.isfinite(C.grad.float()).all()
    x = torch.randn(2, 5, 8, generator=g).to(dtype)
    y = torch.randn(2, 6, 8, generator=g).to(dtype)
    loss = ot_alignment_loss(x, y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ------------------------------------------------------------------------------------------
# Argument checks
# ------------------------------------------------------------------------------------------


def test_sinkhorn_argument_errors():
    C = torch.rand(2, 3, 4)
    with pytest.raises(ValueError, match="eps must be"):
        sinkhorn(C, eps=0)
    with pytest.raises(ValueError, match="eps must be"):
        sinkhorn(C, eps=-1.0)
    with pytest.raises(ValueError, match="eps must be"):
        sinkhorn(C, eps=float("nan"))
    with pytest.raises(ValueError, match=r"a has shape \[2, 4\] but cost needs"):
        sinkhorn(C, torch.ones(2, 4), eps=0.1)
    with pytest.raises(ValueError, match="b has shape"):
        sinkhorn(C, None, torch.ones(3), eps=0.1)
    with pytest.raises(ValueError, match="negative weights"):
        sinkhorn(C, torch.tensor([1.0, -1.0, 1.0]), eps=0.1)
    with pytest.raises(ValueError, match="NaN or inf"):
        sinkhorn(C, torch.tensor([1.0, float("nan"), 1.0]), eps=0.1)
    with pytest.raises(ValueError, match="grad must be one of"):
        sinkhorn(C, eps=0.1, grad="autodiff")
    with pytest.raises(ValueError, match="max_iter"):
        sinkhorn(C, eps=0.1, max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        sinkhorn(C, eps=0.1, tol=-1)
    with pytest.raises(ValueError, match=r"cost must have shape \[n, m\] or \[B, n, m\]"):
        sinkhorn(torch.rand(3), eps=0.1)
    with pytest.raises(ValueError, match="floating"):
        sinkhorn(torch.ones(2, 2, dtype=torch.int64), eps=0.1)
    with pytest.raises(ValueError, match="empty dimension"):
        sinkhorn(torch.rand(2, 0, 3), eps=0.1)
    with pytest.raises(ValueError, match=r"a has shape \[2, 3\]"):  # unbatched cost, batched a
        sinkhorn(torch.rand(3, 4), torch.ones(2, 3), eps=0.1)


def test_cost_and_loss_argument_errors():
    x, y = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="unknown cost kind 'dot'"):
        pairwise_cost(x, y, "dot")
    with pytest.raises(ValueError, match="widths 4 and 6"):
        cosine_cost(x, torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="batch sizes"):
        cosine_cost(x, torch.randn(3, 5, 4))
    with pytest.raises(ValueError, match="y_mask has shape"):
        attention_cost(x, y, torch.ones(2, 4))
    with pytest.raises(ValueError, match="reduction must be one of"):
        ot_alignment_loss(x, y, reduction="avg")
    with pytest.raises(ValueError, match="unknown cost kind"):
        ot_alignment_loss(x, y, cost="l1")
    with pytest.raises(ValueError, match=r"student_mask has shape \[2, 4\]"):
        ot_alignment_loss(x, y, torch.ones(2, 4))
    with pytest.raises(ValueError, match="student must be a"):
        ot_alignment_loss(x[0], y)
    with pytest.raises(ValueError, match="eps must be"):
        ot_alignment_loss(x, y, eps=0.0)


# ------------------------------------------------------------------------------------------
# Costs
# ------------------------------------------------------------------------------------------


def naive_cost(x, y, kind, y_mask=None):
    """Float64 loops, written from the definitions."""
    x, y = x.double(), y.double()
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    C = torch.zeros(n, m, dtype=F64)
    valid = [True] * m if y_mask is None else [bool(v) for v in y_mask]
    for i in range(n):
        logits = []
        for j in range(m):
            xi, yj = x[i], y[j]
            nx, ny = math.sqrt(float(xi @ xi) + 1e-16), math.sqrt(float(yj @ yj) + 1e-16)
            cos = float(xi @ yj) / (nx * ny)
            if kind == "cosine":
                C[i, j] = min(max(1 - cos, 0.0), 2.0)
            elif kind == "sq_euclidean":
                diff = xi / nx - yj / ny
                C[i, j] = float(diff @ diff)
            else:
                logits.append(math.sqrt(d) * (float(xi @ yj) / (nx * ny)) if valid[j] else -math.inf)
        if kind == "attention":
            top = max(logits)
            if top == -math.inf:
                C[i] = 1.0
                continue
            z = sum(math.exp(t - top) for t in logits)
            for j in range(m):
                C[i, j] = 1 - math.exp(logits[j] - top) / z
    return C


@pytest.mark.parametrize("kind", COST_KINDS)
def test_costs_match_naive_loops(g, kind):
    B, n, m, d = randint(g, 1, 3), randint(g, 1, 9), randint(g, 1, 9), randint(g, 1, 16)
    scale = 10.0 ** randint(g, -2, 3)  # hidden-state scales vary wildly between layers
    x = scale * torch.randn(B, n, d, generator=g, dtype=F64)
    y = scale * torch.randn(B, m, d, generator=g, dtype=F64)
    x[0, 0] = 0  # a zero vector (padding)
    y_mask = (torch.rand(B, m, generator=g) > 0.3).float()
    y_mask[0] = 0  # a row with no valid column
    C = pairwise_cost(x, y, kind, y_mask=y_mask)
    assert C.shape == (B, n, m) and torch.isfinite(C).all()
    lo, hi = {"cosine": (0, 2), "sq_euclidean": (0, 4), "attention": (0, 1)}[kind]
    assert float(C.min()) >= lo and float(C.max()) <= hi
    for k in range(B):
        ref = naive_cost(x[k], y[k], kind, y_mask[k] if kind == "attention" else None)
        torch.testing.assert_close(C[k], ref, atol=1e-10, rtol=1e-10)
    # Unbatched inputs, same values.
    torch.testing.assert_close(pairwise_cost(x[-1], y[-1], kind, y_mask=y_mask[-1]), C[-1])


def test_cost_relations_and_zero_vectors(g):
    x = torch.randn(2, 6, 8, generator=g, dtype=F64)
    y = torch.randn(2, 7, 8, generator=g, dtype=F64)
    torch.testing.assert_close(sq_euclidean_cost(x, y), 2 * cosine_cost(x, y))
    # Scale-free: a layer's scale does not change the cost.
    torch.testing.assert_close(cosine_cost(1e3 * x, 1e-2 * y), cosine_cost(x, y))
    torch.testing.assert_close(attention_cost(1e3 * x, y), attention_cost(x, y))
    # The raw (released-code) variant is not scale-free.
    assert not torch.allclose(attention_cost(1e3 * x, y, normalize=False), attention_cost(x, y, normalize=False))
    # Zero vectors: finite values and gradients.
    x[0, 0] = 0
    x.requires_grad_(True)
    for kind in COST_KINDS:
        C = pairwise_cost(x, y, kind)
        assert torch.isfinite(C).all()
        (gx,) = torch.autograd.grad(C.sum(), x)
        assert torch.isfinite(gx).all()
    assert float(cosine_cost(x, y)[0, 0].detach().sub(1).abs().max()) < 1e-12
    # Half inputs: the cost is float32.
    assert cosine_cost(x.detach().half(), y.half()).dtype == torch.float32


# ------------------------------------------------------------------------------------------
# The loss
# ------------------------------------------------------------------------------------------


def test_loss_reductions_and_empty_examples(g):
    B, n, m, d = 5, randint(g, 2, 10), randint(g, 2, 10), 16
    x = torch.randn(B, n, d, generator=g, requires_grad=True)
    y = torch.randn(B, m, d, generator=g)
    xm, ym = torch.ones(B, n), torch.ones(B, m)
    xm[1] = 0  # no student response token
    ym[3] = 0  # no teacher response token
    xm[4, 1:] = 0  # a single token
    per = ot_alignment_loss(x, y, xm, ym, reduction="none")
    assert per.shape == (B,) and float(per[1].detach()) == 0 and float(per[3].detach()) == 0
    mean = ot_alignment_loss(x, y, xm, ym)
    torch.testing.assert_close(mean, per.sum() / 3)  # empty examples leave the denominator
    torch.testing.assert_close(ot_alignment_loss(x, y, xm, ym, reduction="sum"), per.sum())
    mean.backward()
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[1] == 0)
    # Boolean masks work the same; None means all tokens.
    torch.testing.assert_close(ot_alignment_loss(x, y, xm.bool(), ym.bool()), mean)
    torch.testing.assert_close(
        ot_alignment_loss(x, y), ot_alignment_loss(x, y, torch.ones(B, n), torch.ones(B, m))
    )
    # A batch with nothing to align: 0, and a zero (not NaN) gradient.
    x.grad = None
    zero = ot_alignment_loss(x, y, torch.zeros(B, n), ym)
    zero.backward()
    assert float(zero.detach()) == 0 and torch.all(x.grad == 0)


def test_loss_is_invariant_to_token_order_and_padding_layout(g):
    B, n, m, d = 3, randint(g, 3, 12), randint(g, 3, 12), 8
    x = torch.randn(B, n, d, generator=g, dtype=F64)
    y = torch.randn(B, m, d, generator=g, dtype=F64)
    kw = dict(reduction="none", tol=1e-10)
    base = ot_alignment_loss(x, y, **kw)
    px, py = torch.randperm(n, generator=g), torch.randperm(m, generator=g)
    torch.testing.assert_close(ot_alignment_loss(x[:, px], y[:, py], **kw), base, atol=1e-8, rtol=0)
    # Extra padding (zero states, mask 0) changes nothing.
    xp = torch.cat([x, torch.zeros(B, 4, d, dtype=F64)], 1)
    xm = torch.cat([torch.ones(B, n), torch.zeros(B, 4)], 1)
    torch.testing.assert_close(ot_alignment_loss(xp, y, xm, None, **kw), base, atol=1e-8, rtol=0)


def test_default_loss_discriminates_aligned_from_unrelated_sequences():
    res = discrimination_check()  # the defaults: DEFAULT_COST, DEFAULT_EPS, fresh random data
    print(res)
    assert res["cost"] == DEFAULT_COST and res["eps"] == DEFAULT_EPS
    assert res["ratio"] < 0.5, res
    assert res["margin"] > 0.1, res
    assert res["pair_accuracy"] >= 0.9, res
    # The released code's setting (attention cost, eps = 10) does not discriminate.
    authors = discrimination_check(cost="attention", eps=10.0, n_pairs=8)
    print(authors)
    assert authors["ratio"] > 0.99, authors


# ------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_matches_cpu(g):
    C, a, b, *_ = padded_problem(g, 8, 64, 80, dtype=torch.float32)
    C = C.clamp(max=2.0)
    cpu = sinkhorn(C, a, b, eps=0.05, tol=1e-5)
    Cc = C.cuda().requires_grad_(True)
    gpu = sinkhorn(Cc, a.cuda(), b.cuda(), eps=0.05, tol=1e-5)
    assert gpu.plan.is_cuda and gpu.value.is_cuda
    torch.testing.assert_close(gpu.plan.cpu(), cpu.plan, atol=1e-5, rtol=0)
    torch.testing.assert_close(gpu.value.cpu(), cpu.value, atol=1e-5, rtol=1e-5)
    gpu.value.sum().backward()
    torch.testing.assert_close(Cc.grad.cpu(), cpu.plan, atol=1e-5, rtol=0)
    x = torch.randn(4, 20, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(4, 30, 32, device="cuda", dtype=torch.bfloat16)
    loss = ot_alignment_loss(x, y, grad="unroll", max_iter=50)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss.cpu(), ot_alignment_loss(x.detach().cpu(), y.cpu(), max_iter=50), atol=1e-4, rtol=1e-4)
