r"""Entropic optimal transport between token sequences: batched Sinkhorn, costs, the OT loss.

CoT2Align aligns a student's response-token representations :math:`X \in \mathbb{R}^{n \times d}`
with the teacher's (projected) :math:`Y \in \mathbb{R}^{m \times d}` without any token-to-token
mapping: the two sequences come from different tokenizers, so :math:`n \neq m` and position
:math:`i` of one has no fixed partner in the other. The loss is the cost of the entropic optimal
transport plan between the two uniform token distributions:

.. math::
    \mathbf{T}^\star = \mathop{\arg\min}_{\mathbf{T} \in U(\mathbf{a}, \mathbf{b})}
        \langle \mathbf{T}, \mathbf{C} \rangle_F
        + \varepsilon\, \mathrm{KL}(\mathbf{T} \,\|\, \mathbf{a} \mathbf{b}^\top),
    \qquad
    U(\mathbf{a}, \mathbf{b}) = \{\mathbf{T} \geq 0,\ \mathbf{T}\mathbf{1} = \mathbf{a},\
        \mathbf{T}^\top \mathbf{1} = \mathbf{b}\},

    \mathcal{L}(X, Y) = \langle \mathbf{T}^\star, \mathbf{C} \rangle_F
        = \sum_{ij} T^\star_{ij} C_{ij}.

Everything here is batched: ``B`` problems of different lengths are padded to ``[B, n, m]`` and
solved by one set of tensor operations on the inputs' device; a zero weight marks a padded
position. No Prefect, no config objects: plain tensors and keyword arguments.

Choices made here, and why. The method [4] fixes the loss (entropic OT between the uniform
distributions over the response tokens, per layer, on top of a KD loss) but not a usable
regularisation; the choices below are this implementation's:

- ``eps`` is absolute, in cost units. The released code of [4] used ``eps = 10`` on its
  attention cost in ``[0, 1]``: the plan is then almost the uniform ``a b^T`` and the loss is
  almost the mean cost, so aligned and unrelated sequences score the same (0.9450 vs 0.9453
  measured on the released code). The loss is only useful if it separates the two, so
  :data:`DEFAULT_EPS` is 0.05 on the cosine cost (range ``[0, 2]``), chosen with
  ``benchmarks/ot_discrimination.py`` (synthetic student/teacher states of the same texts
  through different tokenizers, 10 seeds of 32 held-out pairs): aligned/unrelated ratio
  0.43-0.45 (margin 0.19-0.21, each student's own teacher retrieved among 32 every time),
  against 0.9992-0.9996 (retrieval at chance) for the released setting, attention cost with
  eps = 10. A smaller eps separates about as well (ratio 0.43 at eps = 0.01, with a smaller
  margin) and needs many more iterations; eps = 0.1 gives 0.53, eps = 1 gives 0.94.
- Hidden states are normalised before any cost (their scale differs by orders of magnitude
  between layers): the cosine cost is scale-free; the squared Euclidean cost is taken between
  L2-normalised vectors; the attention cost between RMS-normalised vectors.
- Gradients by the envelope theorem by default (memory does not grow with the iterations).

References
----------
.. [1] M. Cuturi. Sinkhorn Distances: Lightspeed Computation of Optimal Transport. NeurIPS 2013.
.. [2] B. Schmitzer. Stabilized Sparse Scaling Algorithms for Entropy Regularized Transport
   Problems. SIAM J. Sci. Comput. 41(3), 2019 (log-domain potentials with absorption).
.. [3] G. Peyré, M. Cuturi. Computational Optimal Transport. Foundations and Trends in Machine
   Learning 11(5-6), 2019 (chapter 4: Sinkhorn, log-domain, the envelope gradient, Prop. 4.6).
.. [4] CoT2Align: Cross-Chain of Thought Distillation via Optimal Transport Alignment for
   Language Models with Different Tokenizers. arXiv:2502.16806.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_COST",
    "DEFAULT_EPS",
    "DEFAULT_MAX_ITER",
    "DEFAULT_TOL",
    "COST_KINDS",
    "SinkhornResult",
    "sinkhorn",
    "cosine_cost",
    "sq_euclidean_cost",
    "attention_cost",
    "pairwise_cost",
    "ot_alignment_loss",
]

#: Default cost between token representations (1 - cosine similarity, range [0, 2]).
DEFAULT_COST = "cosine"
#: Default entropic regularisation, in cost units (for the cosine cost, range [0, 2]).
DEFAULT_EPS = 0.05
#: Default cap on Sinkhorn iterations.
DEFAULT_MAX_ITER = 1000
#: Default tolerance on the marginal error ||T1 - a||_1 + ||T^T 1 - b||_1 (mass units, sum 1).
DEFAULT_TOL = 1e-4
#: Default number of iterations between two convergence checks (one host sync each).
DEFAULT_CHECK_EVERY = 10

GRAD_MODES = ("envelope", "unroll")
COST_KINDS = ("cosine", "sq_euclidean", "attention")

# Log-weight that stands for log(0) at padded positions: finite, so that no inf - inf or
# 0 * inf ever appears (in the iterations or in their gradients); the padded rows/columns of
# the plan get the scaling 0, hence are exactly 0.
_NEG = -1e30
_NORM_EPS = 1e-8


@dataclass(frozen=True)
class SinkhornResult:
    """Output of :func:`sinkhorn` (leading ``B`` dimension absent for an unbatched cost).

    Attributes
    ----------
    plan : Tensor, shape (B, n, m)
        The entropic transport plan :math:`\\mathbf{T}`; exactly 0 on padded rows/columns and
        for problems with an empty side. float32 for float16/bfloat16/float32 costs, float64 for
        float64 costs. Detached from the graph in ``grad="envelope"`` mode.
    value : Tensor, shape (B,)
        Transport cost :math:`\\langle \\mathbf{T}, \\mathbf{C} \\rangle_F` (the loss of the
        method), 0 for problems with an empty side. Its gradient with respect to ``cost`` is
        ``plan`` in envelope mode (see :func:`sinkhorn`).
    reg_value : Tensor, shape (B,)
        The entropic OT objective
        :math:`\\mathrm{OT}_\\varepsilon = \\langle \\mathbf{T}, \\mathbf{C} \\rangle
        + \\varepsilon\\,\\mathrm{KL}(\\mathbf{T} \\| \\mathbf{a}\\mathbf{b}^\\top)` evaluated at
        ``plan`` (the ``value`` of ``ot.solve(M, a, b, reg=eps)``, reg_type "KL"), >= ``value``.
        Its exact gradient with respect to the cost at convergence is ``plan``.
    n_iter : Tensor (int64), shape (B,)
        Sinkhorn iterations applied to each problem (a problem is frozen once converged).
    marginal_error : Tensor, shape (B,)
        :math:`\\|\\mathbf{T}\\mathbf{1} - \\mathbf{a}\\|_1 + \\|\\mathbf{T}^\\top\\mathbf{1}
        - \\mathbf{b}\\|_1` of the returned plan, with ``a`` and ``b`` normalised to sum 1.
    """

    plan: Tensor
    value: Tensor
    reg_value: Tensor
    n_iter: Tensor
    marginal_error: Tensor


# --------------------------------------------------------------------------------------------
# Sinkhorn
# --------------------------------------------------------------------------------------------


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating type (fp16, bf16, fp32) works in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare_weights(w, B: int, size: int, name: str, like: Tensor, batched: bool) -> Tensor:
    """Check a weight vector and broadcast it to ``[B, size]`` in the working dtype."""
    if w is None:
        return torch.ones(B, size, dtype=like.dtype, device=like.device)
    if not isinstance(w, Tensor):
        w = torch.as_tensor(w)
    if w.is_complex():
        raise ValueError(f"{name} must be real non-negative weights, got a complex tensor")
    if w.device != like.device:
        raise ValueError(
            f"{name} is on {w.device} but cost is on {like.device}: move both to one device"
        )
    expected = f"[{size}]" + (f" or [{B}, {size}]" if batched else "")
    if w.dim() == 1 and w.shape[0] == size:
        w = w.unsqueeze(0).expand(B, size)
    elif not (batched and w.dim() == 2 and tuple(w.shape) == (B, size)):
        raise ValueError(
            f"{name} has shape {list(w.shape)} but cost needs {expected}: give one weight per "
            f"{'row' if name == 'a' else 'column'} of the cost (0 for a padded position)"
        )
    w = w.to(like.dtype)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} contains NaN or inf: weights must be finite and >= 0")
    if bool((w < 0).any()):
        raise ValueError(
            f"{name} contains negative weights: weights must be >= 0 (0 marks a padded position)"
        )
    return w


def _check_sinkhorn_args(cost, eps, max_iter, tol, grad, check_every) -> None:
    if not isinstance(cost, Tensor):
        raise ValueError(f"cost must be a torch.Tensor, got {type(cost).__name__}")
    if cost.dim() not in (2, 3):
        raise ValueError(
            f"cost must have shape [n, m] or [B, n, m], got {list(cost.shape)}: "
            "stack the problems of a batch along a leading dimension"
        )
    if not cost.is_floating_point():
        raise ValueError(f"cost must be a floating tensor, got {cost.dtype}: call cost.float()")
    if cost.shape[-1] == 0 or cost.shape[-2] == 0:
        raise ValueError(
            f"cost has an empty dimension {list(cost.shape)}: pad to length >= 1 and give the "
            "padded positions weight 0"
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < math.inf):
        raise ValueError(
            f"eps must be a finite number > 0 (absolute, in cost units), got {eps!r}; "
            f"e.g. eps={DEFAULT_EPS} for the cosine cost"
        )
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(
            f"tol must be a number >= 0 (0 runs exactly max_iter iterations), got {tol!r}"
        )
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")


def _exp_floor(dtype: torch.dtype) -> float:
    """Kernel exponents are clamped from below at this value (-64.5 in float32, -530 in f64).

    On CPU, ``exp`` of an argument whose result underflows (below ``log(tiny)``, -87.3 in
    float32) takes a slow path, about 15x slower, and products with denormal results slow the
    mat-vecs down too. With this floor, every kernel entry is >= exp(floor) > 0 and its
    products with scalings in ``exp(+-tau)`` (see :func:`sinkhorn`) stay normal numbers. The
    entries raised this way are below 1e-28 (float32; 1e-230 in float64) of a total mass of 1.
    """
    return math.log(torch.finfo(dtype).tiny) + _tau(dtype) + 1.0  # -64.5 f32, -530 f64


def _tau(dtype: torch.dtype) -> float:
    """Bound on |log| of the plain-domain scalings before absorption (21.8 f32, 177 f64)."""
    return 0.25 * -math.log(torch.finfo(dtype).tiny)


def _lse_(x: Tensor, dim: int) -> Tensor:
    """log-sum-exp along ``dim`` that overwrites ``x`` (no autograd; saves allocations on CPU).

    Terms more than ``-0.9 log(tiny)`` below the maximum are clamped there before ``exp`` (see
    :func:`_exp_floor`): they add less than ``n * tiny**0.9`` to a sum that is >= 1.
    """
    mx = x.amax(dim=dim, keepdim=True)
    x.sub_(mx).clamp_min_(0.9 * math.log(torch.finfo(x.dtype).tiny)).exp_()
    return x.sum(dim=dim).log_().add_(mx.squeeze(dim))


def _log_iterations(Cw, scale: float, loga, logb, u, v, steps: int, track_grad: bool):
    r"""``steps`` log-domain Sinkhorn iterations on the log-scalings, plan ``exp(K + u + v)``
    with ``K = scale * Cw = -C / eps``:

    .. math::
        u \leftarrow \log a - \mathrm{LSE}_j(K_{ij} + v_j), \qquad
        v \leftarrow \log b - \mathrm{LSE}_i(K_{ij} + u_i).

    Stable for any ``K`` but costs two passes of ``exp`` over ``B n m`` per iteration.
    """
    if track_grad:
        K = Cw * scale
        for _ in range(steps):
            u = loga - torch.logsumexp(K + v.unsqueeze(-2), dim=-1)
            v = logb - torch.logsumexp(K + u.unsqueeze(-1), dim=-2)
        return u, v
    buf = torch.empty_like(Cw)
    for _ in range(steps):
        u = loga - _lse_(torch.add(v.unsqueeze(-2), Cw, alpha=scale, out=buf), dim=-1)
        v = logb - _lse_(torch.add(u.unsqueeze(-1), Cw, alpha=scale, out=buf), dim=-2)
    return u, v


def _plan(Cw, scale: float, u, v, track_grad: bool) -> Tensor:
    """The kernel ``exp(max(scale * Cw + u + v, floor))`` of log-scalings u [B, n], v [B, m].

    Exponents are clamped at :func:`_exp_floor`: every entry is >= exp(floor) (about 1e-28 in
    float32, a normal number, no slow path) and > 0, so the scaling iterations need no guard
    against 0 / 0. The returned plan is ``diag(alpha) T diag(beta)`` with scalings exactly 0
    on padding, hence exactly 0 there.
    """
    floor = _exp_floor(Cw.dtype)
    if track_grad:
        x = torch.add(u.unsqueeze(-1), Cw, alpha=scale).add(v.unsqueeze(-2))
        return x.clamp_min(floor).exp()
    x = torch.add(u.unsqueeze(-1), Cw, alpha=scale).add_(v.unsqueeze(-2))
    return x.clamp_min_(floor).exp_()


def _scaling_iterations(groups, kernels, a3, b3, beta3, rows3, steps, live=None):
    r"""``steps`` plain-domain Sinkhorn iterations on the absorbed kernel ``T`` ([2]).

    ``T = exp(K + u + v)`` is the plan of the current log-scalings and the current plan is
    :math:`\mathrm{diag}(\alpha)\,\mathbf{T}\,\mathrm{diag}(\beta)`; Sinkhorn on the Gibbs
    kernel is Sinkhorn on ``T``: :math:`\alpha \leftarrow a / (\mathbf{T}\beta)`,
    :math:`\beta \leftarrow b / (\mathbf{T}^\top\alpha)`: two batched mat-vecs per iteration
    instead of two passes of ``exp`` over ``B n m``. Vectors are ``[B, 1, len]`` so that both
    products are (1 x k) @ (k x l) per problem (with ``T`` and its transpose both stored
    contiguous: the fast BLAS path), and ``rows3 = T beta3`` on entry. Returns
    ``(alpha3, beta3, rows3)`` with again ``rows3 = T beta3``: the plan's row sums are
    ``alpha3 * rows3``, its column sums are exactly ``b``. Padded rows/columns (weight 0) get
    scaling 0. Each group (see :func:`_groups`) runs its ``steps`` iterations before the next,
    so that its kernel stays in cache.

    ``live`` [B] (CPU only; None elsewhere): only these problems are iterated, the others'
    outputs are left 0 (the caller keeps their state). On CPU:

    - a group with problems done is first compacted to its live ones: late in training most
      problems converge in a few tens of iterations while the slowest run to ``max_iter``, and
      the batch would otherwise iterate all of them to the end (1.8x faster Sinkhorn on the
      demo's trained student, same plans bit for bit);
    - a group whose mat-vecs are small is widened (:func:`_widen`).
    """
    alpha_out, beta_out = torch.zeros_like(a3), torch.zeros_like(b3)
    rows_out = torch.zeros_like(rows3)
    for (s, e, nr, mc), (T, Tt) in zip(groups, kernels):
        ac, bc = a3[s:e, :, :nr], b3[s:e, :, :mc]
        rows, beta = rows3[s:e, :, :nr], beta3[s:e, :, :mc]
        idx = None
        if live is not None and not bool(live[s:e].all()):
            idx = live[s:e].nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            T, Tt = T.index_select(0, idx), None if Tt is None else Tt.index_select(0, idx)
            ac, bc, rows, beta = (x.index_select(0, idx) for x in (ac, bc, rows, beta))
        else:
            rows, beta = rows.clone(), beta.clone()
        if live is not None:
            T, Tt, bc, beta = _widen(T, Tt, bc, beta)
        width = beta.shape[-1]
        alpha, cols = torch.empty_like(rows), torch.empty_like(beta)
        # A group of one problem keeps no transposed copy: (T beta) as a column is as fast
        # there, and the group's working set is halved.
        k = rows.shape[0]
        rows_col, beta_col = rows.view(k, nr, 1), beta.view(k, width, 1)
        for _ in range(steps):
            # No clamp needed: every kernel entry is >= exp(floor) > 0 (see _plan), so a padded
            # row gives 0 / positive = 0; an underflow gives inf or NaN, caught by the caller.
            torch.div(ac, rows, out=alpha)
            torch.div(bc, torch.bmm(alpha, T, out=cols), out=beta)
            if Tt is None:
                torch.bmm(T, beta_col, out=rows_col)
            else:
                torch.bmm(beta, Tt, out=rows)
        beta = beta[..., :mc]
        if idx is None:
            alpha_out[s:e, :, :nr] = alpha
            beta_out[s:e, :, :mc] = beta
            rows_out[s:e, :, :nr] = rows
        else:
            alpha_out[s:e, :, :nr].index_copy_(0, idx, alpha)
            beta_out[s:e, :, :mc].index_copy_(0, idx, beta)
            rows_out[s:e, :, :nr].index_copy_(0, idx, rows)
    return alpha_out, beta_out, rows_out


#: CPU: torch's bmm computes a product of fewer multiply-adds than this per matrix with a plain
#: loop, about 7x slower per entry than its BLAS path (measured on this project's CPU machines:
#: 65 us for 172 products (1 x 28) @ (28 x 14), 11 us for (1 x 28) @ (28 x 16)).
_CPU_BLAS_MIN_PRODUCT = 400


def _widen(T: Tensor, Tt: Tensor | None, bc: Tensor, beta: Tensor):
    """A group's kernel with columns appended so that its mat-vecs take the BLAS path.

    Kernels with ``n * m`` under :data:`_CPU_BLAS_MIN_PRODUCT` get columns of ones (positive,
    like every kernel entry) with target weight 0: their scaling is ``0 / positive = 0``, so
    they add exactly 0 to ``T beta`` and the iterates are those of the narrow kernel (up to the
    order of summation). Not widened: kernels that are large enough already, and those that
    would more than quadruple (a plain loop over so few entries is as fast).
    """
    k, n, m = T.shape
    width = -(-_CPU_BLAS_MIN_PRODUCT // n)
    if n * m >= _CPU_BLAS_MIN_PRODUCT or width > 4 * m:
        return T, Tt, bc, beta
    wide = T.new_ones(k, n, width)
    wide[..., :m] = T
    wide_t = None
    if Tt is not None:
        wide_t = Tt.new_ones(k, width, n)
        wide_t[:, :m] = Tt
    bc_w, beta_w = bc.new_zeros(k, 1, width), beta.new_zeros(k, 1, width)
    bc_w[..., :m], beta_w[..., :m] = bc, beta
    return wide, wide_t, bc_w, beta_w


#: CPU: a batch whose kernel (T and its transpose) is larger than this is iterated in groups.
_CPU_BATCH_BYTES = 8 * 2**20
#: CPU: target size of one group's kernel, about a core's L2 cache.
_CPU_GROUP_BYTES = 1 * 2**20


def _groups(a_valid: Tensor, b_valid: Tensor, skip: Tensor, itemsize: int):
    """Groups ``(start, stop, rows, cols)`` of consecutive problems, for the CPU.

    A batch whose kernel does not fit in cache is read from DRAM at every iteration (about
    10 GB/s on one core here); iterated a group at a time, each group's kernel stays in cache
    for a whole block of iterations (3x faster for B=8 at up to 512 x 512). Each group is
    cropped to the bounding box of its valid rows/columns, so trailing padding is neither
    stored nor read (``skip``: problems that are not iterated, ignored). One host sync.
    """
    B, N = a_valid.shape
    M = b_valid.shape[1]
    last_n = (a_valid & ~skip[:, None]) * torch.arange(1, N + 1, device=a_valid.device)
    last_m = (b_valid & ~skip[:, None]) * torch.arange(1, M + 1, device=b_valid.device)
    ln, lm = last_n.amax(1).clamp_min(1).tolist(), last_m.amax(1).clamp_min(1).tolist()
    if B * max(ln) * max(lm) * 2 * itemsize <= _CPU_BATCH_BYTES:
        return [(0, B, max(ln), max(lm))]
    groups, start, nr, mc = [], 0, 0, 0
    for k in range(B):
        nr2, mc2 = max(nr, ln[k]), max(mc, lm[k])
        if k > start and (k + 1 - start) * nr2 * mc2 * 2 * itemsize > _CPU_GROUP_BYTES:
            groups.append((start, k, nr, mc))
            start, nr2, mc2 = k, ln[k], lm[k]
        nr, mc = nr2, mc2
    groups.append((start, B, nr, mc))
    return groups


class _EnvelopeValue(torch.autograd.Function):
    """``value`` (computed without autograd) as a function of ``cost`` with gradient ``plan``.

    The plan is exactly 0 on padding, so the gradient there is 0 whatever the cost holds.
    """

    @staticmethod
    def forward(ctx, cost: Tensor, plan: Tensor, value: Tensor) -> Tensor:
        ctx.save_for_backward(plan)
        ctx.cost_dtype = cost.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, grad_value: Tensor):
        (plan,) = ctx.saved_tensors
        return (plan * grad_value[:, None, None]).to(ctx.cost_dtype), None, None


def _safe_log(x: Tensor, valid: Tensor) -> Tensor:
    """log(x) on valid positions, 0 elsewhere (no -inf, no NaN gradient through the mask)."""
    return torch.where(valid, x, torch.ones_like(x)).log()


@dataclass(frozen=True)
class _Problem:
    """A batch of OT problems ready to iterate: what every block reads and never writes.

    Weights are normalised to sum 1 (``a_w`` [B, n], ``b_w`` [B, m]; a problem with an empty
    side is solved as a uniform dummy, ``live`` False, and zeroed by :func:`_finalise`), with
    their logs (``_NEG`` at padded positions) and ``[B, 1, len]`` views ``a3``, ``b3``. The
    costs are cut into ``groups`` ``(start, stop, rows, cols)`` of consecutive problems (one
    group, the whole batch, except for large batches on CPU, see :func:`_groups`), each with
    its cost box in the working dtype, 0 at padded entries (where the cost may even be NaN).
    """

    groups: list[tuple[int, int, int, int]]
    costs: list[Tensor]
    a_w: Tensor
    b_w: Tensor
    a3: Tensor
    b3: Tensor
    loga: Tensor
    logb: Tensor
    a_valid: Tensor
    b_valid: Tensor
    live: Tensor
    eps: float
    track_grad: bool

    @property
    def scale(self) -> float:
        """The kernel exponent is ``scale * C = -C / eps``."""
        return -1.0 / self.eps

    @property
    def whole(self) -> bool:
        """One group that is the whole (uncropped) batch."""
        B, n, m = self.a_w.shape[0], self.a_w.shape[1], self.b_w.shape[1]
        return self.groups == [(0, B, n, m)]


def _setup_problem(C: Tensor, a, b, eps: float, track_grad: bool, batched: bool) -> _Problem:
    """Check and normalise the weights of the costs ``C`` [B, n, m]; cut the batch into groups."""
    B, n, m = C.shape
    wd, dev = _work_dtype(C.dtype), C.device
    ref = torch.empty((), dtype=wd, device=dev)
    a_w = _prepare_weights(a, B, n, "a", ref, batched)
    b_w = _prepare_weights(b, B, m, "b", ref, batched)
    tiny = torch.finfo(wd).tiny
    empty = (a_w.sum(-1, keepdim=True) <= 0) | (b_w.sum(-1, keepdim=True) <= 0)  # [B, 1]
    a_w = torch.where(empty, torch.ones_like(a_w), a_w)
    b_w = torch.where(empty, torch.ones_like(b_w), b_w)
    a_w = a_w / a_w.sum(-1, keepdim=True)
    b_w = b_w / b_w.sum(-1, keepdim=True)
    a_valid, b_valid = a_w > 0, b_w > 0
    loga = torch.where(a_valid, a_w.clamp_min(tiny).log(), torch.full_like(a_w, _NEG))
    logb = torch.where(b_valid, b_w.clamp_min(tiny).log(), torch.full_like(b_w, _NEG))
    live = ~empty.squeeze(-1)  # [B]
    if dev.type == "cpu" and not track_grad:
        groups = _groups(a_valid, b_valid, ~live, torch.finfo(wd).bits // 8)
    else:
        groups = [(0, B, n, m)]
    padded = a is not None or b is not None  # (and so possibly empty problems: cost 0 there)
    zero = torch.zeros((), dtype=wd, device=dev)
    costs = []
    for s, e, nr, mc in groups:
        Cg = C[s:e, :nr, :mc].to(wd)
        if padded:
            valid = a_valid[s:e, :nr].unsqueeze(-1) & b_valid[s:e, :mc].unsqueeze(-2)
            Cg = torch.where(valid & live[s:e, None, None], Cg, zero)
        costs.append(Cg)
    return _Problem(groups, costs, a_w, b_w, a_w.unsqueeze(-2), b_w.unsqueeze(-2), loga, logb,
                    a_valid, b_valid, live, eps, track_grad)


@dataclass(frozen=True)
class _Iterate:
    """Where the iterations stand: the current plan is ``diag(alpha) T diag(beta)``.

    ``u`` [B, n], ``v`` [B, m]: log-scalings; ``kernels``: per group, ``T = exp(K + u + v)``
    cropped to the group's box, and its contiguous transpose (None for a single problem on
    CPU); ``alpha3`` [B, 1, n], ``beta3`` [B, 1, m]: the plain-domain scalings not yet absorbed
    into ``u, v``; ``rows3`` [B, 1, n] = ``T beta3`` (the invariant of the scaling iterations).
    """

    u: Tensor
    v: Tensor
    kernels: list[tuple[Tensor, Tensor | None]]
    alpha3: Tensor
    beta3: Tensor
    rows3: Tensor


def _absorb(p: _Problem, u: Tensor, v: Tensor) -> _Iterate:
    """Form the kernel ``exp(K + u + v)`` of each group with unit scalings ([2])."""
    kernels, rows3 = [], torch.zeros_like(p.a3)
    for (s, e, nr, mc), Cg in zip(p.groups, p.costs):
        T = _plan(Cg, p.scale, u[s:e, :nr], v[s:e, :mc], p.track_grad)
        single = e - s == 1 and Cg.device.type == "cpu"
        kernels.append((T, None if single else T.transpose(-1, -2).contiguous()))
        if p.track_grad:
            rows3 = T.sum(-1).unsqueeze(-2)  # a single group
        else:
            rows3[s:e, :, :nr] = T.sum(-1).unsqueeze(-2)
    return _Iterate(u, v, kernels, torch.ones_like(p.a3), torch.ones_like(p.b3), rows3)


def _fold(p: _Problem, it: _Iterate) -> tuple[Tensor, Tensor]:
    """The log-scalings with the plain-domain scalings moved into them."""
    return (it.u + _safe_log(it.alpha3.squeeze(-2), p.a_valid),
            it.v + _safe_log(it.beta3.squeeze(-2), p.b_valid))


def _log_block(p: _Problem, it: _Iterate, steps: int, update: Tensor) -> _Iterate:
    """``steps`` log-domain iterations (:func:`_log_iterations`) for the problems where
    ``update`` [B] is True; the others keep their log-scalings. Ends absorbed.

    Stable for any ``eps``, but two passes of ``exp`` over ``B n m`` per iteration.
    """
    u, v = _fold(p, it)
    if p.whole:
        u_new, v_new = _log_iterations(p.costs[0], p.scale, p.loga, p.logb, u, v, steps,
                                       p.track_grad)
    else:
        u_new, v_new = u.clone(), v.clone()
        for (s, e, nr, mc), Cg in zip(p.groups, p.costs):
            u_new[s:e, :nr], v_new[s:e, :mc] = _log_iterations(
                Cg, p.scale, p.loga[s:e, :nr], p.logb[s:e, :mc], u[s:e, :nr], v[s:e, :mc],
                steps, p.track_grad,
            )
    update = update.view(-1, 1)
    return _absorb(p, torch.where(update, u_new, u), torch.where(update, v_new, v))


def _scaling_block(p: _Problem, it: _Iterate, steps: int, done: Tensor, tau: float):
    """``steps`` plain-domain iterations (:func:`_scaling_iterations`) on the absorbed kernels.

    A problem whose scalings leave ``exp(+-tau)`` or stop being finite is ``bad`` (its kernel
    is too far from the solution for the plain domain): it keeps its block-start state, as do
    the ``done`` (converged, frozen) problems. Returns the new iterate and ``bad`` [B].
    """
    # On CPU the done problems are left out of the iterations (the work scales with the
    # problems still running); elsewhere the batch stays whole (no host sync per block).
    live = ~done if done.device.type == "cpu" else None
    alpha_new, beta_new, rows_new = _scaling_iterations(
        p.groups, it.kernels, p.a3, p.b3, it.beta3, it.rows3, steps, live
    )
    with torch.no_grad():
        la = _safe_log(alpha_new.squeeze(-2), p.a_valid)
        lb = _safe_log(beta_new.squeeze(-2), p.b_valid)
        bad = ~done & ~(
            (torch.isfinite(la) & (la.abs() <= tau)).all(-1)
            & (torch.isfinite(lb) & (lb.abs() <= tau)).all(-1)
            & torch.isfinite(rows_new.squeeze(-2)).all(-1)
        )
    keep = (done | bad).view(-1, 1, 1)
    return _Iterate(it.u, it.v, it.kernels, torch.where(keep, it.alpha3, alpha_new),
                    torch.where(keep, it.beta3, beta_new), torch.where(keep, it.rows3, rows_new)), bad


def _check_block(p: _Problem, it: _Iterate, done: Tensor, bad: Tensor, tol: float, tau: float):
    """The end-of-block check, with the one host sync per block.

    Columns are exact after a beta update, so the marginal error is the rows' one,
    ``||alpha * (T beta) - a||_1``; a problem at or below ``tol`` (and not ``bad``) is done.
    Returns ``done`` [B] and the host booleans ``all_done``, ``any_bad`` and ``any_absorb``
    (some scalings left ``exp(+-tau/2)``: time to absorb them into ``u, v``).
    """
    with torch.no_grad():
        err = (it.alpha3 * it.rows3 - p.a3).abs().sum((-2, -1))
        if tol > 0:  # tol = 0: no early stop, exactly max_iter iterations
            done = done | ((err <= tol) & ~bad)
        la = _safe_log(it.alpha3.squeeze(-2), p.a_valid).abs().amax(-1)
        lb = _safe_log(it.beta3.squeeze(-2), p.b_valid).abs().amax(-1)
        needs_absorb = (la > tau / 2) | (lb > tau / 2)
        all_done, any_bad, any_absorb = torch.stack(
            [done.all(), bad.any(), needs_absorb.any()]
        ).tolist()
    return done, all_done, any_bad, any_absorb


def _kernel_marginal_error(p: _Problem, it: _Iterate) -> Tensor:
    """``||T 1 - a||_1 + ||T^T 1 - b||_1`` [B] of the absorbed kernels (unit scalings)."""
    with torch.no_grad():
        cols = torch.zeros_like(p.b_w)
        for (s, e, nr, mc), (T, _) in zip(p.groups, it.kernels):
            cols[s:e, :mc] = T.sum(-2)
        err = (it.rows3.squeeze(-2) - p.a_w).abs().sum(-1)
        err += (cols - p.b_w).abs().sum(-1)
    return err


def _iterate(p: _Problem, max_iter: int, tol: float, check_every: int):
    """The driver: blocks of ``check_every`` iterations until every problem is done.

    A block is a scaling block (:func:`_scaling_block`), or a log block
    (:func:`_log_block`) while ``log_blocks_left`` > 0: always in ``unroll`` mode (the log-sum-exp
    backward is a softmax, well defined everywhere, where the scaling iterations' divisions could
    give 0 * inf), and for a while after a scaling block failed. A failed ("bad") problem's block
    is redone in the log domain at once, and the next blocks stay there, ``backoff`` of them
    (doubling up to 16 on each failure, halving on each scaling block that succeeds). Scalings
    that left ``exp(+-tau/2)`` are absorbed after a block. Returns the final iterate and the
    iterations applied to each problem ``n_iter`` [B] (a problem stops once done).
    """
    # Scalings stay within exp(+-tau): with the kernel floor (see _exp_floor) all products are
    # normal numbers.
    tau = _tau(p.a_w.dtype)  # 21.8 in float32, 177 in float64
    done = ~p.live  # problems with an empty side are not iterated
    n_iter = torch.zeros_like(done, dtype=torch.int64)
    log_blocks_left, backoff, it = (max_iter if p.track_grad else 0), 1, 0
    state = _absorb(p, p.loga, p.logb)  # f = g = 0
    while True:
        steps = min(check_every, max_iter - it)
        scaled = log_blocks_left == 0
        if scaled:
            state, bad = _scaling_block(p, state, steps, done, tau)
        else:
            log_blocks_left -= 1
            state, bad = _log_block(p, state, steps, ~done), torch.zeros_like(done)
        n_iter = n_iter + (~(done | bad)).to(torch.int64) * steps
        it += steps
        done, all_done, any_bad, any_absorb = _check_block(p, state, done, bad, tol, tau)
        if any_bad:
            state = _log_block(p, state, steps, bad)
            n_iter = n_iter + bad.to(torch.int64) * steps
            log_blocks_left, backoff = backoff, min(2 * backoff, 16)
            if tol > 0:
                done = done | (bad & (_kernel_marginal_error(p, state) <= tol))
                all_done = bool(done.all())
        elif scaled:
            backoff = max(1, backoff // 2)
            if any_absorb and not (all_done or it >= max_iter):
                state = _absorb(p, *_fold(p, state))
        if all_done or it >= max_iter:
            return state, n_iter


def _plan_boxes(p: _Problem, it: _Iterate) -> tuple[Tensor, Tensor, list[Tensor]]:
    """The final log-scalings ``u, v`` and, per group, its box of the plan
    ``diag(alpha) T diag(beta)``: exactly 0 on padding (scalings 0 there) and for empty
    problems. Outside ``unroll`` mode the kernels are overwritten."""
    u, v = _fold(p, it)
    zero = torch.zeros((), dtype=p.a_w.dtype, device=p.a_w.device)
    alpha3 = torch.where(p.a_valid & p.live.unsqueeze(-1), it.alpha3.squeeze(-2), zero)
    alpha3 = alpha3.unsqueeze(-2)
    beta3 = torch.where(p.b_valid, it.beta3.squeeze(-2), zero).unsqueeze(-2)
    if p.track_grad:
        ((T, _),) = it.kernels
        return u, v, [T * alpha3.transpose(-1, -2) * beta3]
    return u, v, [
        T.mul_(alpha3[s:e, :, :nr].transpose(-1, -2)).mul_(beta3[s:e, :, :mc])
        for (s, e, nr, mc), (T, _) in zip(p.groups, it.kernels)
    ]


def _finalise(p: _Problem, C: Tensor, u: Tensor, v: Tensor, boxes: list[Tensor],
              n_iter: Tensor) -> SinkhornResult:
    """Plan, value, reg_value and marginal error from the final log-scalings and plan boxes.

    In envelope mode ``value`` is attached to ``C`` with gradient ``plan``
    (:class:`_EnvelopeValue`), and ``reg_value`` gets the same gradient.
    """
    zero = torch.zeros((), dtype=p.a_w.dtype, device=p.a_w.device)
    with torch.set_grad_enabled(p.track_grad):  # envelope: attached to the cost further down
        value = torch.cat(
            [torch.linalg.vecdot(P.flatten(-2), Cg.flatten(-2)) for P, Cg in zip(boxes, p.costs)]
        )
    if p.whole:
        plan = boxes[0]
        rows, cols = plan.sum(-1), plan.sum(-2)
    else:  # CPU groups: the entries outside their boxes are padding
        plan = torch.zeros(C.shape, dtype=p.a_w.dtype, device=p.a_w.device)
        rows, cols = torch.zeros_like(p.a_w), torch.zeros_like(p.b_w)
        for (s, e, nr, mc), P in zip(p.groups, boxes):
            plan[s:e, :nr, :mc] = P
            rows[s:e, :nr], cols[s:e, :mc] = P.sum(-1), P.sum(-2)
    if not p.track_grad and C.requires_grad:
        # Envelope: d value / d cost = plan, and the graph holds the plan only.
        value = _EnvelopeValue.apply(C, plan, value)
    with torch.no_grad():
        err = (rows - p.a_w).abs().sum(-1) + (cols - p.b_w).abs().sum(-1)
        err = torch.where(p.live, err, zero)
    # reg_value = <T, C> + eps KL(T || a b^T) = sum_ij T_ij (f_i + g_j) - eps (sum T - 1) with
    # the potentials f = eps (u - log a), g = eps (v - log b) (0 at padded positions).
    eps = p.eps
    with torch.set_grad_enabled(p.track_grad):
        f = torch.where(p.a_valid, eps * (u - p.loga), zero)
        g = torch.where(p.b_valid, eps * (v - p.logb), zero)
        mass = rows.sum(-1) - p.live.to(rows.dtype)
        reg_value = (rows * f).sum(-1) + (cols * g).sum(-1) - eps * mass
    if not p.track_grad:  # envelope: d reg_value / d cost = plan as well
        reg_value = reg_value.detach() + (value - value.detach())
    n_iter = torch.where(p.live, n_iter, torch.zeros_like(n_iter))
    return SinkhornResult(plan, value, reg_value, n_iter, err)


def sinkhorn(
    cost: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    eps: float,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    grad: str = "envelope",
    check_every: int = DEFAULT_CHECK_EVERY,
) -> SinkhornResult:
    r"""Solve a batch of entropic OT problems (log-domain Sinkhorn with absorption).

    For each problem :math:`k` of the batch:

    .. math::
        \mathbf{T}^{(k)} = \mathop{\arg\min}_{\mathbf{T} \geq 0,\
            \mathbf{T}\mathbf{1} = \mathbf{a},\ \mathbf{T}^\top\mathbf{1} = \mathbf{b}}
            \langle \mathbf{T}, \mathbf{C}^{(k)} \rangle_F
            + \varepsilon\, \mathrm{KL}(\mathbf{T} \,\|\, \mathbf{a}\mathbf{b}^\top)

    whose solution is :math:`T_{ij} = \exp(u_i + v_j - C_{ij}/\varepsilon)` for log-scalings
    :math:`u, v` (the dual potentials are :math:`f = \varepsilon(u - \log a)`,
    :math:`g = \varepsilon(v - \log b)`). The iterations are Sinkhorn's [1], kept stable for
    any ``eps`` by holding ``u, v`` in the log domain with absorption [2]: the kernel
    ``T = exp(K + u + v)`` (``K = -C/eps``) is formed, the iterations run as plain-domain
    scalings ``diag(alpha) T diag(beta)`` (two batched mat-vecs per iteration, no ``exp``), and
    the scalings are absorbed into ``u, v`` (``T`` formed again) only when they leave
    ``exp(+-tau/2)`` (``tau`` = 21.8 in float32, 177 in float64), and at the end. A block of
    iterations whose scalings leave ``exp(+-tau)`` (early on, when ``eps`` is small against the
    cost) is redone with log-sum-exp updates, and the next blocks stay in the log domain for a
    while. The returned plan is always ``exp(K + u + v)`` of the final log-scalings.

    All ``B`` problems advance together in tensor operations on the cost's device (no Python
    loop over problems). The marginal error is checked every ``check_every`` iterations from
    quantities the iterations compute anyway; the host synchronises once per such block (to
    decide whether to stop), never per iteration. On CPU only, a batch whose kernel exceeds
    8 MiB is iterated in groups of consecutive problems whose kernels fit a core's cache (1 MiB),
    each cropped to the bounding box of its valid entries (trailing padding is not touched);
    converged problems leave the iterations, and kernels of fewer than 400 entries get
    zero-weight columns to reach torch's BLAS path (the plans do not change;
    :func:`_scaling_iterations`).

    Parameters
    ----------
    cost : Tensor, shape (B, n, m) or (n, m)
        Cost matrices :math:`\mathbf{C}`. float16/bfloat16 costs are computed on in float32 and
        the results are float32; float64 stays float64. Values at padded positions are ignored
        (they may even be inf/NaN).
    a : Tensor, shape (B, n) or (n,), optional
        Non-negative source weights, normalised here to sum 1 per problem. A zero weight marks
        a padded position: its row of the plan is exactly 0. None: uniform over all n rows.
    b : Tensor, shape (B, m) or (m,), optional
        Same for the target side (columns).
    eps : float
        Entropic regularisation :math:`\varepsilon > 0`, absolute (cost units). Smaller is closer
        to unregularised OT and needs more iterations.
    max_iter : int
        Cap on the number of iterations per problem.
    tol : float
        Stop a problem once its marginal error
        :math:`\|\mathbf{T}\mathbf{1} - \mathbf{a}\|_1
        + \|\mathbf{T}^\top\mathbf{1} - \mathbf{b}\|_1` is <= tol (checked every
        ``check_every`` iterations; a converged problem is frozen, so its result does not
        depend on the rest of the batch). ``tol=0`` runs exactly ``max_iter`` iterations. The
        returned ``marginal_error`` is measured on the returned plan and can exceed ``tol``
        by rounding (float32) or when ``max_iter`` stops first.
    grad : {"envelope", "unroll"}
        ``"envelope"`` (default): the iterations run under ``torch.no_grad()`` and
        ``value = sum(plan.detach() * cost)``, so ``d value / d cost = plan``; memory does not
        grow with the iterations (the graph holds the plan only). This ``plan`` is the exact
        gradient of the *regularised* objective ``reg_value`` at convergence (envelope /
        Danskin theorem, [3] Prop. 4.6); it is not the full derivative of
        :math:`\langle \mathbf{T}^\star(\mathbf{C}), \mathbf{C}\rangle`, which also moves
        through :math:`\mathbf{T}^\star` (a difference of order ``eps``). No gradient flows to
        ``a`` or ``b``. ``"unroll"``: autodiff through every iteration (these run as
        log-sum-exp updates, whose backward is well defined everywhere), the exact derivative
        of the computed ``value`` (and of ``plan``) with respect to ``cost`` and the weights;
        memory grows linearly with the iterations (a few ``B n m`` tensors per iteration), and
        it is several times slower.
    check_every : int
        Iterations per block, i.e. between two convergence checks (and host syncs).

    Returns
    -------
    SinkhornResult
        ``plan`` (B, n, m), ``value`` (B,), ``reg_value`` (B,), ``n_iter`` (B,),
        ``marginal_error`` (B,); without the B dimension for an unbatched cost. A problem
        whose ``a`` or ``b`` is all zero (an empty side) gets an all-zero plan, ``value`` and
        ``reg_value`` 0 and a zero gradient, never NaN.

    Raises
    ------
    ValueError
        On a non-positive ``eps``, mismatched shapes, negative or non-finite weights, an unknown
        ``grad`` mode, or an invalid ``max_iter``/``tol``/``check_every``.

    Examples
    --------
    >>> C = torch.rand(4, 7, 9)
    >>> a = torch.ones(4, 7); a[0, 5:] = 0          # problem 0 has 5 valid rows
    >>> res = sinkhorn(C, a, eps=0.05)
    >>> res.plan.shape, res.value.shape
    (torch.Size([4, 7, 9]), torch.Size([4]))
    """
    _check_sinkhorn_args(cost, eps, max_iter, tol, grad, check_every)
    batched = cost.dim() == 3
    C = cost if batched else cost.unsqueeze(0)
    track_grad = grad == "unroll" and torch.is_grad_enabled()
    p = _setup_problem(C, a, b, float(eps), track_grad, batched)
    with torch.set_grad_enabled(track_grad):
        final, n_iter = _iterate(p, max_iter, tol, check_every)
        u, v, boxes = _plan_boxes(p, final)
        del final  # the kernels' transposed copies
    res = _finalise(p, C, u, v, boxes, n_iter)
    if not batched:
        return SinkhornResult(res.plan[0], res.value[0], res.reg_value[0], res.n_iter[0],
                              res.marginal_error[0])
    return res


# --------------------------------------------------------------------------------------------
# Costs between token representations
# --------------------------------------------------------------------------------------------


def _check_pair(x: Tensor, y: Tensor) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}: call .float()")
    if x.dim() not in (2, 3) or y.dim() != x.dim():
        raise ValueError(
            f"x and y must be [n, d] and [m, d], or [B, n, d] and [B, m, d]; got {list(x.shape)} "
            f"and {list(y.shape)}"
        )
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"x and y have widths {x.shape[-1]} and {y.shape[-1]}: project one side to the "
            "other's width first (the method's learned projection P)"
        )
    if x.dim() == 3 and x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y have batch sizes {x.shape[0]} and {y.shape[0]}: they must match")
    if x.device != y.device:
        raise ValueError(f"x is on {x.device} and y on {y.device}: move both to one device")


def _upcast(x: Tensor) -> Tensor:
    """float16/bfloat16 -> float32 (costs are formed in at least float32); float64 stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _l2_normalize(x: Tensor, eps: float = _NORM_EPS) -> Tensor:
    """x / sqrt(||x||^2 + eps^2): smooth, and a zero vector stays zero (no NaN)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps * eps)


def cosine_cost(x: Tensor, y: Tensor) -> Tensor:
    r"""Cosine cost :math:`C_{ij} = 1 - \frac{x_i \cdot y_j}{\|x_i\| \|y_j\|}`, in ``[0, 2]``.

    Scale-free, so hidden states of any layer can be compared without rescaling. A zero vector
    (e.g. padding) has cosine 0 with everything, so cost 1, and no NaN (an ``eps = 1e-8`` is
    added to the norm).

    Parameters
    ----------
    x : Tensor, shape (B, n, d) or (n, d)
    y : Tensor, shape (B, m, d) or (m, d)

    Returns
    -------
    Tensor, shape (B, n, m) or (n, m); float32 for float16/bfloat16/float32 inputs.
    """
    _check_pair(x, y)
    xn, yn = _l2_normalize(_upcast(x)), _l2_normalize(_upcast(y))
    return (1.0 - xn @ yn.transpose(-1, -2)).clamp(0.0, 2.0)


def sq_euclidean_cost(x: Tensor, y: Tensor) -> Tensor:
    r"""Squared Euclidean cost between L2-normalised vectors,
    :math:`C_{ij} = \|\hat x_i - \hat y_j\|^2` with :math:`\hat x = x / \|x\|`, in ``[0, 4]``.

    Not rescaled: for non-zero vectors it equals ``2 * cosine_cost`` (so the same plan as the
    cosine cost is obtained with twice the ``eps``). Hidden states are normalised first because
    their scale differs by orders of magnitude between layers. A zero vector is at distance 1
    from every unit vector (no NaN).

    Parameters
    ----------
    x : Tensor, shape (B, n, d) or (n, d)
    y : Tensor, shape (B, m, d) or (m, d)

    Returns
    -------
    Tensor, shape (B, n, m) or (n, m); float32 for float16/bfloat16/float32 inputs.
    """
    _check_pair(x, y)
    xn, yn = _l2_normalize(_upcast(x)), _l2_normalize(_upcast(y))
    x2 = (xn * xn).sum(-1).unsqueeze(-1)
    y2 = (yn * yn).sum(-1).unsqueeze(-2)
    return (x2 + y2 - 2.0 * (xn @ yn.transpose(-1, -2))).clamp(0.0, 4.0)


def attention_cost(
    x: Tensor, y: Tensor, y_mask: Tensor | None = None, *, normalize: bool = True
) -> Tensor:
    r"""The authors' attention cost, in ``[0, 1]``:
    :math:`C_{ij} = 1 - \mathrm{softmax}_j(x_i \cdot y_j / \sqrt{d})`.

    With ``normalize=True`` (default) both sides are RMS-normalised first
    (:math:`\tilde x = \sqrt{d}\, x / \|x\|`, the scale a LayerNorm gives), so the logits are
    :math:`\sqrt{d} \cos(x_i, y_j)`: independent of the layer's scale, yet as peaked as in a
    transformer. (L2-normalising instead would make every logit :math:`\leq 1/\sqrt{d}` and the
    softmax, hence the cost, nearly uniform.) ``normalize=False`` uses the raw states, as the
    released code did.

    Each row is a distribution over the columns, so the cost is not symmetric and depends on
    ``m``: for long sequences most entries are close to 1. Padded columns (``y_mask == 0``) are
    excluded from the softmax (their cost is 1); a row with no valid column has cost 1.

    Parameters
    ----------
    x : Tensor, shape (B, n, d) or (n, d)
    y : Tensor, shape (B, m, d) or (m, d)
    y_mask : Tensor, shape (B, m) or (m,), optional
        Non-zero for valid (non-padded) columns. None: all valid.
    normalize : bool
        RMS-normalise both sides first (see above).

    Returns
    -------
    Tensor, shape (B, n, m) or (n, m); float32 for float16/bfloat16/float32 inputs.
    """
    _check_pair(x, y)
    d = x.shape[-1]
    xf, yf = _upcast(x), _upcast(y)
    if normalize:
        xf, yf = math.sqrt(d) * _l2_normalize(xf), math.sqrt(d) * _l2_normalize(yf)
    logits = (xf @ yf.transpose(-1, -2)) / math.sqrt(d)
    if y_mask is not None:
        if tuple(y_mask.shape) != tuple(y.shape[:-1]):
            raise ValueError(
                f"y_mask has shape {list(y_mask.shape)} but y needs {list(y.shape[:-1])}"
            )
        valid = (y_mask != 0).unsqueeze(-2)
        logits = logits.masked_fill(~valid, float("-inf"))
        # A row with no valid column would be softmax(-inf...) = NaN: give it finite logits,
        # then zero its probabilities.
        any_valid = valid.any(-1, keepdim=True)
        logits = torch.where(any_valid, logits, torch.zeros_like(logits))
        probs = torch.softmax(logits, dim=-1) * (valid & any_valid)
    else:
        probs = torch.softmax(logits, dim=-1)
    return 1.0 - probs


def pairwise_cost(
    x: Tensor, y: Tensor, kind: str = DEFAULT_COST, *, y_mask: Tensor | None = None
) -> Tensor:
    """Cost matrix between token representations ``x`` [B, n, d] and ``y`` [B, m, d].

    ``kind`` is one of :data:`COST_KINDS`: ``"cosine"`` (:func:`cosine_cost`, [0, 2]),
    ``"sq_euclidean"`` (:func:`sq_euclidean_cost`, [0, 4]) or ``"attention"``
    (:func:`attention_cost`, [0, 1]; the only one that uses ``y_mask``).
    """
    if kind == "cosine":
        return cosine_cost(x, y)
    if kind == "sq_euclidean":
        return sq_euclidean_cost(x, y)
    if kind == "attention":
        return attention_cost(x, y, y_mask)
    raise ValueError(f"unknown cost kind {kind!r}: choose one of {COST_KINDS}")


# --------------------------------------------------------------------------------------------
# The OT alignment loss
# --------------------------------------------------------------------------------------------

REDUCTIONS = ("mean", "sum", "none")


def _mask_weights(mask: Tensor | None, B: int, length: int, name: str, like: Tensor) -> Tensor:
    if mask is None:
        return torch.ones(B, length, dtype=torch.float32, device=like.device)
    if not isinstance(mask, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != (B, length):
        raise ValueError(
            f"{name} has shape {list(mask.shape)} but the states need [{B}, {length}] "
            "(1 for a valid token, 0 for padding)"
        )
    if mask.device != like.device:
        raise ValueError(f"{name} is on {mask.device} but the states on {like.device}")
    return (mask != 0).to(torch.float32)


def ot_alignment_loss(
    student: Tensor,
    teacher: Tensor,
    student_mask: Tensor | None = None,
    teacher_mask: Tensor | None = None,
    *,
    cost: str = DEFAULT_COST,
    eps: float = DEFAULT_EPS,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
    grad: str = "envelope",
    reduction: str = "mean",
) -> Tensor:
    r"""Sequence-level OT loss between student and (projected) teacher token states.

    For each example :math:`k`, with :math:`n_k` valid student tokens and :math:`m_k` valid
    teacher tokens and uniform weights :math:`\mathbf{a} = \mathbf{1}/n_k`,
    :math:`\mathbf{b} = \mathbf{1}/m_k`:

    .. math::
        \ell_k = \langle \mathbf{T}^\star, \mathbf{C}(X_k, Y_k) \rangle_F, \qquad
        \mathbf{T}^\star = \mathrm{Sinkhorn}_\varepsilon(\mathbf{C}, \mathbf{a}, \mathbf{b})

    (see :func:`sinkhorn`; ``C`` from :func:`pairwise_cost`, which normalises the states first).
    The loss is invariant to the order of the tokens on either side: it compares the two sets
    of states, which is what makes it usable across tokenizers.

    Parameters
    ----------
    student : Tensor, shape (B, n, d)
        Student hidden states (one layer), padded.
    teacher : Tensor, shape (B, m, d)
        Teacher hidden states of the same layer role, projected to the student's width ``d``.
    student_mask, teacher_mask : Tensor, shape (B, n) / (B, m), optional
        Non-zero for the tokens to align (e.g. response tokens), 0 for padding/prompt tokens.
        None: all tokens.
    cost : str
        ``"cosine"`` (default), ``"sq_euclidean"`` or ``"attention"``.
    eps : float
        Entropic regularisation in cost units; the default :data:`DEFAULT_EPS` is chosen so that
        the loss separates aligned from unrelated sequences (``benchmarks/ot_discrimination.py``).
    max_iter, tol, grad
        Passed to :func:`sinkhorn`. With ``grad="envelope"`` the gradient with respect to the
        states is :math:`\sum_{ij} T^\star_{ij} \partial C_{ij}`, i.e. the exact gradient of
        the entropic objective :math:`\mathrm{OT}_\varepsilon` at convergence (not of
        :math:`\ell_k` itself, which also moves through :math:`\mathbf{T}^\star`).
    reduction : {"mean", "sum", "none"}
        ``"none"``: the ``[B]`` per-example values. An example with no valid token on either
        side contributes 0 and, for ``"mean"``, is left out of the denominator (the mean is over
        the examples that have tokens on both sides; 0 if there is none).

    Returns
    -------
    Tensor
        Scalar (or ``[B]`` for ``reduction="none"``), float32 (float64 for float64 states).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if cost not in COST_KINDS:
        raise ValueError(f"unknown cost kind {cost!r}: choose one of {COST_KINDS}")
    for name, t in (("student", student), ("teacher", teacher)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a [B, len, d] tensor, got {shape}")
    B, n, _ = student.shape
    m = teacher.shape[1]
    if teacher.shape[0] != B:
        raise ValueError(f"student has batch size {B} but teacher {teacher.shape[0]}")
    a = _mask_weights(student_mask, B, n, "student_mask", student)
    b = _mask_weights(teacher_mask, B, m, "teacher_mask", student)
    C = pairwise_cost(student, teacher, cost, y_mask=b)
    res = sinkhorn(C, a.to(C.dtype), b.to(C.dtype), eps=eps, max_iter=max_iter, tol=tol, grad=grad)
    values = res.value
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    nonempty = ((a.sum(-1) > 0) & (b.sum(-1) > 0)).sum()
    return values.sum() / nonempty.clamp_min(1).to(values.dtype)
