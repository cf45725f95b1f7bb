r"""Token-level losses on response positions: cross-entropy, same-vocabulary KD, ULD.

Positions
---------
A model runs on ``input_ids [B, T]`` (right padding). ``response_mask [B, T]`` is 1 on the
response tokens (answer, or rationale + answer, with the final EOS) and 0 on the prompt and the
padding. The *prediction positions* of the response are the positions ``p`` with
``response_mask[p + 1] == 1``: the logits / hidden state at ``p`` predict response token
``p + 1``. :func:`response_positions` lists them per example, packed to the left in their order,
as ``index [B, R]`` plus ``mask [B, R]``; the ``r``-th valid entry of an example is its
``r``-th response token. Every loss of the project (CE, KD, OT on hidden states) works on these
positions, and the teacher cache stores its states already reduced to them.

Teacher distributions from a top-k cache
----------------------------------------
The teacher cache may hold only the ``k`` largest raw logits per position
(``topk_ids, topk_logits [.., k]``). The KD losses then use the teacher distribution
*renormalised over its top-k entries at temperature T*,
:math:`p_i = \exp(z_i/T) / \sum_{j \in \text{top-}k} \exp(z_j/T)`, which drops the tail mass
:math:`1 - \sum_{\text{top-}k} p^{\text{full}}` (small for peaked LM distributions; exact when
``k`` is the vocabulary size). For same-vocabulary KD (:func:`topk_kd_divergence`) the student
is restricted to the same ``k`` entries and renormalised too, so that every divergence
(including reverse KL, which is infinite where the teacher puts no mass) stays finite.

Temperature
-----------
All KD losses here divide both logit sets by ``T`` and do **not** multiply by :math:`T^2`
(Hinton et al. 2015 do, to keep gradient magnitudes comparable across temperatures; DSKD's code,
which CoT2Align builds on, does not). Multiply by ``T ** 2`` outside to get it.

References
----------
.. [1] G. Hinton, O. Vinyals, J. Dean. Distilling the Knowledge in a Neural Network. 2015.
.. [2] J. Ko et al. DistiLLM: Towards Streamlined Distillation for Large Language Models.
   ICML 2024 (skewed KL / skewed reverse KL).
.. [3] N. Boizard et al. Towards Cross-Tokenizer Distillation: the Universal Logit
   Distillation Loss for LLMs. 2024 (ULD).
.. [4] S. Zhang et al. Dual-Space Knowledge Distillation for Large Language Models. EMNLP 2024
   (the divergence definitions of its code, used by CoT2Align).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cot2align_core.config import SAME_VOCAB_KD_BASES

__all__ = [
    "KD_KINDS",
    "response_positions",
    "gather_positions",
    "pack_left",
    "response_ce",
    "ce_at_positions",
    "kd_divergence",
    "kd_divergence_per_position",
    "topk_kd_divergence",
    "uld_loss",
]

#: The same-vocabulary divergences of :func:`kd_divergence` (the config's same-vocabulary KD
#: bases).
KD_KINDS = SAME_VOCAB_KD_BASES


# --------------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------------


def _check_2d(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a [B, T] tensor, got {shape}")


def response_positions(response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Prediction positions of the response tokens, packed left.

    Parameters
    ----------
    response_mask : Tensor, shape (B, T), int or bool
        1 on the response tokens (incl. EOS), 0 on prompt and padding.

    Returns
    -------
    index : LongTensor, shape (B, R)
        ``index[b, r]`` is the position whose output predicts the ``r``-th response token of
        example ``b`` (that token sits at ``index[b, r] + 1``); 0 where ``mask`` is False.
        ``R`` is the largest number of response tokens in the batch (0 for an empty batch).
    mask : BoolTensor, shape (B, R)
        True on the first ``n_b`` entries of row ``b`` (``n_b`` its response length, minus one
        if the response starts at position 0, where nothing predicts it).
    """
    _check_2d("response_mask", response_mask)
    B, T = response_mask.shape
    valid = response_mask[:, 1:] != 0  # [B, T-1]: position p predicts token p+1
    return pack_left(valid)


