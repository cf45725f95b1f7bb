r"""The CoT2Align training objective: CE + a cross-tokenizer KD base + cross-CoT OT alignment.

.. math::
    \mathcal{L} = (1 - \alpha)\, \mathrm{CE}
      + \alpha \Big( w_{kd}\, \mathrm{KD}_{base}
      + w_{ot} \sum_{l \in \text{layers}} \lambda_l \sum_{p \in \text{pairs}} w_p\,
        \mathrm{OT}\big(Q_l(\hat H^{p}_{s}[l]),\ \hat H^{p}_{t}[l]\big) \Big)

Configured by :class:`~cot2align_core.config.ObjectiveConfig` (one place for every default).

Forms and pairs
---------------
Each example exists in the *standard* form (prompt -> answer) and, when the teacher wrote a
rationale, in the *cot* form (CoT prompt -> rationale + answer). The student is run once per
form, only on the rows that have it (``present``). Then:

- ``CE = sum_f CE_f``: response-token cross-entropy of each present form (a token mean over
  the form's rows, :func:`~cot2align_core.losses.response_ce`);
- ``KD_base = sum_f KD_f``: the KD base of each form against the teacher on the *same* text
  (:mod:`cot2align_core.kd_bases`);
- OT pairs, each a mean over the examples that have both sides:

  ===========  =================  =================
  pair          student sequence   teacher sequence
  ===========  =================  =================
  ``main``      form f             form f (for each f; summed)
  ``cross_a``   standard           cot
  ``cross_b``   cot                standard
  ===========  =================  =================

  The cross pairs compare two different texts (an answer with a rationale + answer); OT needs
  no position correspondence, so their lengths may differ freely.

Layers
------
Every OT term compares the states of the *response tokens* (EOS included) of both sides.

- ``"embedding"``: the token embeddings of the response tokens themselves, on both sides: the
  student's ``model.get_input_embeddings()(response ids)`` (GPT-2's ``wte`` without ``wpe``;
  Llama/Mistral/Qwen's ``embed_tokens``) and ``teacher_embed[response ids]`` (the cache's
  ``target_ids``). Not ``hidden_states[0]``: for GPT-2 that is ``wte + wpe``, and comparing it
  with position-free teacher rows sends the OT gradient into the position embeddings (measured
  before this fix: the ``wpe`` rows of the response positions collapsed onto one direction).
- ``"last"``: ``hidden_states[-1]`` (after the final norm) at the response prediction
  positions, against the cached teacher layer ``-1``.
- a depth fraction ``f`` in (0, 1): ``hidden_states[round(f L)]`` of each model with its own
  depth ``L`` (:func:`hidden_index`); the teacher's layer must be cached
  (:func:`teacher_layers_needed`).

Where the sides meet (``ot.space``)
-----------------------------------
Both sides are RMS-normalised per token first (the scale of ``hidden_states`` differs by orders
of magnitude between layers). Then:

- ``"teacher"`` (default): a learned ``Q_l: nn.Linear(D_s -> D_t)`` per layer carries the
  student's states into the teacher's space; the teacher's states are used as cached. The
  teacher side is fixed and spread, so no map can lower the cost by collapsing it: a map that
  sends every student state to one point pays the mean cost to the whole spread teacher set.
- ``"student"``: the paper's single ``P: nn.Linear(D_t -> D_s)``, shared by the layers,
  carries the teacher's states into the student's space. Both sides then move, and they can
  collapse together. Kept to reproduce the paper and as an ablation.

Measured on the demo (``benchmarks/method_study.py``, DSKD base, dev split, 3 training seeds,
after 1500 steps; "spread" is the mean cosine to the centroid, 1 = one direction):

=================  ====================  =====================  =====================
space              greedy EM standard    greedy EM CoT          spread, last layer
=================  ====================  =====================  =====================
``teacher``        96.0 +- 2.8           78.7 +- 2.5            0.56 (mapped student)
``student``        81.8 +- 19.4          54.5 +- 6.6            0.98-0.99 (projected
                                                                teacher), 0.91 (student)
=================  ====================  =====================  =====================

In the student space both the projected teacher states and the student's own last-layer
states collapsed (the cached teacher states themselves: 0.28); in the teacher space the OT
cost against the example's own teacher stays at a quarter of the cost against another
example's (main pair, standard form, last layer: own / shuffled 0.26-0.29, against 0.58-0.81).

:meth:`CoT2AlignObjective.health` measures both failure modes on a probe batch.

Layer weights (``ot.layer_weighting``)
--------------------------------------
``"fixed"``: :math:`\lambda_l = 1`. ``"uncertainty"``: homoscedastic uncertainty weighting
(Kendall, Gal and Cipolla 2018) with one learned log-variance :math:`s_l` per layer: the term
of layer ``l`` is :math:`e^{-s_l} \mathrm{OT}_l + s_l`. At the optimum
:math:`s_l = \log \mathrm{OT}_l`, so its gradient with respect to the student is that of
:math:`\log \mathrm{OT}_l`: every layer is trained on its relative improvement, whatever the
scale of its cost; the paper leaves the per-layer weights to future work.

With ``alpha = 0`` the objective is plain SFT (``CE``); the teacher inputs may then be None.

References
----------
.. [1] CoT2Align: Cross-Chain of Thought Distillation via Optimal Transport Alignment for
   Language Models with Different Tokenizers. arXiv:2502.16806.
.. [2] A. Kendall, Y. Gal, R. Cipolla. Multi-Task Learning Using Uncertainty to Weigh Losses
   for Scene Geometry and Semantics. CVPR 2018.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cot2align_core.batching import LAST, StudentBatch, StudentRun, TeacherBatch
from cot2align_core.config import ObjectiveConfig, OTConfig
from cot2align_core.prompts import FORMS
from cot2align_core.kd_bases import build_kd_base
from cot2align_core.losses import ce_at_positions, gather_positions, response_positions
from cot2align_core.ot import pairwise_cost, sinkhorn

__all__ = [
    "PAIRS",
    "TeacherBatch",
    "StudentBatch",
    "layer_name",
    "hidden_index",
    "teacher_layers_needed",
    "OTProblem",
    "one_sided_transport",
    "OTAlignment",
    "CoT2AlignObjective",
]

#: pair name -> (student form, teacher form) combinations.
PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "main": (("standard", "standard"), ("cot", "cot")),
    "cross_a": (("standard", "cot"),),
    "cross_b": (("cot", "standard"),),
}


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def layer_name(spec: str | float) -> str:
    """The name of an OT layer in loss terms: ``embedding``, ``last`` or the fraction (``0.5``)."""
    return spec if isinstance(spec, str) else f"{float(spec):g}"


def hidden_index(spec: str | float, num_layers: int) -> int:
    """HF ``hidden_states`` index of a (non-embedding) OT layer in a model of ``num_layers``.

    ``"last"`` is ``num_layers``; a fraction ``f`` is ``round(f * num_layers)`` (halves up),
    kept within ``[1, num_layers]``: index 0 is the embedding output, which
    ``"embedding"`` replaces by the position-free token embeddings.
    """
    if spec == "last":
        return num_layers
    if isinstance(spec, str):
        raise ValueError(f"layer {spec!r} has no hidden_states index")
    return min(max(int(float(spec) * num_layers + 0.5), 1), num_layers)


def _teacher_index(spec: str | float, teacher_num_layers: int | None) -> int:
    """The cache's name of the teacher layer of ``spec``: ``-1`` for the last layer."""
    if spec == "last":
        return LAST
    if teacher_num_layers is None:
        raise ValueError(f"OT layer {spec!r} is a depth fraction: give teacher_num_layers "
                         "(the teacher config's num_hidden_layers)")
    index = hidden_index(spec, teacher_num_layers)
    return LAST if index == teacher_num_layers else index


