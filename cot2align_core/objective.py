r"""The CoT2Align training objective: CE + a cross-tokenizer KD base + cross-CoT OT alignment.

.. math::
    \mathcal{L} = (1 - \alpha)\, \mathrm{CE}
      + \alpha \Big( w_{kd}\, \mathrm{KD}_{base}
      + w_{ot} \sum_{p \in \text{pairs}} w_p \sum_{l \in \text{layers}}
        \mathrm{OT}\big(H^{p}_{s}[l],\ P(\bar H^{p}_{t}[l])\big) \Big)

Forms and pairs
---------------
Each example exists in the *standard* form (prompt -> answer) and, when the teacher wrote a
rationale, in the *cot* form (CoT prompt -> rationale + answer). The student is run once per
form, only on the rows that have it (``present``), with ``output_hidden_states``. Then:

- ``CE = sum_f CE_f``: response-token cross-entropy of each present form (a token mean over
  the form's rows, :func:`~cot2align_core.losses.response_ce`);
- ``KD_base = sum_f KD_f``: the token-level KD base of each form against the teacher on the
  *same* text (``uld``, ``mined``, ``dskd``, or a same-vocabulary divergence);
- OT pairs, each a mean over the examples that have both sides:

  ===========  =================  =================
  pair          student sequence   teacher sequence
  ===========  =================  =================
  ``main``      form f             form f (for each f; summed)
  ``cross_a``   standard           cot
  ``cross_b``   cot                standard
  ===========  =================  =================

  The cross pairs compare two different texts (an answer with a rationale + answer); OT needs
  no position correspondence, so their lengths may differ freely. An example without the cot
  form contributes to no pair that involves cot, and the student never runs on a sequence for
  it.

Layers: ``"embedding"`` compares the student's ``hidden_states[0]`` (embedding output) with
the teacher's token embeddings ``teacher_embed[input_ids]`` (not cached per example);
``"last"`` compares ``hidden_states[-1]`` with the cached teacher layer ``-1``. Teacher
representations are RMS-normalised per token (their scale differs by orders of magnitude
between layers) and mapped to the student width by one learned ``nn.Linear`` :math:`P` shared
by all layers; the OT cost normalises both sides again (``cot2align_core.ot``).

Teacher logits (logit-based KD bases): the cached top-k (renormalised over the top k at the
KD temperature, ``cot2align_core.losses``) when the cache has them, else exact full logits
``hidden[-1] @ teacher_head.T`` (the cached last layer is the final-norm output that the LM
head reads). DSKD always uses the full logits from ``teacher_head``, which it needs anyway.
Same-vocabulary KD pairs the ``r``-th response positions of both sides (one tokenizer cuts
one text alike).

All positions are response prediction positions (``cot2align_core.losses``).

With ``alpha = 0`` the objective is plain SFT (``CE``); the teacher inputs may then be None.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from cot2align_core.dskd import CrossModelAttention, dskd_loss
from cot2align_core.losses import (KD_KINDS, ce_at_positions, gather_positions, kd_divergence,
                                   response_positions, topk_kd_divergence, uld_loss)
from cot2align_core.mined import mined_kd_loss
from cot2align_core.ot import DEFAULT_EPS, ot_alignment_loss, pairwise_cost, sinkhorn

__all__ = [
    "FORMS",
    "PAIRS",
    "OT_LAYERS",
    "KD_BASES",
    "TeacherBatch",
    "StudentBatch",
    "OTSettings",
    "ObjectiveWeights",
    "CoT2AlignObjective",
]

FORMS = ("standard", "cot")
#: pair name -> (student form, teacher form) combinations.
PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "main": (("standard", "standard"), ("cot", "cot")),
    "cross_a": (("standard", "cot"),),
    "cross_b": (("cot", "standard"),),
}
OT_LAYERS = ("embedding", "last")
KD_BASES = ("none", "dskd", "uld", "mined") + KD_KINDS
LAST = -1  # HF hidden_states index of the last layer, as the teacher cache names it


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def _left_packed(mask: Tensor) -> bool:
    m = mask.bool()
    return not bool((m[:, 1:] & ~m[:, :-1]).any()) if m.shape[1] > 1 else True


@dataclass
class TeacherBatch:
    """Cached teacher side of one form, at the teacher's response prediction positions.

    Attributes
    ----------
    hidden : Tensor, shape (B, L, R_t, D_t)
        Cached layers (float16/bfloat16/float32), named by ``layers``.
    mask : BoolTensor, shape (B, R_t)
        Valid positions, packed left (entry ``r`` predicts the ``r``-th response token).
    input_ids : LongTensor, shape (B, R_t)
        Teacher token at each position (its embedding is ``teacher_embed[input_ids]``).
    target_ids : LongTensor, shape (B, R_t)
        The response token predicted at each position.
    present : BoolTensor, shape (B,)
        The example has this form.
    topk_ids, topk_logits : Tensor, shape (B, R_t, k), optional
        Raw teacher logits of its top-k vocabulary entries.
    layers : tuple of int
        HF ``hidden_states`` index of each cached layer along dim 1; ``-1`` is the last layer.
    """

    hidden: Tensor
    mask: Tensor
    input_ids: Tensor
    target_ids: Tensor
    present: Tensor
    topk_ids: Tensor | None = None
    topk_logits: Tensor | None = None
    layers: tuple[int, ...] = (LAST,)

    def __post_init__(self):
        if self.hidden.dim() != 4:
            raise ValueError("TeacherBatch.hidden must be [B, L, R_t, D_t], got "
                             f"{list(self.hidden.shape)}")
        B, L, R, _ = self.hidden.shape
        for name in ("mask", "input_ids", "target_ids"):
            if tuple(getattr(self, name).shape) != (B, R):
                raise ValueError(f"TeacherBatch.{name} must be [B, R_t] = {[B, R]}, got "
                                 f"{list(getattr(self, name).shape)}")
        if tuple(self.present.shape) != (B,):
            raise ValueError(f"TeacherBatch.present must be [B] = [{B}], got "
                             f"{list(self.present.shape)}")
        if len(self.layers) != L:
            raise ValueError(f"TeacherBatch.layers names {len(self.layers)} layers, hidden has {L}")
        if (self.topk_ids is None) != (self.topk_logits is None):
            raise ValueError("TeacherBatch: give both topk_ids and topk_logits, or neither")
        if self.topk_ids is not None and (self.topk_ids.shape != self.topk_logits.shape
                                          or tuple(self.topk_ids.shape[:2]) != (B, R)):
            raise ValueError(
                f"TeacherBatch.topk_ids/topk_logits must both be [B, R_t, k] with [B, R_t] = "
                f"{[B, R]}, got {list(self.topk_ids.shape)} and {list(self.topk_logits.shape)}"
            )
        if not _left_packed(self.mask):
            raise ValueError("TeacherBatch.mask must be packed left (valid positions first, "
                             "in order)")

    def select(self, rows: Tensor) -> "TeacherBatch":
        """The given rows, with ``R_t`` trimmed to their longest response."""
        mask = self.mask[rows].bool()
        R = int(mask.sum(1).max()) if mask.numel() else 0
        R = max(R, 1)
        pick = lambda x: None if x is None else x[rows][:, :R]  # noqa: E731
        return replace(self, hidden=self.hidden[rows][:, :, :R], mask=mask[:, :R],
                       input_ids=pick(self.input_ids), target_ids=pick(self.target_ids),
                       present=self.present[rows], topk_ids=pick(self.topk_ids),
                       topk_logits=pick(self.topk_logits))

    def layer(self, layer_id: int) -> Tensor:
        """``[B, R_t, D_t]`` states of one cached layer (HF index, ``-1`` = last)."""
        if layer_id not in self.layers:
            raise ValueError(
                f"teacher layer {layer_id} is not cached (cached: {list(self.layers)}); add it to "
                "cache_teacher.layers"
            )
        return self.hidden[:, self.layers.index(layer_id)]


@dataclass
class StudentBatch:
    """Student side of one form (all rows of the batch; rows without the form are ignored).

    Attributes
    ----------
    input_ids, attention_mask, response_mask : Tensor, shape (B, T)
        Right-padded sequences; ``response_mask`` 1 on response tokens (incl. EOS).
    present : BoolTensor, shape (B,)
    mined_alignment : LongTensor, shape (B, R_s), optional
        For ``kd_base="mined"``: index into the teacher's ``R_t`` positions of this form for
        each student response prediction position, -1 where none
        (:func:`cot2align_core.mined.alignment_tensor`).
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    present: Tensor
    mined_alignment: Tensor | None = None

    def __post_init__(self):
        if self.input_ids.dim() != 2:
            raise ValueError("StudentBatch.input_ids must be [B, T], got "
                             f"{list(self.input_ids.shape)}")
        B, T = self.input_ids.shape
        for name in ("attention_mask", "response_mask"):
            if tuple(getattr(self, name).shape) != (B, T):
                raise ValueError(f"StudentBatch.{name} must be [B, T] = {[B, T]}, got "
                                 f"{list(getattr(self, name).shape)}")
        if tuple(self.present.shape) != (B,):
            raise ValueError(f"StudentBatch.present must be [B] = [{B}], got "
                             f"{list(self.present.shape)}")
        if self.mined_alignment is not None and (self.mined_alignment.dim() != 2
                                                 or self.mined_alignment.shape[0] != B):
            raise ValueError(f"StudentBatch.mined_alignment must be [B, R_s], got "
                             f"{list(self.mined_alignment.shape)}")


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass
class OTSettings:
    """The OT alignment terms. ``None`` fields take ``cot2align_core.ot``'s defaults.

    ``pairs``: pair name (``main``, ``cross_a``, ``cross_b``) -> weight; ``layers``: subset of
    ``("embedding", "last")``; ``weight``: factor on the whole OT sum.
    """

    cost: str = "cosine"
    eps: float | None = None
    max_iter: int | None = None
    tol: float | None = None
    grad: str = "envelope"
    layers: tuple[str, ...] = OT_LAYERS
    pairs: Mapping[str, float] = field(
        default_factory=lambda: {"main": 1.0, "cross_a": 1.0, "cross_b": 1.0})
    weight: float = 1.0

    def __post_init__(self):
        self.layers = tuple(self.layers)
        self.pairs = dict(self.pairs)
        bad = [x for x in self.layers if x not in OT_LAYERS]
        if bad or not self.layers:
            raise ValueError(f"OT layers must be a non-empty subset of {OT_LAYERS}, got "
                             f"{list(self.layers)}")
        bad = [p for p in self.pairs if p not in PAIRS]
        if bad:
            raise ValueError(f"unknown OT pairs {bad}: expected some of {list(PAIRS)}")
        if any(w < 0 for w in self.pairs.values()) or self.weight < 0:
            raise ValueError("OT weights must be >= 0")


