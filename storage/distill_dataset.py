"""What the distill stage iterates: student token rows joined with cached teacher states.

:class:`DistillDataset` has one item per example id::

    {"id": str,
     "standard": {student fields..., teacher fields...} | None,
     "cot":      {student fields..., teacher fields...} | None}

Student fields: ``input_ids`` (int64), ``response_mask`` (bool), ``offsets_start`` /
``offsets_end`` (int64), ``prompt_tokens`` (int), ``mined_alignment`` (int64 or None), and
``text`` with ``include_text=True``. Teacher fields, from :class:`TeacherRow`:
``teacher_hidden`` ``[n_layers, n_tokens, width]`` (the stored dtype, a view on the cache's
buffer: clone before writing into it), ``teacher_layers`` (tuple), ``teacher_input_ids``,
``teacher_positions``, ``teacher_target_ids`` (int32), ``teacher_topk_ids`` /
``teacher_topk_logits`` (or None).

Items follow the order in which ids first appear in ``student``. The order in which they are
visited is the training loop's: it shuffles per epoch, deterministically, optionally in
blocks of consecutive items (``shuffle_block_size``) so that a batch of a cache larger than
memory reads few row groups.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset

from storage.errors import StoreError
from storage.schemas import FORMS, ListColumn
from storage.teacher_cache import MissingTeacherRowError, TeacherCacheReader, TeacherRow

STUDENT_KIND = "student"


def teacher_fields(row: TeacherRow) -> dict[str, Any]:
    return {
        "teacher_hidden": row.hidden,
        "teacher_layers": row.layers,
        "teacher_input_ids": row.input_ids,
        "teacher_positions": row.positions,
        "teacher_target_ids": row.target_ids,
        "teacher_topk_ids": row.topk_ids,
        "teacher_topk_logits": row.topk_logits,
    }


class DistillDataset(Dataset):
    """Student tokenized rows joined with teacher-cache rows by ``(id, form)``.

    ``student``: a table of the student tokenized schema (all forms). ``teacher``: a
    :class:`TeacherCacheReader`, or None for a student-only dataset (e.g. plain SFT). Every
    student row must have its teacher row: a missing one raises
    :class:`MissingTeacherRowError` on construction, naming the ids and forms. Items follow
    the order in which ids first appear in ``student``.
    """

    def __init__(self, student: pa.Table, teacher: TeacherCacheReader | None, *,
                 forms: Sequence[str] = FORMS, include_text: bool = False) -> None:
        unknown = set(forms) - set(FORMS)
        if unknown:
            raise StoreError(f"forms {sorted(unknown)} are not among {FORMS}")
        self.forms = tuple(forms)
        self.teacher = teacher
        self.include_text = include_text
        self._lists = {c: ListColumn(student[c]) for c in
                       ("input_ids", "response_mask", "offsets_start", "offsets_end")
                       if c in student.column_names}
        self._alignment = (ListColumn(student["mined_alignment"])
                           if "mined_alignment" in student.column_names else None)
        self._prompt_tokens = student["prompt_tokens"].to_pylist()
        self._text = student["text"].to_pylist() if include_text else None
        ids, row_forms = student["id"].to_pylist(), student["form"].to_pylist()
        self._rows: dict[tuple[str, str], int] = {}
        self.ids: list[str] = []
        seen: set[str] = set()
        for i, (id_, form) in enumerate(zip(ids, row_forms)):
            if form not in self.forms:
                continue
            if (id_, form) in self._rows:
                raise StoreError(f"student table has two rows for id {id_!r} form {form!r}")
            self._rows[(id_, form)] = i
            if id_ not in seen:
                seen.add(id_)
                self.ids.append(id_)
        self._position = {id_: i for i, id_ in enumerate(self.ids)}
        if teacher is not None:
            missing = [k for k in self._rows if k not in teacher]
            if missing:
                shown = ", ".join(f"{i!r}/{f}" for i, f in missing[:5])
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise MissingTeacherRowError(
                    f"teacher cache {teacher.artifact.url} has no row for {shown}{more} "
                    f"({len(missing)} of {len(self._rows)} student rows): the cache does not "
                    "match this tokenized artifact; rerun cache_teacher on it")

    @classmethod
    def from_artifacts(cls, tokenized, teacher_cache=None, *, kind: str = STUDENT_KIND,
                       cache_bytes: int | None = None, **kwargs: Any) -> "DistillDataset":
        """From the tokenize artifact (its shards of ``kind``) and the cache_teacher artifact."""
        student = tokenized.read_kind(kind)
        reader = None
        if teacher_cache is not None:
            extra = {} if cache_bytes is None else {"cache_bytes": cache_bytes}
            reader = TeacherCacheReader(teacher_cache, **extra)
        return cls(student, reader, **kwargs)

    def __len__(self) -> int:
        return len(self.ids)

    def index_of(self, id_: str) -> int:
        return self._position[id_]

    def _student(self, i: int) -> dict[str, Any]:
        lists = self._lists
        out: dict[str, Any] = {
            "input_ids": torch.from_numpy(lists["input_ids"][i].astype(np.int64)),
            "response_mask": torch.from_numpy(lists["response_mask"][i] != 0),
            "offsets_start": torch.from_numpy(lists["offsets_start"][i].astype(np.int64)),
            "offsets_end": torch.from_numpy(lists["offsets_end"][i].astype(np.int64)),
            "prompt_tokens": int(self._prompt_tokens[i]),
            "mined_alignment": None,
        }
        if self._alignment is not None:
            al = self._alignment[i]
            out["mined_alignment"] = None if al is None else torch.from_numpy(al.astype(np.int64))
        if self._text is not None:
            out["text"] = self._text[i]
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        id_ = self.ids[index]
        item: dict[str, Any] = {"id": id_}
        for form in FORMS:
            row = self._rows.get((id_, form))
            if row is None:
                item[form] = None
                continue
            fields = self._student(row)
            if self.teacher is not None:
                fields.update(teacher_fields(self.teacher.get(id_, form)))
            item[form] = fields
        return item