def pack_left(valid: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of the True entries of each row of ``valid [B, T]``, in order, packed left.

    Returns ``(index [B, R], mask [B, R])`` with ``R`` the largest count of a row.
    """
    _check_2d("valid", valid)
    valid = valid.bool()
    B = valid.shape[0]
    counts = valid.sum(1)
    R = int(counts.max()) if valid.numel() else 0
    # Stable sort of "not valid" puts the valid positions first, in their order.
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices[:, :R]
    mask = torch.arange(R, device=valid.device).unsqueeze(0) < counts.unsqueeze(1)
    index = torch.where(mask, order, torch.zeros_like(order))
    return index.reshape(B, R), mask.reshape(B, R)


def gather_positions(x: Tensor, index: Tensor, mask: Tensor) -> Tensor:
    """``x[b, index[b, r], ...]`` for every ``(b, r)``, zero where ``mask`` is False.

    Parameters
    ----------
    x : Tensor, shape (B, T, ...)
    index : LongTensor, shape (B, R)
    mask : BoolTensor, shape (B, R)

    Returns
    -------
    Tensor, shape (B, R, ...), differentiable with respect to ``x``.
    """
    if x.dim() < 2:
        raise ValueError(f"x must be [B, T, ...], got {list(x.shape)}")
    if index.shape != mask.shape or index.dim() != 2 or index.shape[0] != x.shape[0]:
        raise ValueError(
            f"index {list(index.shape)} and mask {list(mask.shape)} must both be [B, R] with "
            f"B = x.shape[0] = {x.shape[0]}"
        )
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    out = x[rows, index.to(x.device)]
    m = mask.to(x.device).reshape(mask.shape + (1,) * (x.dim() - 2))
    return torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device))


# --------------------------------------------------------------------------------------------
# Cross-entropy
# --------------------------------------------------------------------------------------------


def ce_at_positions(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean token cross-entropy ``-log softmax(logits)[target]`` over the ``mask`` positions.

    ``logits [B, R, V]`` (any float dtype; computed in float32, float64 stays float64),
    ``targets [B, R]`` long, ``mask [B, R]``. Returns a scalar; 0 (still attached to
    ``logits``) when nothing is masked in.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2] or mask.shape != targets.shape:
        raise ValueError(
            f"logits must be [B, R, V] with targets and mask [B, R]; got logits "
            f"{list(logits.shape)}, targets {list(targets.shape)}, mask {list(mask.shape)}"
        )
    m = mask.bool()
    if not bool(m.any()):
        return logits.sum() * 0.0
    wd = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.cross_entropy(logits[m].to(wd), targets[m].long(), reduction="mean")


def response_ce(logits: Tensor, input_ids: Tensor, response_mask: Tensor) -> Tensor:
    r"""Cross-entropy on the response tokens only (prompt and padding masked out).

    .. math::
        \mathrm{CE} = \frac{1}{N} \sum_{b} \sum_{p:\ \mathrm{resp}[b, p+1] = 1}
            -\log \mathrm{softmax}(\text{logits}[b, p])_{\text{ids}[b, p+1]}

    with :math:`N` the number of response tokens of the batch (a token mean over the batch).

    Parameters
    ----------
    logits : Tensor, shape (B, T, V)
    input_ids : LongTensor, shape (B, T)
    response_mask : Tensor, shape (B, T)

    Returns
    -------
    Tensor, scalar (float32); 0 when the batch has no response token.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got {list(logits.shape)}")
    _check_2d("input_ids", input_ids)
    _check_2d("response_mask", response_mask)
    if input_ids.shape != logits.shape[:2] or response_mask.shape != input_ids.shape:
        raise ValueError(
            f"logits {list(logits.shape)}, input_ids {list(input_ids.shape)} and response_mask "
            f"{list(response_mask.shape)} must agree on [B, T]"
        )
    valid = response_mask[:, 1:] != 0
    targets = input_ids[:, 1:]
    return ce_at_positions(logits[:, :-1], targets, valid)


# --------------------------------------------------------------------------------------------
# Same-vocabulary KD
# --------------------------------------------------------------------------------------------


def _log_mix(lp: Tensor, lq: Tensor, w: float) -> Tensor:
    """``log(w p + (1 - w) q)`` from log-probabilities, stably."""
    if w <= 0.0:
        return lq
    if w >= 1.0:
        return lp
    return torch.logaddexp(lp + math.log(w), lq + math.log1p(-w))


def _kl_terms(lp: Tensor, lq: Tensor) -> Tensor:
    """``sum_v p_v (log p_v - log q_v)`` over the last dim; 0 * anything = 0."""
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)


