"""The objective's per-form batches, and collating distillation examples into them.

An example is ``{"id", "standard": fields | None, "cot": fields | None}`` where fields hold the
student's ``input_ids`` / ``response_mask`` (1-d tensors), optionally ``mined_alignment``, and
the cached teacher side ``teacher_hidden [L, R_t, D_t]``, ``teacher_input_ids``,
``teacher_target_ids`` (``[R_t]``) and optional ``teacher_topk_ids / teacher_topk_logits``
(``[R_t, k]``). A form no example of the batch has is left out; rows without a form are
padding there, marked absent by ``present`` (the objective runs the student only on the rows
that have the form).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from cot2align_core.prompts import FORMS

__all__ = ["LAST", "TeacherBatch", "StudentBatch", "StudentRun", "collate_student",
           "collate_teacher", "collate_distill"]

LAST = -1  # HF hidden_states index of the last layer, as the teacher cache names it


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


@dataclass
class StudentRun:
    """Student outputs of one form at its response prediction positions (``n`` present rows).

    Attributes
    ----------
    rows : LongTensor, shape (n,)
        Batch rows that have the form.
    slot : LongTensor, shape (B,)
        Position of each batch row in ``rows``, -1 if absent.
    mask : BoolTensor, shape (n, R)
    logits : Tensor, shape (n, R, V_s)
    input_ids, target_ids : LongTensor, shape (n, R)
        Token at each prediction position and the response token it predicts (EOS included).
    hidden : dict of str to Tensor, shape (n, R, D_s)
        The OT layers' student states by layer name, and ``"last"`` when a KD base reads it.
    """

    rows: Tensor
    slot: Tensor
    mask: Tensor
    logits: Tensor
    input_ids: Tensor
    target_ids: Tensor
    hidden: dict[str, Tensor]



def _pad_stack(seqs: list[torch.Tensor | None], fill, dtype=None) -> torch.Tensor:
    """Right-pad 1-d+ tensors along dim 0 into [B, max_len, ...] (None rows: all fill)."""
    real = [s for s in seqs if s is not None]
    length = max((s.shape[0] for s in real), default=0)
    length = max(length, 1)
    tail = real[0].shape[1:] if real else ()
    dtype = dtype or (real[0].dtype if real else torch.long)
    out = torch.full((len(seqs), length, *tail), fill, dtype=dtype)
    for i, s in enumerate(seqs):
        if s is not None and s.shape[0]:
            out[i, : s.shape[0]] = s.to(dtype)
    return out


def collate_student(items: Sequence[Mapping[str, Any]], form: str, pad_id: int) -> StudentBatch:
    rows = [it[form] for it in items]
    present = torch.tensor([r is not None for r in rows])
    ids = _pad_stack([None if r is None else torch.as_tensor(r["input_ids"]) for r in rows],
                     pad_id, torch.long)
    att = _pad_stack([None if r is None else torch.ones(len(r["input_ids"]), dtype=torch.long)
                      for r in rows], 0, torch.long)
    resp = _pad_stack([None if r is None else torch.as_tensor(r["response_mask"]).long()
                       for r in rows], 0, torch.long)
    mined = None
    if any(r is not None and r.get("mined_alignment") is not None for r in rows):
        mined = _pad_stack([None if r is None or r.get("mined_alignment") is None
                            else torch.as_tensor(r["mined_alignment"]) for r in rows], -1, torch.long)
    return StudentBatch(input_ids=ids, attention_mask=att, response_mask=resp, present=present,
                        mined_alignment=mined)


def collate_teacher(items: Sequence[Mapping[str, Any]], form: str) -> TeacherBatch:
    rows = [it[form] for it in items]
    present = torch.tensor([r is not None for r in rows])
    real = [r for r in rows if r is not None]
    layers = tuple(int(x) for x in real[0]["teacher_layers"])
    hidden = _pad_stack([None if r is None else r["teacher_hidden"].transpose(0, 1) for r in rows],
                        0, real[0]["teacher_hidden"].dtype).transpose(1, 2)  # [B, L, R, D]
    mask = _pad_stack([None if r is None else torch.ones(r["teacher_hidden"].shape[1], dtype=torch.bool)
                       for r in rows], False, torch.bool)
    inp = _pad_stack([None if r is None else torch.as_tensor(r["teacher_input_ids"]) for r in rows], 0, torch.long)
    tgt = _pad_stack([None if r is None else torch.as_tensor(r["teacher_target_ids"]) for r in rows], 0, torch.long)
    tk_ids = tk_logits = None
    if real[0].get("teacher_topk_ids") is not None:
        tk_ids = _pad_stack([None if r is None else r["teacher_topk_ids"] for r in rows], 0, torch.long)
        tk_logits = _pad_stack([None if r is None else r["teacher_topk_logits"] for r in rows], 0.0,
                               torch.float32)
    return TeacherBatch(hidden=hidden, mask=mask, input_ids=inp, target_ids=tgt, present=present,
                        topk_ids=tk_ids, topk_logits=tk_logits, layers=layers)


def collate_distill(items: Sequence[Mapping[str, Any]], pad_id: int, *, with_teacher: bool = True
                    ) -> tuple[dict[str, StudentBatch], dict[str, TeacherBatch] | None]:
    """({form: StudentBatch}, {form: TeacherBatch} or None) for the forms the batch has."""
    forms = [f for f in FORMS if any(it[f] is not None for it in items)]
    student = {f: collate_student(items, f, pad_id) for f in forms}
    teacher = {f: collate_teacher(items, f) for f in forms} if with_teacher else None
    return student, teacher