@dataclass
class ObjectiveWeights:
    """Weights and settings of :class:`CoT2AlignObjective` (the config's ``objective`` section).

    Attributes
    ----------
    alpha : float
        Distillation share: ``(1 - alpha) CE + alpha (...)``.
    kd_base : str
        One of :data:`KD_BASES`: ``none``, ``dskd``, ``uld``, ``mined``, or a same-vocabulary
        divergence (``forward_kl``, ``reverse_kl``, ``js``, ``skewed_forward_kl``,
        ``skewed_reverse_kl``, ``tvd``).
    kd_temperature : float
        Temperature of every KD base (no :math:`T^2` factor).
    kd_weight : float
        Factor on ``KD_base``.
    skew : float
        :math:`\\lambda` of the skewed divergences.
    dskd_divergence : str
        Divergence of DSKD's ``t2s_kd`` term.
    ot : OTSettings or None
        None: no OT term (the KD base alone).
    """

    alpha: float = 0.5
    kd_base: str = "none"
    kd_temperature: float = 2.0
    kd_weight: float = 1.0
    skew: float = 0.1
    dskd_divergence: str = "forward_kl"
    ot: OTSettings | None = field(default_factory=OTSettings)

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if self.kd_base not in KD_BASES:
            raise ValueError(f"kd_base must be one of {KD_BASES}, got {self.kd_base!r}")
        if self.dskd_divergence not in KD_KINDS:
            raise ValueError(f"dskd_divergence must be one of {KD_KINDS}, got "
                             f"{self.dskd_divergence!r}")
        if not self.kd_temperature > 0:
            raise ValueError(f"kd_temperature must be > 0, got {self.kd_temperature!r}")

    @property
    def uses_ot(self) -> bool:
        return (self.alpha > 0 and self.ot is not None and self.ot.weight > 0
                and any(w > 0 for w in self.ot.pairs.values()))

    @property
    def uses_kd(self) -> bool:
        return self.alpha > 0 and self.kd_base != "none" and self.kd_weight > 0


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------


