r"""The KD bases CoT2Align is plugged into: one small strategy per base, chosen once.

Each base compares the student's outputs of one form at its response prediction positions
(:class:`~cot2align_core.batching.StudentRun`, ``n`` rows) with the cached teacher side of the
same rows (:class:`~cot2align_core.batching.TeacherBatch`) and returns ``(loss, parts)``:
a scalar and a dict of detached scalars to log (empty for the single-term bases).

===================  ==========================================================================
base                 loss (``cot2align_core.losses``, ``.dskd``, ``.mined``)
===================  ==========================================================================
``dskd``             DSKD with cross-model attention (:func:`~cot2align_core.dskd.dskd_loss`);
                     full teacher logits from its LM head
``uld``              ULD: sorted probability vectors, L1 (:func:`~cot2align_core.losses.uld_loss`)
``mined``            KL on positions aligned by minimum edit distance, teacher carried into the
                     student vocabulary (:func:`~cot2align_core.mined.mined_kd_loss`)
same vocabulary      a divergence between the ``r``-th response positions of both sides (one
                     tokenizer cuts one text alike): ``forward_kl``, ``reverse_kl``, ``js``,
                     ``skewed_*``, ``tvd`` (:func:`~cot2align_core.losses.kd_divergence`)
===================  ==========================================================================

Teacher logits: the cached top-k (renormalised over the top k at the KD temperature) when the
cache has them, else the exact full logits ``hidden[-1] @ teacher_head.T`` (the cached last
layer is the final-norm output that the LM head reads). DSKD always uses the full logits.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from cot2align_core.batching import LAST, StudentBatch, StudentRun, TeacherBatch
from cot2align_core.config import ObjectiveConfig
from cot2align_core.dskd import CrossModelAttention, dskd_loss
from cot2align_core.losses import kd_divergence, topk_kd_divergence, uld_loss
from cot2align_core.mined import mined_kd_loss

__all__ = ["KDBase", "DSKDBase", "ULDBase", "MinEDBase", "SameVocabularyKD", "build_kd_base",
           "teacher_logits"]


def teacher_logits(tb: TeacherBatch, teacher_head: Tensor | None, kd_base: str,
                   device) -> tuple[Tensor | None, Tensor]:
    """(ids or None for the full vocabulary, logits ``[n, R_t, k or V_t]``) of the teacher."""
    if tb.topk_logits is not None:
        return tb.topk_ids.to(device).long(), tb.topk_logits.to(device)
    if teacher_head is None:
        raise ValueError(
            f"kd_base {kd_base!r} needs teacher logits: cache the teacher's top-k logits "
            "(cache_teacher.topk) or give its LM head weight (teacher_head)"
        )
    h = tb.layer(LAST).to(device=device, dtype=torch.float32)
    return None, h @ teacher_head.to(device=device, dtype=torch.float32).transpose(0, 1)


class KDBase(nn.Module):
    """One KD loss between the student and the teacher on one form.

    ``needs_hidden``: the base reads the student's last hidden states (``run.hidden["last"]``).
    """

    needs_hidden = False

    def forward(self, model: nn.Module, run: StudentRun, sb: StudentBatch, tb: TeacherBatch,
                teacher_embed: Tensor | None,
                teacher_head: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


class DSKDBase(KDBase):
    """DSKD-CMA (Zhang et al. 2024); its cross-model attention ``cma`` is learned."""

    needs_hidden = True

    def __init__(self, student_dim: int, teacher_dim: int, *, temperature: float,
                 divergence: str, skew: float):
        super().__init__()
        self.cma = CrossModelAttention(student_dim, teacher_dim)
        self.temperature, self.divergence, self.skew = temperature, divergence, skew

    def forward(self, model, run, sb, tb, teacher_embed, teacher_head):
        if teacher_embed is None or teacher_head is None:
            raise ValueError("kd_base='dskd' needs teacher_embed and teacher_head")
        dev = run.logits.device
        _, t_logits = teacher_logits(replace(tb, topk_ids=None, topk_logits=None), teacher_head,
                                     "dskd", dev)
        return dskd_loss(
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
            teacher_head=teacher_head.to(dev), temperature=self.temperature,
            divergence=self.divergence, skew=self.skew,
        )


class ULDBase(KDBase):
    """ULD (Boizard et al. 2024): L1 between the sorted probability vectors."""

    def __init__(self, *, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, model, run, sb, tb, teacher_embed, teacher_head):
        dev = run.logits.device
        _, t_logits = teacher_logits(tb, teacher_head, "uld", dev)
        return uld_loss(run.logits, run.mask, t_logits, tb.mask.to(dev),
                        temperature=self.temperature), {}


class MinEDBase(KDBase):
    """MinED (Wan et al. 2024): KL on edit-distance-aligned positions; ``vocab_map`` carries
    teacher ids to student ids (a non-persistent buffer)."""

    def __init__(self, vocab_map, *, temperature: float):
        super().__init__()
        if vocab_map is None:
            raise ValueError("kd_base='mined' needs vocab_map (mined.build_vocab_mapping)")
        self.register_buffer("vocab_map", torch.as_tensor(vocab_map, dtype=torch.long),
                             persistent=False)
        self.temperature = temperature

    def forward(self, model, run, sb, tb, teacher_embed, teacher_head):
        if sb.mined_alignment is None:
            raise ValueError("kd_base='mined' needs StudentBatch.mined_alignment "
                             "(tokenize.mined_alignment)")
        dev = run.logits.device
        ids, t_logits = teacher_logits(tb, teacher_head, "mined", dev)
        R = run.mask.shape[1]
        al = sb.mined_alignment[run.rows.to(sb.mined_alignment.device)][:, :R].to(dev)
        if al.shape[1] < R:
            al = torch.cat([al, al.new_full((al.shape[0], R - al.shape[1]), -1)], 1)
        return mined_kd_loss(run.logits, run.mask, ids, t_logits, tb.mask.to(dev), al,
                             self.vocab_map, temperature=self.temperature), {}


class SameVocabularyKD(KDBase):
    """A divergence between the ``r``-th response positions of both sides (one vocabulary)."""

    def __init__(self, kind: str, *, temperature: float, skew: float):
        super().__init__()
        self.kind, self.temperature, self.skew = kind, temperature, skew

    def forward(self, model, run, sb, tb, teacher_embed, teacher_head):
        dev = run.logits.device
        ids, t_logits = teacher_logits(tb, teacher_head, self.kind, dev)
        t_mask = tb.mask.to(dev)
        R = min(run.mask.shape[1], t_mask.shape[1])
        pair = run.mask[:, :R] & t_mask[:, :R]
        kw = dict(kind=self.kind, temperature=self.temperature, skew=self.skew)
        if ids is not None:
            return topk_kd_divergence(run.logits[:, :R], ids[:, :R], t_logits[:, :R], pair,
                                      **kw), {}
        if t_logits.shape[-1] != run.logits.shape[-1]:
            raise ValueError(
                f"kd_base {self.kind!r} needs one vocabulary, but the teacher has "
                f"{t_logits.shape[-1]} logits and the student {run.logits.shape[-1]}"
            )
        return kd_divergence(run.logits[:, :R], t_logits[:, :R], pair, **kw), {}


def build_kd_base(config: ObjectiveConfig, *, student_dim: int, teacher_dim: int | None,
                  vocab_map=None) -> KDBase | None:
    """The KD base of ``config`` (None when it uses none: ``kd_base`` none, alpha or
    ``kd_weight`` 0)."""
    if not config.uses_kd:
        return None
    T, base = config.kd_temperature, config.kd_base
    if base == "dskd":
        if teacher_dim is None:
            raise ValueError("kd_base='dskd' needs teacher_dim (its cross-model attention)")
        return DSKDBase(student_dim, teacher_dim, temperature=T,
                        divergence=config.dskd_divergence, skew=config.skew)
    if base == "uld":
        return ULDBase(temperature=T)
    if base == "mined":
        return MinEDBase(vocab_map, temperature=T)
    return SameVocabularyKD(base, temperature=T, skew=config.skew)