def kd_divergence_per_position(student_logits: Tensor, teacher_logits: Tensor, *,
                               kind: str = "forward_kl", temperature: float = 2.0,
                               skew: float = 0.1) -> Tensor:
    r"""The divergence of :func:`kd_divergence` at every position, shape ``logits.shape[:-1]``.

    With :math:`p = \mathrm{softmax}(z_t / T)` (teacher) and :math:`q = \mathrm{softmax}(z_s / T)`
    (student), computed in float32 (float64 stays float64):

    - ``forward_kl``: :math:`\mathrm{KL}(p \| q) = \sum_v p_v \log(p_v / q_v)`
    - ``reverse_kl``: :math:`\mathrm{KL}(q \| p)`
    - ``js``: :math:`\tfrac12 \mathrm{KL}(p \| m) + \tfrac12 \mathrm{KL}(q \| m)`,
      :math:`m = \tfrac12 (p + q)`
    - ``skewed_forward_kl``: :math:`\mathrm{KL}(p \| \lambda p + (1 - \lambda) q)` [2]
    - ``skewed_reverse_kl``: :math:`\mathrm{KL}(q \| \lambda q + (1 - \lambda) p)` [2]
    - ``tvd``: :math:`\tfrac12 \sum_v |p_v - q_v|`

    with :math:`\lambda` = ``skew``. No :math:`T^2` factor.
    """
    if kind not in KD_KINDS:
        raise ValueError(f"kind must be one of {KD_KINDS}, got {kind!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew must be in [0, 1], got {skew!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {list(student_logits.shape)} and teacher_logits "
            f"{list(teacher_logits.shape)} must have the same shape (position-aligned logits of "
            "one vocabulary)"
        )
    wd = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    lq = F.log_softmax(student_logits.to(wd) / temperature, dim=-1)
    lp = F.log_softmax(teacher_logits.to(wd) / temperature, dim=-1)
    if kind == "forward_kl":
        return _kl_terms(lp, lq)
    if kind == "reverse_kl":
        return _kl_terms(lq, lp)
    if kind == "js":
        lm = _log_mix(lp, lq, 0.5)
        return 0.5 * _kl_terms(lp, lm) + 0.5 * _kl_terms(lq, lm)
    if kind == "skewed_forward_kl":
        return _kl_terms(lp, _log_mix(lp, lq, skew))
    if kind == "skewed_reverse_kl":
        return _kl_terms(lq, _log_mix(lq, lp, skew))
    return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)  # tvd


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(values.device).bool()
    if not bool(m.any()):
        return values.sum() * 0.0
    return values[m].mean()


