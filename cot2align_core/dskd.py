r"""DSKD with cross-model attention (Zhang et al. 2024), for different vocabularies.

Dual-space KD distils in both output spaces: the teacher's hidden states are carried into the
student's space and read by the *student's* LM head, and the student's hidden states are
carried into the teacher's space and read by the *teacher's* head. With different tokenizers
the two sequences have no fixed position correspondence, so a cross-model attention (CMA)
aligns them, from the tokens themselves:

- query (student position ``r``): :math:`q_r = W_q [e^s(x_r); e^s(y_r)]` from the student's
  (detached) embeddings of its input token ``x_r`` and of the target token ``y_r`` it predicts;
- key (teacher position ``u``): :math:`k_u = [e^t(x'_u); e^t(y'_u)] / \sigma_k`, the teacher's
  embeddings of its input and target tokens, normalised by their standard deviation;
- attention :math:`A = \mathrm{softmax}_u(q k^\top / \sqrt{2 D_t})` over the valid
  (response) positions, shape ``[B, R_s, R_t]``.

Teacher -> student (t2s): values :math:`v_u = W_{t2s}(h^t_u / \sigma_h + e^t(y'_u) / \sigma_e)`,
:math:`\tilde h^{t \to s} = A v`, logits :math:`z^{t \to s} = \tilde h^{t \to s} W_{head,s}^\top`
(student head, detached). Losses:

- ``t2s_ce``: cross-entropy of :math:`z^{t \to s}` on the student's targets (trains the
  projections so that the carried teacher states predict the student's tokens);
- ``t2s_kd``: :math:`D(z^{t \to s} \| z^s)` (``divergence``, forward KL by default, at
  temperature ``T``), teacher side detached, on the positions where
  :math:`\arg\max z^{t \to s}` is the target (where the carried teacher is right).

Student -> teacher (s2t): :math:`\tilde h^{s \to t} = A^\top_{\text{softmax over } r} W_{s2t} h^s`
(the transposed scores, softmax over the student positions), logits
:math:`z^{s \to t} = \tilde h^{s \to t} W_{head,t}^\top` (teacher head, a given tensor), loss

- ``s2t_kd``: :math:`\mathrm{KL}(\mathrm{softmax}(z^t / T) \| \mathrm{softmax}(z^{s \to t} / T))`
  on the teacher's valid positions, with the teacher's own logits :math:`z^t`.

Total: ``t2s_ce + t2s_kd + s2t_kd``. Reductions, as in the authors' code, where every term is
a sum divided by the batch's number of *student* target tokens ``n_s``: ``t2s_ce`` is a mean
over the valid student positions; ``t2s_kd`` a sum over the valid-and-correct student
positions over ``n_s``; ``s2t_kd`` a sum over the valid *teacher* positions over ``n_s`` (so a
teacher that cuts the text into more tokens than the student weighs this term up by
``n_t / n_s``). No :math:`T^2` factor.

Differences from the authors' code: standard deviations are taken over the valid (response)
positions only, not over the padding; the cache gives the teacher states at its own prediction
positions, with its input/target token ids, and the teacher's embedding matrix and LM head as
tensors (no teacher forward pass). With a top-k teacher cache, ``s2t_kd`` compares the two
distributions renormalised over the teacher's top-k ids (see ``cot2align_core.losses``).

References
----------
.. [1] S. Zhang, X. Zhang, Z. Sun, Y. Chen, J. Xu. Dual-Space Knowledge Distillation for Large
   Language Models. EMNLP 2024. https://github.com/songmzhang/DSKD
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cot2align_core.losses import ce_at_positions, kd_divergence_per_position

__all__ = ["CrossModelAttention", "CMAOutput", "dskd_loss"]


def _masked_std(x: Tensor, mask: Tensor) -> Tensor:
    """Standard deviation of all entries of ``x [B, R, D]`` at the ``mask [B, R]`` positions."""
    sel = x[mask]
    if sel.numel() < 2:
        return torch.ones((), dtype=x.dtype, device=x.device)
    return sel.std().clamp_min(1e-6)


@dataclass
class CMAOutput:
    """Result of :class:`CrossModelAttention`.

    Attributes
    ----------
    t2s_hidden : Tensor, shape (B, R_s, D_s)
        Teacher states carried to the student positions, in the student's space.
    s2t_hidden : Tensor, shape (B, R_t, D_t)
        Student states carried to the teacher positions, in the teacher's space.
    scores : Tensor, shape (B, R_s, R_t)
        Attention logits (invalid pairs set to the dtype's minimum).
    """

    t2s_hidden: Tensor
    s2t_hidden: Tensor
    scores: Tensor


class CrossModelAttention(nn.Module):
    """The three learned projections of DSKD-CMA and the attention between the two sequences.

    Parameters
    ----------
    student_dim, teacher_dim : int
        Hidden widths ``D_s`` and ``D_t``.

    Attributes
    ----------
    query : nn.Linear(2 D_s -> 2 D_t)
        From the student's [input; target] embeddings to the teacher's key space.
    t2s : nn.Linear(D_t -> D_s)
        Teacher values into the student space.
    s2t : nn.Linear(D_s -> D_t)
        Student hidden states into the teacher space.
    """

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.student_dim, self.teacher_dim = int(student_dim), int(teacher_dim)
        self.query = nn.Linear(2 * self.student_dim, 2 * self.teacher_dim)
        self.t2s = nn.Linear(self.teacher_dim, self.student_dim)
        self.s2t = nn.Linear(self.student_dim, self.teacher_dim)

    def forward(self, *, student_hidden: Tensor, student_input_embeds: Tensor,
                student_target_embeds: Tensor, student_mask: Tensor, teacher_hidden: Tensor,
                teacher_input_embeds: Tensor, teacher_target_embeds: Tensor,
                teacher_mask: Tensor) -> CMAOutput:
        """Align the two sequences and carry each side's states into the other's space.

        Parameters
        ----------
        student_hidden : Tensor, shape (B, R_s, D_s)
            Student last-layer states at its prediction positions (gradient flows).
        student_input_embeds, student_target_embeds : Tensor, shape (B, R_s, D_s)
            Student token embeddings of the input token and of the predicted token at each
            position (the caller detaches them, as DSKD does).
        student_mask : BoolTensor, shape (B, R_s)
        teacher_hidden : Tensor, shape (B, R_t, D_t)
            Teacher last-layer states at its prediction positions (no gradient).
        teacher_input_embeds, teacher_target_embeds : Tensor, shape (B, R_t, D_t)
        teacher_mask : BoolTensor, shape (B, R_t)
        """
        B, R_s, D_s = student_hidden.shape
        _, R_t, D_t = teacher_hidden.shape
        if D_s != self.student_dim or D_t != self.teacher_dim:
            raise ValueError(
                f"hidden widths (student {D_s}, teacher {D_t}) differ from the module's "
                f"(student {self.student_dim}, teacher {self.teacher_dim})"
            )
        for name, x, shape in (
            ("student_input_embeds", student_input_embeds, (B, R_s, D_s)),
            ("student_target_embeds", student_target_embeds, (B, R_s, D_s)),
            ("student_mask", student_mask, (B, R_s)),
            ("teacher_hidden", teacher_hidden, (B, R_t, D_t)),
            ("teacher_input_embeds", teacher_input_embeds, (B, R_t, D_t)),
            ("teacher_target_embeds", teacher_target_embeds, (B, R_t, D_t)),
            ("teacher_mask", teacher_mask, (B, R_t)),
        ):
            if tuple(x.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
        wd = self.query.weight.dtype
        s_mask, t_mask = student_mask.bool(), teacher_mask.bool()
        t_index = torch.cat([teacher_input_embeds, teacher_target_embeds], -1).to(wd)
        t_target = teacher_target_embeds.to(wd)
        t_hidden = teacher_hidden.to(wd)
        keys = t_index / _masked_std(t_index, t_mask)
        values = self.t2s(t_hidden / _masked_std(t_hidden, t_mask)
                          + t_target / _masked_std(t_target, t_mask))  # [B, R_t, D_s]
        queries = self.query(torch.cat([student_input_embeds, student_target_embeds], -1).to(wd))
        scores = queries @ keys.transpose(-1, -2) / math.sqrt(2 * D_t)  # [B, R_s, R_t]
        pair = s_mask.unsqueeze(-1) & t_mask.unsqueeze(-2)
        scores = scores.masked_fill(~pair, torch.finfo(scores.dtype).min)
        t2s_hidden = torch.softmax(scores, dim=-1) @ values  # [B, R_s, D_s]
        s2t_values = self.s2t(student_hidden.to(wd))  # [B, R_s, D_t]
        s2t_hidden = torch.softmax(scores.transpose(-1, -2), dim=-1) @ s2t_values  # [B, R_t, D_t]
        return CMAOutput(t2s_hidden=t2s_hidden, s2t_hidden=s2t_hidden, scores=scores)


def dskd_loss(
    cma: CrossModelAttention,
    *,
    student_logits: Tensor,
    student_hidden: Tensor,
    student_input_ids: Tensor,
    student_target_ids: Tensor,
    student_mask: Tensor,
    student_embed: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_input_ids: Tensor,
    teacher_target_ids: Tensor,
    teacher_mask: Tensor,
    teacher_embed: Tensor,
    teacher_logits: Tensor,
    teacher_topk_ids: Tensor | None = None,
    teacher_head: Tensor,
    temperature: float = 2.0,
    divergence: str = "forward_kl",
    skew: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DSKD-CMA loss ``t2s_ce + t2s_kd + s2t_kd`` (module docstring) and its parts.

    Parameters
    ----------
    cma : CrossModelAttention
    student_logits : Tensor, shape (B, R_s, V_s)
        Student logits at its prediction positions.
    student_hidden : Tensor, shape (B, R_s, D_s)
        Student last-layer states at those positions.
    student_input_ids, student_target_ids : LongTensor, shape (B, R_s)
        Student token at each position and the token it predicts.
    student_mask : Tensor, shape (B, R_s)
    student_embed : Tensor, shape (V_s, D_s)
        Student input embedding matrix (used detached).
    student_head : Tensor, shape (V_s, D_s)
        Student LM head weight (used detached; a bias, if the model has one, is not used).
    teacher_hidden : Tensor, shape (B, R_t, D_t)
        Teacher last-layer states (cached; float16/bfloat16 allowed).
    teacher_input_ids, teacher_target_ids : LongTensor, shape (B, R_t)
    teacher_mask : Tensor, shape (B, R_t)
    teacher_embed : Tensor, shape (V_t, D_t)
        Teacher input embedding matrix.
    teacher_logits : Tensor, shape (B, R_t, V_t) or (B, R_t, k)
        The teacher's own logits: full, or its top-k with ``teacher_topk_ids``.
    teacher_topk_ids : LongTensor, shape (B, R_t, k), optional
        Teacher ids of ``teacher_logits``' entries when they are a top-k cache.
    teacher_head : Tensor, shape (V_t, D_t)
        Teacher LM head weight.
    temperature : float
        KD temperature of ``t2s_kd`` and ``s2t_kd`` (not of ``t2s_ce``).
    divergence : str
        Divergence of ``t2s_kd`` (see ``losses.KD_KINDS``); ``s2t_kd`` is forward KL.

    Returns
    -------
    (loss, parts)
        ``loss`` a scalar; ``parts`` detached scalars ``t2s_ce``, ``t2s_kd``, ``s2t_kd``,
        ``t2s_acc`` (accuracy of the carried teacher on the student targets) and ``s2t_acc``.
    """
    B, R_s, V_s = student_logits.shape
    R_t = teacher_hidden.shape[1]
    if student_embed.shape[0] != V_s or student_head.shape[0] != V_s:
        raise ValueError(
            f"student_embed {list(student_embed.shape)} and student_head "
            f"{list(student_head.shape)} must have V_s = {V_s} rows"
        )
    if teacher_topk_ids is None and teacher_logits.shape[-1] != teacher_head.shape[0]:
        raise ValueError(
            f"teacher_logits has {teacher_logits.shape[-1]} entries per position but the "
            f"teacher head has {teacher_head.shape[0]} rows: give teacher_topk_ids for a top-k "
            "cache"
        )
    if teacher_logits.shape[:2] != (B, R_t):
        raise ValueError(
            f"teacher_logits {list(teacher_logits.shape)} must be [B, R_t, .] = [{B}, {R_t}, .]"
        )
    s_mask, t_mask = student_mask.bool(), teacher_mask.bool()
    wd = cma.query.weight.dtype
    se = student_embed.detach()
    te = teacher_embed.detach()
    out = cma(
        student_hidden=student_hidden,
        student_input_embeds=se[student_input_ids.long()],
        student_target_embeds=se[student_target_ids.long()],
        student_mask=s_mask,
        teacher_hidden=teacher_hidden.detach(),
        teacher_input_embeds=te[teacher_input_ids.long()],
        teacher_target_embeds=te[teacher_target_ids.long()],
        teacher_mask=t_mask,
    )
    # t2s: carried teacher states read by the student head.
    t2s_logits = out.t2s_hidden @ student_head.detach().to(wd).transpose(0, 1)  # [B, R_s, V_s]
    t2s_ce = ce_at_positions(t2s_logits, student_target_ids, s_mask)
    correct = t2s_logits.argmax(-1) == student_target_ids
    n_s = s_mask.sum().clamp_min(1)
    t2s_kd_pos = kd_divergence_per_position(student_logits, t2s_logits.detach(), kind=divergence,
                                            temperature=temperature, skew=skew)
    t2s_kd = (t2s_kd_pos * (s_mask & correct)).sum() / n_s
    # s2t: carried student states read by the teacher head, against the teacher's logits.
    s2t_logits = out.s2t_hidden @ teacher_head.detach().to(wd).transpose(0, 1)  # [B, R_t, V_t]
    if teacher_topk_ids is not None:
        s2t_cmp = s2t_logits.gather(-1, teacher_topk_ids.long())
    else:
        s2t_cmp = s2t_logits
    s2t_kd_pos = kd_divergence_per_position(s2t_cmp, teacher_logits.detach(), kind="forward_kl",
                                            temperature=temperature)
    s2t_kd = (s2t_kd_pos * t_mask).sum() / n_s  # DSKD divides every term by the student's count
    loss = t2s_ce + t2s_kd + s2t_kd
    with torch.no_grad():
        parts = {
            "t2s_ce": t2s_ce.detach(),
            "t2s_kd": t2s_kd.detach(),
            "s2t_kd": s2t_kd.detach(),
            "t2s_acc": (correct & s_mask).sum() / n_s,
            "s2t_acc": (((s2t_logits.argmax(-1) == teacher_target_ids) & t_mask).sum()
                        / t_mask.sum().clamp_min(1)),
        }
    return loss, parts