def teacher_layers_needed(objective_config: ObjectiveConfig, teacher_num_layers: int) -> list[int]:
    """The teacher ``hidden_states`` indices cache_teacher must store for this objective.

    Always the last layer (``-1``: DSKD's states, the teacher logits without a top-k cache,
    ``"last"`` OT), plus the layer of each depth-fraction OT layer, in increasing depth with
    ``-1`` last. The embedding layer is never cached (it is the teacher's embedding matrix).
    """
    needed = {LAST}
    if objective_config.uses_ot:
        for spec in objective_config.ot.layers:
            if spec != "embedding":
                needed.add(_teacher_index(spec, teacher_num_layers))
    return sorted(needed, key=lambda i: (i == LAST, i))


_NEG = -1e30  # a logit that no valid entry reaches


def _rms_normalise(x: Tensor, eps: float = 1e-6) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _centred(x: Tensor, mask: Tensor) -> Tensor:
    """``x [n, R, D]`` minus the mean of its valid tokens (``mask [n, R]``) over the whole
    batch: the direction every state shares is removed before the cosine cost."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return x - (x * m).sum((0, 1)) / m.sum().clamp_min(1)


def _spread(x: Tensor) -> float:
    """Mean cosine of the rows of ``x [N, D]`` to the centroid of their unit vectors
    (1: all on one direction; near 0: spread)."""
    u = nn.functional.normalize(x.float(), dim=-1)
    c = nn.functional.normalize(u.mean(0), dim=0)
    return float((u @ c).mean())


# --------------------------------------------------------------------------------------------
# OT alignment
# --------------------------------------------------------------------------------------------


@dataclass
class OTProblem:
    """A batch of OT problems of one pair and layer.

    ``cost [k, R_s, R_t]`` between the student's and the teacher's states in the common space;
    ``student_mask [k, R_s]``, ``teacher_mask [k, R_t]`` the valid tokens (uniform weights);
    ``free``: None (balanced), or the side whose marginal is free (``"student"`` /
    ``"teacher"``, :func:`one_sided_transport`)."""

    cost: Tensor
    student_mask: Tensor
    teacher_mask: Tensor
    free: str | None = None


def one_sided_transport(cost: Tensor, student_mask: Tensor, teacher_mask: Tensor, *,
                        free: str, eps: float, grad: str = "envelope") -> Tensor:
    r"""Transport cost of the entropic OT plan with one marginal free, per problem ``[k]``.

    With uniform weights :math:`a` (student tokens) and :math:`b` (teacher tokens) and the
    teacher's marginal free (``free="teacher"``):

    .. math::
        T^\star = \mathop{\arg\min}_{T \geq 0,\ T \mathbf{1} = a}
            \langle T, C \rangle + \varepsilon\, \mathrm{KL}(T \| a b^\top),
        \qquad T^\star_{ij} = a_i\, \frac{b_j e^{-C_{ij}/\varepsilon}}
            {\sum_l b_l e^{-C_{il}/\varepsilon}},

    the limit of semi-relaxed OT (Rabin et al. 2014; Peyré and Cuturi 2019, ch. 10) when the
    penalty on the free marginal vanishes: each student token sends its mass to the teacher
    tokens most like it, and teacher tokens with no counterpart carry none. ``free="student"``
    is the same with the roles exchanged (columns keep :math:`b`). Returns
    :math:`\langle T^\star, C \rangle`; with ``grad="envelope"`` its gradient with respect to
    the cost is :math:`T^\star` (the plan is held constant, as for Sinkhorn), with
    ``"unroll"`` the exact derivative. 0 for a problem with an empty side. Computed in
    float32 (float64 stays float64).
    """
    sm, tm = student_mask.bool(), teacher_mask.bool()
    wd = torch.float64 if cost.dtype == torch.float64 else torch.float32
    a = sm.to(wd) / sm.sum(1, keepdim=True).clamp_min(1)
    b = tm.to(wd) / tm.sum(1, keepdim=True).clamp_min(1)
    valid = sm.unsqueeze(2) & tm.unsqueeze(1)
    cost = cost.to(wd).masked_fill(~valid, 0.0)  # padding may hold anything, even NaN
    logits = (-cost / eps).masked_fill(~valid, _NEG)
    if free == "teacher":
        plan = a.unsqueeze(2) * torch.softmax(logits, dim=2)
    elif free == "student":
        plan = b.unsqueeze(1) * torch.softmax(logits, dim=1)
    else:
        raise ValueError(f"free must be 'student' or 'teacher', got {free!r}")
    plan = plan * valid
    if grad == "envelope":
        plan = plan.detach()
    return (plan * cost).sum((1, 2))


class _SemiOrthogonal(nn.Module):
    """Parametrization ``W = Q``: the orthonormal factor of the QR decomposition of the stored
    matrix (of its transpose when it is wide), columns signed by ``R``'s diagonal so that ``Q``
    moves continuously with it. ``O(D_out D_in min(D_out, D_in))`` per call, against
    ``O(max^3)`` for the matrix exponential of ``torch.nn.utils.parametrizations.orthogonal``
    (whose default Householder map, besides, collapses to the zero matrix under AdamW here)."""

    def forward(self, X: Tensor) -> Tensor:
        tall = X.shape[0] >= X.shape[1]
        Q, R = torch.linalg.qr(X if tall else X.T)
        sign = torch.sign(torch.diagonal(R))
        Q = Q * torch.where(sign == 0, torch.ones_like(sign), sign)
        return Q if tall else Q.T


def _linear_map(d_in: int, d_out: int, kind: str) -> nn.Module:
    """A learned map ``d_in -> d_out``: affine (``"linear"``), or a semi-orthogonal matrix
    without bias (``"orthogonal"``: orthonormal columns when ``d_out >= d_in``, rows
    otherwise, :class:`_SemiOrthogonal`), which keeps every angle between the states it maps
    (``d_out >= d_in``), so it cannot gather them onto one direction."""
    if kind == "orthogonal":
        layer = nn.Linear(d_in, d_out, bias=False)
        nn.utils.parametrize.register_parametrization(layer, "weight", _SemiOrthogonal())
        return layer
    return nn.Linear(d_in, d_out)


class OTAlignment(nn.Module):
    """The OT terms of one objective: the learned maps, the per-pair costs, the layer weights.

    Parameters
    ----------
    config : OTConfig
    student_dim, teacher_dim : int
        Hidden widths ``D_s`` and ``D_t``.
    teacher_num_layers : int, optional
        The teacher's depth; needed when a layer is a depth fraction.

    Attributes
    ----------
    names : tuple of str
        Layer names (:func:`layer_name`), in the config's order.
    maps : nn.ModuleList of ``nn.Linear(D_s -> D_t)``, one per layer of ``names``
        (``space="teacher"``; ``map="orthogonal"``: no bias, orthonormal columns)
    projector : nn.Linear(D_t -> D_s), shared (``space="student"``)
    log_vars : nn.Parameter, shape (n_layers,) (``layer_weighting="uncertainty"``)
    """

    def __init__(self, config: OTConfig, *, student_dim: int, teacher_dim: int,
                 teacher_num_layers: int | None = None):
        super().__init__()
        self.config = config
        self.specs = {layer_name(s): s for s in config.layers}
        self.names = tuple(self.specs)
        self.cross_names = tuple(layer_name(s) for s in config.cross_layers)
        self.teacher_index = {n: _teacher_index(s, teacher_num_layers)
                              for n, s in self.specs.items() if s != "embedding"}
        self.maps = self.projector = self.log_vars = None
        if config.space == "teacher":
            self.maps = nn.ModuleList(_linear_map(student_dim, teacher_dim, config.map)
                                      for _ in self.names)
        else:
            self.projector = _linear_map(teacher_dim, student_dim, config.map)
        if config.layer_weighting == "uncertainty":
            self.log_vars = nn.Parameter(torch.zeros(len(self.names)))

    def embedding_map(self) -> nn.Module | None:
        """The learned map of the embedding layer (student -> teacher), None without one
        (``space="student"``, or no embedding layer in ``layers``)."""
        if self.maps is None or "embedding" not in self.names:
            return None
        return self.maps[self.names.index("embedding")]

    @torch.no_grad()
    def init_from_anchors(self, student_rows: Tensor, teacher_rows: Tensor) -> Tensor:
        """Start the embedding layer's map (``ot.map_init="anchors"``) at the orthogonal
        Procrustes solution on anchor pairs: row ``i`` of ``student_rows [k, D_s]`` (the
        student's input embedding of a token) and of ``teacher_rows [k, D_t]`` (the teacher's
        of the token spelled the same). Both are RMS-normalised as :meth:`sides` does (and
        centred over the anchors with ``center``); ``W = U V^T`` from ``Y^T X = U S V^T``
        minimises ``||X W^T - Y||`` over ``W`` with orthonormal columns (rows when ``D_t <
        D_s``). A linear map gets bias 0. Returns ``W [D_t, D_s]``.

        Why: from a random start the map and the student's embeddings settle on a pairing that
        ignores which token is which on some seeds (own/shuffled 0.94 on the demo's seed 1);
        the shared spellings are the one token-level correspondence known before training."""
        layer = self.embedding_map()
        if layer is None:
            raise ValueError("init_from_anchors needs space 'teacher' and the embedding layer")
        if student_rows.shape[0] != teacher_rows.shape[0] or student_rows.shape[0] < 2:
            raise ValueError(f"anchor rows must pair up, at least 2: got "
                             f"{student_rows.shape[0]} student and {teacher_rows.shape[0]} "
                             "teacher rows")
        X = _rms_normalise(student_rows.double())
        Y = _rms_normalise(teacher_rows.double().to(X.device))
        if self.config.center:
            X, Y = X - X.mean(0), Y - Y.mean(0)
        U, _, Vh = torch.linalg.svd(Y.T @ X, full_matrices=False)
        W = U @ Vh
        dst = (layer.parametrizations.weight.original
               if nn.utils.parametrize.is_parametrized(layer, "weight") else layer.weight)
        dst.copy_(W.to(dst))
        if layer.bias is not None:
            layer.bias.zero_()
        return W.to(dst.dtype)

    def layers_of(self, pair: str) -> tuple[str, ...]:
        """The layer names of a pair: all for ``main``, ``cross_layers`` for the cross pairs."""
        return self.names if pair == "main" else self.cross_names

    def sides(self, x: Tensor, tb: TeacherBatch, name: str,
              teacher_embed: Tensor | None) -> tuple[Tensor, Tensor]:
        """Student states ``x [n, R_s, D_s]`` and the teacher's of layer ``name`` (rows of
        ``tb``), normalised and in the common space: ``([n, R_s, D], [n, R_t, D])``."""
        x = _rms_normalise(x.float())
        y = self.teacher_states(tb, name, teacher_embed).to(x.device)
        if self.maps is not None:
            return self.maps[self.names.index(name)](x), y
        return x, self.projector(y)

    def teacher_states(self, tb: TeacherBatch, name: str,
                       teacher_embed: Tensor | None) -> Tensor:
        """The teacher's states of layer ``name``, RMS-normalised float32 ``[n, R_t, D_t]``."""
        if name == "embedding":
            if teacher_embed is None:
                raise ValueError("the embedding layer's OT term needs teacher_embed (the "
                                 "teacher's input embedding matrix)")
            y = teacher_embed[tb.target_ids.to(teacher_embed.device).long()]
        else:
            y = tb.layer(self.teacher_index[name])
        return _rms_normalise(y.to(dtype=torch.float32))

    def reference_problem(self, sf: str, tf: str, teacher: Mapping[str, TeacherBatch],
                          name: str, teacher_embed: Tensor | None, *,
                          shift: int = 0) -> OTProblem | None:
        """The problems of a cross pair with the *teacher's* ``sf``-form states in place of the
        student's (no map): what the teacher's own representation gives (None if fewer than
        two rows have both forms). ``shift`` as in :meth:`problem`."""
        present = teacher[sf].present.bool()
        rows = torch.nonzero(present & teacher[tf].present.to(present.device).bool()).squeeze(1)
        if rows.numel() < 2:
            return None
        a = teacher[sf].select(rows)
        b = teacher[tf].select(rows.roll(-shift).to(teacher[tf].present.device))
        x = self.teacher_states(a, name, teacher_embed)
        y = self.teacher_states(b, name, teacher_embed).to(x.device)
        return self._problem(x, y, a.mask.to(x.device), b.mask.to(x.device), tf, cross=True)

    def _problem(self, x: Tensor, y: Tensor, x_mask: Tensor, y_mask: Tensor, tf: str, *,
                 cross: bool) -> OTProblem:
        """Both sides in the common space -> the problems (centring, cost, free marginal)."""
        if self.config.center:
            x, y = _centred(x, x_mask), _centred(y, y_mask)
        free = None
        if cross and self.config.cross_marginals == "relaxed_cot":
            free = "teacher" if tf == "cot" else "student"
        cost = pairwise_cost(x, y, self.config.cost, y_mask=y_mask.float())
        return OTProblem(cost, x_mask, y_mask, free)

    def problem(self, pair: str, sf: str, tf: str, run: StudentRun, tb: TeacherBatch,
                name: str, teacher_embed: Tensor | None, *, shift: int = 0) -> OTProblem | None:
        """The OT problems of one pair (student form ``sf``, teacher form ``tf``) and layer on
        the ``k`` rows that have both sides (None if none). ``shift`` pairs the ``i``-th such
        student with the teacher of the ``(i + shift) mod k``-th (a shuffled control)."""
        both = (run.slot >= 0) & tb.present.to(run.slot.device).bool()
        rows = torch.nonzero(both).squeeze(1)
        if rows.numel() == 0 or (shift and rows.numel() < 2):
            return None
        t_sel = tb.select(rows.roll(-shift).to(tb.present.device))
        s = run.slot[rows]
        x, y = self.sides(run.hidden[name][s], t_sel, name, teacher_embed)
        return self._problem(x, y, run.mask[s], t_sel.mask.to(x.device), tf,
                             cross=pair != "main")

    def solve(self, problems: list[OTProblem]) -> list[Tensor]:
        r"""Per-example transport costs :math:`\langle T^\star, C \rangle` of groups of
        problems (:meth:`problem`), ``[k_g]`` each, with uniform weights on the valid tokens.

        The balanced groups (all pairs, layers) go to one batched Sinkhorn call: their cost
        matrices are padded to a common size with zero-weight rows and columns, which
        :func:`~cot2align_core.ot.sinkhorn` ignores (each problem converges and is frozen on
        its own, so the values equal separate calls of
        :func:`~cot2align_core.ot.ot_alignment_loss`). Problems with a free side have a
        closed-form plan (:func:`one_sided_transport`)."""
        c = self.config
        out: list[Tensor | None] = [None] * len(problems)
        balanced = [i for i, p in enumerate(problems) if p.free is None]
        for i, p in enumerate(problems):
            if p.free is not None:
                out[i] = one_sided_transport(p.cost, p.student_mask, p.teacher_mask,
                                             free=p.free, eps=c.eps, grad=c.grad)
        if balanced:
            n = max(problems[i].cost.shape[1] for i in balanced)
            m = max(problems[i].cost.shape[2] for i in balanced)
            costs, a, b = [], [], []
            for i in balanced:
                p = problems[i]
                wa, wb = p.student_mask.float(), p.teacher_mask.float()
                costs.append(F.pad(p.cost, (0, m - p.cost.shape[2], 0, n - p.cost.shape[1])))
                a.append(F.pad(wa, (0, n - wa.shape[1])))
                b.append(F.pad(wb, (0, m - wb.shape[1])))
            res = sinkhorn(torch.cat(costs), torch.cat(a), torch.cat(b), eps=c.eps,
                           max_iter=c.max_iter, tol=c.tol, grad=c.grad)
            sizes = [problems[i].cost.shape[0] for i in balanced]
            for i, values in zip(balanced, res.value.split(sizes)):
                out[i] = values
        return out

    def combine(self, per_layer: Mapping[str, Tensor], terms: dict[str, float]) -> Tensor:
        """The weighted sum over layers of their (pair-weighted) OT sums."""
        total = None
        for i, name in enumerate(self.names):
            if name not in per_layer:
                continue
            value = per_layer[name]
            if self.log_vars is not None:
                s = self.log_vars[i]
                value = torch.exp(-s) * value + s
                terms[f"ot/weight/{name}"] = float(torch.exp(-s.detach()))
            total = value if total is None else total + value
        return total


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------