def kd_divergence(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, *,
                  kind: str = "forward_kl", temperature: float = 2.0,
                  skew: float = 0.1) -> Tensor:
    """Same-vocabulary KD: mean over the ``mask`` positions of a divergence between softmaxes.

    Parameters
    ----------
    student_logits, teacher_logits : Tensor, shape (..., V)
        Position-aligned logits over one vocabulary (e.g. ``[B, R, V]``). No gradient is taken
        through the teacher by the caller's convention (detach it or give a cached tensor).
    mask : Tensor, shape (...)
        True/1 where the position counts.
    kind : {"forward_kl", "reverse_kl", "js", "skewed_forward_kl", "skewed_reverse_kl", "tvd"}
        See :func:`kd_divergence_per_position`.
    temperature : float
        Both logit sets are divided by it; the :math:`T^2` factor is **not** applied.
    skew : float
        :math:`\\lambda` of the skewed divergences (0.1 as in DistiLLM).

    Returns
    -------
    Tensor, scalar; 0 when ``mask`` is empty.
    """
    if mask.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"mask {list(mask.shape)} must have the logits' shape without the vocabulary "
            f"dimension, {list(student_logits.shape[:-1])}"
        )
    per_pos = kd_divergence_per_position(student_logits, teacher_logits, kind=kind,
                                         temperature=temperature, skew=skew)
    return _masked_mean(per_pos, mask)


def topk_kd_divergence(student_logits: Tensor, teacher_topk_ids: Tensor,
                       teacher_topk_logits: Tensor, mask: Tensor, *, kind: str = "forward_kl",
                       temperature: float = 2.0, skew: float = 0.1) -> Tensor:
    """:func:`kd_divergence` against a top-k teacher cache (one vocabulary).

    The student logits are gathered at the teacher's top-k ids and both distributions are
    renormalised over those ``k`` entries at temperature ``T`` (module docstring); exact when
    ``k`` is the vocabulary size.

    Parameters
    ----------
    student_logits : Tensor, shape (B, R, V)
    teacher_topk_ids : LongTensor, shape (B, R, k), entries in ``[0, V)``
    teacher_topk_logits : Tensor, shape (B, R, k)
    mask : Tensor, shape (B, R)
    """
    if teacher_topk_ids.shape != teacher_topk_logits.shape:
        raise ValueError(
            f"teacher_topk_ids {list(teacher_topk_ids.shape)} and teacher_topk_logits "
            f"{list(teacher_topk_logits.shape)} must have the same shape"
        )
    if teacher_topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher top-k {list(teacher_topk_ids.shape)} and student_logits "
            f"{list(student_logits.shape)} must agree on the position dimensions"
        )
    V = student_logits.shape[-1]
    if teacher_topk_ids.numel() and (int(teacher_topk_ids.max()) >= V
                                     or int(teacher_topk_ids.min()) < 0):
        raise ValueError(
            f"teacher_topk_ids has ids outside [0, {V}): the teacher and the student do not "
            "share one vocabulary; use a cross-tokenizer KD base (uld, mined, dskd)"
        )
    s = student_logits.gather(-1, teacher_topk_ids.long())
    return kd_divergence(s, teacher_topk_logits, mask, kind=kind, temperature=temperature,
                         skew=skew)


# --------------------------------------------------------------------------------------------
# ULD
# --------------------------------------------------------------------------------------------


