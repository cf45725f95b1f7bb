"""Collating distillation examples into the objective's per-form batches.

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
from typing import Any

import torch

from cot2align_core.objective import StudentBatch, TeacherBatch

FORMS = ("standard", "cot")


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