def _item(x: Tensor) -> float:
    return float(x.detach())


class CoT2AlignObjective(nn.Module):
    """``objective(model, student, teacher, teacher_embed, teacher_head) -> (loss, terms)``.

    Parameters
    ----------
    config : ObjectiveConfig
        The config's ``distill.objective`` (or a baseline's), consumed as is.
    student_dim : int
        Student hidden width ``D_s``.
    teacher_dim : int, optional
        Teacher hidden width ``D_t`` (needed when OT or DSKD is on).
    teacher_num_layers : int, optional
        Teacher depth (needed when an OT layer is a depth fraction).
    vocab_map : array-like of int, shape (V_t,), optional
        Teacher id -> student id (:func:`cot2align_core.mined.build_vocab_mapping`), needed by
        ``kd_base="mined"``.

    Learned parts (:meth:`projector_parameters`, their own learning-rate group): the KD base's
    (``kd.cma``, DSKD's cross-model attention) and the OT terms' (``ot``: :class:`OTAlignment`).
    """

    def __init__(self, config: ObjectiveConfig, *, student_dim: int,
                 teacher_dim: int | None = None, teacher_num_layers: int | None = None,
                 vocab_map=None):
        super().__init__()
        self.config = config
        if config.uses_ot and teacher_dim is None:
            raise ValueError("teacher_dim is needed for the OT maps (ot is set and alpha > 0)")
        self.kd = build_kd_base(config, student_dim=student_dim, teacher_dim=teacher_dim,
                                vocab_map=vocab_map)
        self.ot = (OTAlignment(config.ot, student_dim=student_dim, teacher_dim=teacher_dim,
                               teacher_num_layers=teacher_num_layers)
                   if config.uses_ot else None)
        self.student_layers = dict(self.ot.specs) if self.ot is not None else {}
        if self.kd is not None and self.kd.needs_hidden:
            self.student_layers.setdefault("last", "last")

    def projector_parameters(self) -> list[nn.Parameter]:
        """The objective's own parameters (OT maps, layer weights, DSKD's attention)."""
        return list(self.parameters())

    # ---------------------------------------------------------------- student
    def _run_student(self, model: nn.Module, sb: StudentBatch) -> StudentRun | None:
        present = sb.present.bool()
        rows = torch.nonzero(present).squeeze(1)
        if rows.numel() == 0:
            return None
        am = sb.attention_mask[rows]
        T = max(int(am.sum(1).max()), 1)  # right padding: drop columns that are padding everywhere
        ids, am, rm = sb.input_ids[rows, :T], am[:, :T], sb.response_mask[rows, :T]
        out = model(input_ids=ids, attention_mask=am,
                    output_hidden_states=bool(self.student_layers), use_cache=False)
        index, mask = response_positions(rm)
        target_ids = gather_positions(ids, (index + 1).clamp(max=T - 1), mask)
        hidden = {}
        for name, spec in self.student_layers.items():
            if spec == "embedding":  # the response tokens' own embeddings, no positions
                emb = model.get_input_embeddings()(target_ids)
                hidden[name] = emb * mask.unsqueeze(-1).to(emb.dtype)
            else:
                h = out.hidden_states[hidden_index(spec, len(out.hidden_states) - 1)]
                hidden[name] = gather_positions(h, index, mask)
        slot = torch.full((present.shape[0],), -1, dtype=torch.long, device=rows.device)
        slot[rows] = torch.arange(rows.numel(), device=rows.device)
        return StudentRun(rows=rows, slot=slot, mask=mask,
                          logits=gather_positions(out.logits, index, mask),
                          input_ids=gather_positions(ids, index, mask), target_ids=target_ids,
                          hidden=hidden)

    def _runs(self, model: nn.Module, student: Mapping[str, StudentBatch],
              teacher: Mapping[str, TeacherBatch] | None) -> dict[str, StudentRun]:
        """Check the inputs and run the student on each form that some row has."""
        unknown = set(student) - set(FORMS)
        if unknown:
            raise ValueError(f"unknown forms {sorted(unknown)}: expected some of {FORMS}")
        if (self.kd is not None or self.ot is not None) and not teacher:
            raise ValueError("alpha > 0 with a KD base or OT needs the teacher batches")
        for f, tb in (teacher or {}).items():
            sb = student.get(f)
            if sb is not None and not torch.equal(sb.present.bool().cpu(), tb.present.bool().cpu()):
                raise ValueError(f"student and teacher disagree on which examples have the {f!r} "
                                 "form (present)")
        runs = {f: r for f, sb in student.items() if (r := self._run_student(model, sb)) is not None}
        if not runs:
            raise ValueError("no example of the batch has any form present")
        return runs

    def _pairs(self, runs: Mapping[str, StudentRun], teacher: Mapping[str, TeacherBatch]):
        """(pair, weight, student form, teacher form) of every OT pair this batch has."""
        for pair, weight in self.config.ot.pairs.items():
            if weight > 0:
                for sf, tf in PAIRS[pair]:
                    if sf in runs and tf in teacher:
                        yield pair, weight, sf, tf

    # ---------------------------------------------------------------- loss parts
    def _kd_term(self, model, runs, student, teacher, teacher_embed, teacher_head,
                 terms: dict[str, float]) -> Tensor | None:
        total = None
        for f, run in runs.items():
            if f not in teacher:
                continue
            tb = teacher[f].select(run.rows.to(teacher[f].present.device))
            part, parts = self.kd(model, run, student[f], tb, teacher_embed, teacher_head)
            terms.update({f"kd/{f}/{k}": _item(v) for k, v in parts.items()})
            terms[f"kd/{f}"] = _item(part)
            total = part if total is None else total + part
        return total

    def _ot_term(self, runs, teacher, teacher_embed, terms: dict[str, float]) -> Tensor | None:
        keys, problems = [], []
        for pair, weight, sf, tf in self._pairs(runs, teacher):
            for name in self.ot.layers_of(pair):
                problem = self.ot.problem(pair, sf, tf, runs[sf], teacher[tf], name, teacher_embed)
                if problem is not None:
                    keys.append((f"ot/{pair}/{sf}-{tf}/{name}", weight, name))
                    problems.append(problem)
        if not problems:
            return None
        per_layer: dict[str, Tensor] = {}
        for (key, weight, name), values in zip(keys, self.ot.solve(problems)):
            value = values.mean()
            terms[key] = _item(value)
            per_layer[name] = weight * value + per_layer.get(name, 0.0)
        return self.ot.combine(per_layer, terms)

    # ---------------------------------------------------------------- forward
    def forward(self, student_model: nn.Module, student: Mapping[str, StudentBatch],
                teacher: Mapping[str, TeacherBatch] | None = None,
                teacher_embed: Tensor | None = None,
                teacher_head: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """Compute the loss of one batch.

        Parameters
        ----------
        student_model : a transformers causal LM (called with ``input_ids``,
            ``attention_mask``, ``output_hidden_states``, ``use_cache=False``).
        student : form -> StudentBatch (``"standard"`` and/or ``"cot"``), same batch rows.
        teacher : form -> TeacherBatch, or None when ``alpha = 0`` / nothing needs it.
        teacher_embed : Tensor, shape (V_t, D_t), optional
            Teacher input embedding matrix (embedding-layer OT, DSKD).
        teacher_head : Tensor, shape (V_t, D_t), optional
            Teacher LM head weight (DSKD; teacher logits when the cache has no top-k).

        Returns
        -------
        (loss, terms)
            ``loss`` a scalar tensor; ``terms`` floats: ``loss``, ``ce``, ``ce/<form>``,
            ``kd``, ``kd/<form>`` (and DSKD's parts ``kd/<form>/<part>``), ``ot``,
            ``ot/<pair>/<student form>-<teacher form>/<layer>`` (and ``ot/weight/<layer>``
            with uncertainty weighting).
        """
        c = self.config
        runs = self._runs(student_model, student, teacher)
        teacher = teacher or {}
        terms: dict[str, float] = {}
        ce_parts = {f: ce_at_positions(r.logits, r.target_ids, r.mask) for f, r in runs.items()}
        ce = sum(ce_parts.values())
        terms.update({f"ce/{f}": _item(v) for f, v in ce_parts.items()})
        kd = ot = None
        if self.kd is not None:
            kd = self._kd_term(student_model, runs, student, teacher, teacher_embed, teacher_head,
                               terms)
        if self.ot is not None:
            ot = self._ot_term(runs, teacher, teacher_embed, terms)
        loss = ce
        if c.alpha > 0:
            distill = ce * 0.0
            if kd is not None:
                distill = distill + c.kd_weight * kd
            if ot is not None:
                distill = distill + c.ot.weight * ot
            loss = (1 - c.alpha) * ce + c.alpha * distill
        terms.update(loss=_item(loss), ce=_item(ce), kd=0.0 if kd is None else _item(kd),
                     ot=0.0 if ot is None else _item(ot))
        return loss, terms

    # ---------------------------------------------------------------- inspection
    @torch.no_grad()
    def health(self, student_model: nn.Module, student: Mapping[str, StudentBatch],
               teacher: Mapping[str, TeacherBatch],
               teacher_embed: Tensor | None = None) -> dict[str, float]:
        """Does the OT term still carry teacher information? Measured on a probe batch.

        For every pair, student/teacher form combination and layer (``<key>`` =
        ``<pair>/<student form>-<teacher form>/<layer>``):

        - ``health/own/<key>``: mean OT cost against the example's own teacher;
        - ``health/shuffled/<key>``: the same against another example's teacher (the
          ``i``-th example with both sides against the ``(i+1)``-th);
        - ``health/ratio/<key>``: own / shuffled. Near 1: the term no longer tells the
          example's teacher from another (it has stopped carrying teacher information);
          aligned sequences score well below 1;
        - cross pairs only, ``health/reference/<key>``: the same ratio with the teacher's own
          states of the student's form in place of the student's (:meth:`OTAlignment.
          reference_problem`). The two forms are different texts (an answer against a
          rationale and an answer), so even the teacher's own ratio is far from 0 (on the
          demo, balanced: 0.82-0.86 for the embedding layer, 0.91-0.94 for the last): the
          level a cross term can be expected to reach.

        And per layer, ``health/spread/<layer>``: the mean cosine of the *mapped* states (the
        student's in the teacher space, the teacher's in the student space) to their
        centroid, over the valid positions of the main pairs; ``health/spread_fixed/<layer>``
        the same for the other side. Near 1: collapsed onto one direction.

        The model runs in eval mode (its mode is restored); nothing is trained. Returns {}
        when the objective has no OT term.
        """
        if self.ot is None:
            return {}
        was_training = student_model.training
        student_model.eval()
        try:
            runs = self._runs(student_model, student, teacher)
        finally:
            student_model.train(was_training)
        keys, problems = [], []
        for pair, _, sf, tf in self._pairs(runs, teacher):
            for name in self.ot.layers_of(pair):
                own = self.ot.problem(pair, sf, tf, runs[sf], teacher[tf], name, teacher_embed)
                other = self.ot.problem(pair, sf, tf, runs[sf], teacher[tf], name, teacher_embed,
                                        shift=1)
                if own is not None and other is not None:
                    keys.append(f"{pair}/{sf}-{tf}/{name}")
                    problems += [own, other]
                if sf != tf:
                    ref = [self.ot.reference_problem(sf, tf, teacher, name, teacher_embed,
                                                     shift=s) for s in (0, 1)]
                    if None not in ref:
                        keys.append(f"reference:{pair}/{sf}-{tf}/{name}")
                        problems += ref
        out: dict[str, float] = {}
        values = self.ot.solve(problems) if problems else []
        for i, key in enumerate(keys):
            own, other = float(values[2 * i].mean()), float(values[2 * i + 1].mean())
            if key.startswith("reference:"):
                out[f"health/reference/{key.removeprefix('reference:')}"] = own / max(other, 1e-12)
                continue
            out[f"health/own/{key}"] = own
            out[f"health/shuffled/{key}"] = other
            out[f"health/ratio/{key}"] = own / max(other, 1e-12)
        out.update(self._spreads(runs, teacher, teacher_embed))
        return out

    def _spreads(self, runs, teacher, teacher_embed) -> dict[str, float]:
        out = {}
        for name in self.ot.names:
            mapped, fixed = [], []
            for f, run in runs.items():
                if f not in teacher:
                    continue
                tb = teacher[f].select(run.rows.to(teacher[f].present.device))
                x, y = self.ot.sides(run.hidden[name], tb, name, teacher_embed)
                xs, ys = x[run.mask], y[tb.mask.to(y.device)]
                mapped.append(xs if self.ot.maps is not None else ys)
                fixed.append(ys if self.ot.maps is not None else xs)
            if mapped:
                out[f"health/spread/{name}"] = _spread(torch.cat(mapped))
                out[f"health/spread_fixed/{name}"] = _spread(torch.cat(fixed))
        return out

    @torch.no_grad()
    def transport_plan(self, student_model: nn.Module, student: StudentBatch,
                       teacher: TeacherBatch, *, layer: str = "last",
                       teacher_embed: Tensor | None = None) -> Tensor:
        """The OT plan ``[R_s, R_t]`` of the first batch row, as the loss computes it.

        For reports (a heatmap of which teacher tokens each student token is transported to).
        """
        if self.ot is None:
            raise ValueError("this objective has no OT term (objective.ot is null or alpha 0)")
        if layer not in self.ot.names:
            raise ValueError(f"layer {layer!r} is not an OT layer of this objective "
                             f"({list(self.ot.names)})")
        one = torch.zeros_like(student.present, dtype=torch.bool)
        one[0] = True
        run = self._run_student(student_model, replace(student, present=one))
        tb = teacher.select(torch.tensor([0], device=teacher.present.device))
        x, y = self.ot.sides(run.hidden[layer], tb, layer, teacher_embed)
        n, m = int(run.mask[0].sum()), int(tb.mask[0].sum())
        c = self.config.ot
        cost = pairwise_cost(x[0, :n], y[0, :m], c.cost)
        return sinkhorn(cost, eps=c.eps, max_iter=c.max_iter, tol=c.tol).plan