def uld_loss(student_logits: Tensor, student_mask: Tensor, teacher_logits: Tensor,
             teacher_mask: Tensor, *, temperature: float = 1.0) -> Tensor:
    r"""Universal Logit Distillation (Boizard et al. 2024) between two vocabularies.

    At each aligned position, both distributions are taken at temperature ``T``, sorted in
    decreasing order, the shorter one is zero-padded to the longer length, and the loss is the
    L1 distance between the sorted vectors, i.e. the closed form of the Wasserstein-1 distance
    the paper uses between the two distributions when their supports are unrelated:

    .. math::
        \mathrm{ULD}_t = \sum_{i=1}^{\max(|V_s|, |V_t|)}
            \left| q^{\downarrow}_i - p^{\downarrow}_i \right|

    Position alignment, as in the authors' code: the ``r``-th valid student position of an
    example is paired with its ``r``-th valid teacher position (both start at the first
    response token), for ``r < min(n_s, n_t)``; the longer sequence's tail is ignored. The loss
    is the mean over those positions of each example, then the mean over the examples that have
    at least one pair.

    The teacher may be a top-k cache: the ``k`` given logits are renormalised at ``T`` (module
    docstring) and the remaining entries are 0, which is what zero-padding does anyway.

    Computed without sorting whole vocabularies: with ``K = min(V_s, k)`` and the top-``K``
    values of each side, the L1 distance is
    :math:`\sum_{i<K} |q^\downarrow_i - p^\downarrow_i| + (1 - \sum_{i<K} q^\downarrow_i)
    + (1 - \sum_{i<K} p^\downarrow_i)` (beyond ``K`` one of the two sorted vectors is 0).

    Parameters
    ----------
    student_logits : Tensor, shape (B, R_s, V_s)
    student_mask : Tensor, shape (B, R_s)
    teacher_logits : Tensor, shape (B, R_t, k)
        Full teacher logits (``k = V_t``) or its top-k logits (the ids are not needed: sorting
        discards them).
    teacher_mask : Tensor, shape (B, R_t)
    temperature : float
        Applied to both sides (the paper's default is 1). No :math:`T^2` factor.

    Returns
    -------
    Tensor, scalar; 0 when no example has a pair.
    """
    if student_logits.dim() != 3 or teacher_logits.dim() != 3:
        raise ValueError(
            f"student_logits and teacher_logits must be [B, R, V], got "
            f"{list(student_logits.shape)} and {list(teacher_logits.shape)}"
        )
    B = student_logits.shape[0]
    if teacher_logits.shape[0] != B:
        raise ValueError(
            f"batch sizes differ: student {B}, teacher {teacher_logits.shape[0]}"
        )
    if (student_mask.shape != student_logits.shape[:2]
            or teacher_mask.shape != teacher_logits.shape[:2]):
        raise ValueError(
            f"student_mask {list(student_mask.shape)} must be {list(student_logits.shape[:2])} "
            f"and teacher_mask {list(teacher_mask.shape)} must be {list(teacher_logits.shape[:2])}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    wd = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    # Pair the r-th valid positions of both sides.
    s_idx, s_m = pack_left(student_mask.bool())
    t_idx, t_m = pack_left(teacher_mask.bool().to(student_mask.device))
    R = min(s_idx.shape[1], t_idx.shape[1])
    pair = s_m[:, :R] & t_m[:, :R].to(s_m.device)  # [B, R]
    if not bool(pair.any()):
        return student_logits.sum() * 0.0
    rows = torch.arange(B, device=student_logits.device).unsqueeze(1).expand(B, R)
    s = student_logits[rows[pair], s_idx[:, :R][pair]]  # [N, V_s]
    t = teacher_logits[rows[pair].to(teacher_logits.device),
                       t_idx[:, :R][pair].to(teacher_logits.device)].to(s.device)  # [N, k]
    q = F.softmax(s.to(wd) / temperature, dim=-1)
    p = F.softmax(t.to(wd) / temperature, dim=-1)
    K = min(q.shape[-1], p.shape[-1])
    q_top = q.topk(K, dim=-1).values if K < q.shape[-1] else q.sort(-1, descending=True).values
    p_top = p.topk(K, dim=-1).values if K < p.shape[-1] else p.sort(-1, descending=True).values
    per_pos = ((q_top - p_top).abs().sum(-1)
               + (1.0 - q_top.sum(-1)).clamp_min(0.0)
               + (1.0 - p_top.sum(-1)).clamp_min(0.0))  # [N]
    # Mean per example, then over the examples with a pair.
    ex = rows[pair]
    sums = torch.zeros(B, dtype=per_pos.dtype, device=per_pos.device).index_add(0, ex, per_pos)
    counts = pair.sum(1).to(per_pos.dtype)
    has = counts > 0
    return (sums[has] / counts[has]).mean()