@dataclass
class _StudentRun:
    """Student outputs of one form at its response prediction positions (``n`` present rows)."""

    rows: Tensor  # [n] batch rows that have the form
    slot: Tensor  # [B] position of each batch row in ``rows``, -1 if absent
    mask: Tensor  # [n, R] bool
    logits: Tensor  # [n, R, V]
    input_ids: Tensor  # [n, R]
    target_ids: Tensor  # [n, R]
    hidden: dict[str, Tensor]  # "embedding" / "last" -> [n, R, D_s]


def _item(x) -> float:
    return float(x.detach()) if isinstance(x, Tensor) else float(x)


def _rms_normalise(x: Tensor) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).clamp_min(1e-12))


class CoT2AlignObjective(nn.Module):
    """``forward(student_model, student, teacher, teacher_embed, teacher_head) -> (loss, terms)``.

    Parameters
    ----------
    weights : ObjectiveWeights
    student_dim : int
        Student hidden width ``D_s``.
    teacher_dim : int, optional
        Teacher hidden width ``D_t`` (needed when OT or DSKD is on).
    vocab_map : array-like of int, shape (V_t,), optional
        Teacher id -> student id (:func:`cot2align_core.mined.build_vocab_mapping`), needed by
        ``kd_base="mined"``; kept as a non-persistent buffer.

    Learned parts (:meth:`projector_parameters`, their own learning-rate group): the OT
    projector ``projector: nn.Linear(D_t -> D_s)`` shared by the layers, and DSKD's
    ``cma: CrossModelAttention``.
    """

    def __init__(self, weights: ObjectiveWeights, *, student_dim: int,
                 teacher_dim: int | None = None, vocab_map=None):
        super().__init__()
        self.weights = weights
        self.student_dim = int(student_dim)
        self.teacher_dim = None if teacher_dim is None else int(teacher_dim)
        needs_teacher_dim = weights.uses_ot or (weights.uses_kd and weights.kd_base == "dskd")
        if needs_teacher_dim and self.teacher_dim is None:
            raise ValueError("teacher_dim is needed for the OT projector / DSKD's attention")
        self.projector = nn.Linear(self.teacher_dim, self.student_dim) if weights.uses_ot else None
        self.cma = (CrossModelAttention(self.student_dim, self.teacher_dim)
                    if weights.uses_kd and weights.kd_base == "dskd" else None)
        if weights.uses_kd and weights.kd_base == "mined":
            if vocab_map is None:
                raise ValueError("kd_base='mined' needs vocab_map (build_vocab_mapping)")
            self.register_buffer("vocab_map", torch.as_tensor(vocab_map, dtype=torch.long),
                                 persistent=False)
        else:
            self.vocab_map = None

    def projector_parameters(self) -> list[nn.Parameter]:
        """Parameters of the OT projector and DSKD's attention (their own lr group)."""
        params: list[nn.Parameter] = []
        for m in (self.projector, self.cma):
            if m is not None:
                params.extend(m.parameters())
        return params

    # ---------------------------------------------------------------- student
    def _run_student(self, model: nn.Module, sb: StudentBatch,
                     need_hidden: bool) -> _StudentRun | None:
        present = sb.present.bool()
        rows = torch.nonzero(present).squeeze(1)
        if rows.numel() == 0:
            return None
        am = sb.attention_mask[rows]
        T = max(int(am.sum(1).max()), 1)  # right padding: drop columns that are padding everywhere
        ids, am, rm = sb.input_ids[rows, :T], am[:, :T], sb.response_mask[rows, :T]
        out = model(input_ids=ids, attention_mask=am, output_hidden_states=need_hidden,
                    use_cache=False)
        index, mask = response_positions(rm)
        nxt = (index + 1).clamp(max=T - 1)
        slot = torch.full((present.shape[0],), -1, dtype=torch.long, device=rows.device)
        slot[rows] = torch.arange(rows.numel(), device=rows.device)
        hidden = {}
        if need_hidden:
            hidden = {"embedding": gather_positions(out.hidden_states[0], index, mask),
                      "last": gather_positions(out.hidden_states[-1], index, mask)}
        return _StudentRun(
            rows=rows, slot=slot, mask=mask,
            logits=gather_positions(out.logits, index, mask),
            input_ids=gather_positions(ids, index, mask),
            target_ids=gather_positions(ids, nxt, mask),
            hidden=hidden,
        )

    # ---------------------------------------------------------------- teacher
    @staticmethod
    def _teacher_logits(tb: TeacherBatch, teacher_head: Tensor | None, kd_base: str,
                        device) -> tuple[Tensor | None, Tensor]:
        """(ids or None for the full vocabulary, logits [n, R_t, k or V_t]) of the teacher."""
        if tb.topk_logits is not None:
            return tb.topk_ids.to(device).long(), tb.topk_logits.to(device)
        if teacher_head is None:
            raise ValueError(
                f"kd_base {kd_base!r} needs teacher logits: cache the teacher's top-k logits "
                "(cache_teacher.topk) or give its LM head weight (teacher_head)"
            )
        h = tb.layer(LAST).to(device=device, dtype=torch.float32)
        return None, h @ teacher_head.to(device=device, dtype=torch.float32).transpose(0, 1)

    def _teacher_repr(self, tb: TeacherBatch, layer: str, teacher_embed: Tensor | None,
                      device) -> Tensor:
        """Teacher states of one layer, RMS-normalised and projected: [n, R_t, D_s]."""
        if layer == "last":
            h = tb.layer(LAST)
        else:
            if teacher_embed is None:
                raise ValueError("the embedding layer's OT term needs teacher_embed (the "
                                 "teacher's input embedding matrix)")
            h = teacher_embed[tb.input_ids.to(teacher_embed.device).long()]
        h = h.to(device=device, dtype=self.projector.weight.dtype)
        return self.projector(_rms_normalise(h))

    # ---------------------------------------------------------------- loss parts
    def _kd(self, model, form: str, run: _StudentRun, sb: StudentBatch, tb: TeacherBatch,
            teacher_embed, teacher_head, terms: dict[str, float]) -> Tensor:
        w = self.weights
        kind, T = w.kd_base, w.kd_temperature
        dev = run.logits.device
        if kind == "dskd":
            if teacher_embed is None or teacher_head is None:
                raise ValueError("kd_base='dskd' needs teacher_embed and teacher_head")
            ids, t_logits = self._teacher_logits(replace(tb, topk_ids=None, topk_logits=None),
                                                 teacher_head, kind, dev)
            loss, parts = dskd_loss(
                self.cma,
                student_logits=run.logits, student_hidden=run.hidden["last"],
                student_input_ids=run.input_ids, student_target_ids=run.target_ids,
                student_mask=run.mask,
                student_embed=model.get_input_embeddings().weight,
                student_head=model.get_output_embeddings().weight,
                teacher_hidden=tb.layer(LAST).to(dev),
                teacher_input_ids=tb.input_ids.to(dev).long(),
                teacher_target_ids=tb.target_ids.to(dev).long(), teacher_mask=tb.mask.to(dev),
                teacher_embed=teacher_embed.to(dev), teacher_logits=t_logits,
                teacher_head=teacher_head.to(dev), temperature=T, divergence=w.dskd_divergence,
                skew=w.skew,
            )
            for k, v in parts.items():
                terms[f"kd/{form}/{k}"] = _item(v)
            return loss
        ids, t_logits = self._teacher_logits(tb, teacher_head, kind, dev)
        t_mask = tb.mask.to(dev)
        if kind == "uld":
            return uld_loss(run.logits, run.mask, t_logits, t_mask, temperature=T)
        if kind == "mined":
            if sb.mined_alignment is None:
                raise ValueError("kd_base='mined' needs StudentBatch.mined_alignment "
                                 "(tokenize.mined_alignment)")
            R = run.mask.shape[1]
            al = sb.mined_alignment[run.rows.to(sb.mined_alignment.device)][:, :R].to(dev)
            if al.shape[1] < R:
                al = torch.cat([al, al.new_full((al.shape[0], R - al.shape[1]), -1)], 1)
            return mined_kd_loss(run.logits, run.mask, ids, t_logits, t_mask, al,
                                 self.vocab_map, temperature=T)
        # Same vocabulary: one tokenizer, so the r-th positions of both sides predict the same
        # token; pair them by rank over the common length.
        R = min(run.mask.shape[1], t_mask.shape[1])
        pair = run.mask[:, :R] & t_mask[:, :R]
        if ids is None:
            if t_logits.shape[-1] != run.logits.shape[-1]:
                raise ValueError(
                    f"kd_base {kind!r} needs one vocabulary, but the teacher has "
                    f"{t_logits.shape[-1]} logits and the student {run.logits.shape[-1]}"
                )
            return kd_divergence(run.logits[:, :R], t_logits[:, :R], pair, kind=kind,
                                 temperature=T, skew=w.skew)
        return topk_kd_divergence(run.logits[:, :R], ids[:, :R], t_logits[:, :R], pair,
                                  kind=kind, temperature=T, skew=w.skew)

    def _ot_pair(self, run: _StudentRun, tb: TeacherBatch, layer: str,
                 teacher_embed) -> Tensor | None:
        rows = torch.nonzero((run.slot >= 0) & tb.present.to(run.slot.device).bool()).squeeze(1)
        if rows.numel() == 0:
            return None
        t_sel = tb.select(rows.to(tb.present.device))
        s = run.slot[rows]
        dev = run.logits.device
        x = run.hidden[layer][s].float()
        y = self._teacher_repr(t_sel, layer, teacher_embed, dev)
        o = self.weights.ot
        kwargs = {k: v for k, v in (("eps", o.eps), ("max_iter", o.max_iter), ("tol", o.tol))
                  if v is not None}
        return ot_alignment_loss(x, y, run.mask[s], t_sel.mask.to(dev), cost=o.cost,
                                 grad=o.grad, reduction="mean", **kwargs)

    # ---------------------------------------------------------------- inspection
    @torch.no_grad()
    def transport_plan(self, student_model: nn.Module, student: StudentBatch,
                       teacher: TeacherBatch, *, layer: str = "last",
                       teacher_embed: Tensor | None = None) -> Tensor:
        """The OT plan [R_s, R_t] of the first batch row, as the loss computes it.

        The student is run on the row, its states at the response prediction positions are
        compared with the teacher's projected states by the configured cost, and Sinkhorn
        solves the problem with the configured regularisation. For reports (a heatmap of which
        teacher tokens each student token is transported to)."""
        if self.projector is None:
            raise ValueError("this objective has no OT term (weights.ot is None)")
        one = torch.zeros_like(student.present, dtype=torch.bool)
        one[0] = True
        sb = replace(student, present=one)
        run = self._run_student(student_model, sb, need_hidden=True)
        x = run.hidden[layer][0].float()
        n = int(run.mask[0].sum())
        tb = teacher.select(torch.tensor([0], device=teacher.present.device))
        y = self._teacher_repr(tb, layer, teacher_embed, x.device)[0]
        m = int(tb.mask[0].sum())
        o = self.weights.ot
        cost = pairwise_cost(x[:n], y[:m], o.cost)
        kwargs = {k: v for k, v in (("eps", o.eps), ("max_iter", o.max_iter), ("tol", o.tol))
                  if v is not None}
        kwargs.setdefault("eps", DEFAULT_EPS)
        return sinkhorn(cost, **kwargs).plan

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
            ``ot/<pair>/<student form>-<teacher form>/<layer>``.
        """
        w = self.weights
        unknown = set(student) - set(FORMS)
        if unknown:
            raise ValueError(f"unknown forms {sorted(unknown)}: expected some of {FORMS}")
        need_teacher = w.uses_kd or w.uses_ot
        if need_teacher and not teacher:
            raise ValueError("alpha > 0 with a KD base or OT needs the teacher batches")
        teacher = teacher or {}
        for f, tb in teacher.items():
            sb = student.get(f)
            if sb is not None and not torch.equal(sb.present.bool().cpu(), tb.present.bool().cpu()):
                raise ValueError(f"student and teacher disagree on which examples have the {f!r} "
                                 "form (present)")
        need_hidden = w.uses_ot or (w.uses_kd and w.kd_base == "dskd")
        runs = {f: r for f, sb in student.items()
                if (r := self._run_student(student_model, sb, need_hidden)) is not None}
        if not runs:
            raise ValueError("no example of the batch has any form present")
        terms: dict[str, float] = {}
        ce_parts = {f: ce_at_positions(r.logits, r.target_ids, r.mask) for f, r in runs.items()}
        ce = sum(ce_parts.values())
        terms.update({f"ce/{f}": _item(v) for f, v in ce_parts.items()})
        zero = ce * 0.0
        kd, ot = zero, zero
        if w.uses_kd:
            for f, r in runs.items():
                if f not in teacher:
                    continue
                rows = r.rows.to(teacher[f].present.device)
                part = self._kd(student_model, f, r, student[f], teacher[f].select(rows),
                                teacher_embed, teacher_head, terms)
                terms[f"kd/{f}"] = _item(part)
                kd = kd + part
        if w.uses_ot:
            for pair, pw in w.ot.pairs.items():
                if pw <= 0:
                    continue
                for sf, tf in PAIRS[pair]:
                    if sf not in runs or tf not in teacher:
                        continue
                    for layer in w.ot.layers:
                        val = self._ot_pair(runs[sf], teacher[tf], layer, teacher_embed)
                        if val is None:
                            continue
                        terms[f"ot/{pair}/{sf}-{tf}/{layer}"] = _item(val)
                        ot = ot + pw * val
        if w.alpha == 0:
            loss = ce
        else:
            ot_w = w.ot.weight if w.ot is not None else 0.0
            loss = (1 - w.alpha) * ce + w.alpha * (w.kd_weight * kd + ot_w * ot)
        terms.update(loss=_item(loss), ce=_item(ce), kd=_item(kd), ot=_item(ot))
        return loss, terms
