"""Answers in generated text: the CoT form's rationale and answer, and how a dataset checks them.

A CoT response is ``rationale + "\\nTherefore, the answer is: " + answer``
(:data:`cot2align_core.prompts.ANSWER_PREFIX`); a standard response is the answer itself.
Whether an answer is right depends on the dataset, so the checker is part of the data
definition (``data.answer_format``): ``number`` (the first integer of the answer line, compared
as a number; the demo task and numeric datasets) or ``text`` (the answer line, compared after
:func:`cot2align_core.metrics.normalize_answer`). Free-form datasets (``checkable_answers:
false``) have no checker; they are scored by ROUGE-L only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from cot2align_core.metrics import normalize_answer
from cot2align_core.prompts import ANSWER_PREFIX

_MARKER = re.compile(re.escape(ANSWER_PREFIX.strip()), re.IGNORECASE)
_INT = re.compile(r"-?\d+")

ANSWER_FORMATS = ("number", "text")


def split_rationale(text: str) -> tuple[str, str]:
    """(rationale, answer line) of a CoT response.

    The rationale is everything before the last "Therefore, the answer is:"; the answer is the
    first line after it ("" when there is no such marker or nothing follows it). Without a
    marker the whole text is the rationale.
    """
    matches = list(_MARKER.finditer(text))
    if not matches:
        return text.strip(), ""
    tail = text[matches[-1].end():].strip().splitlines()
    return text[: matches[-1].start()].strip(), (tail[0].strip() if tail else "")


def answer_line(text: str | None) -> str | None:
    """The line that holds the final answer: the first non-empty line after the last marker,
    else the first non-empty line of the text; None when there is none."""
    if not text:
        return None
    matches = list(_MARKER.finditer(text))
    tail = text[matches[-1].end():] if matches else text
    return next((ln.strip() for ln in tail.splitlines() if ln.strip()), None)


def _number(text: str | None) -> str | None:
    line = answer_line(text)
    if line is None:
        return None
    number = _INT.search(line)
    if number:
        return str(int(number.group()))
    return line.rstrip(".").strip() or None


def _text(text: str | None) -> str | None:
    line = answer_line(text)
    return None if line is None else (normalize_answer(line) or None)


def _same_number(pred: str, gold: str) -> bool:
    def norm(s: str) -> str:
        s = str(s).strip().rstrip(".").strip()
        return str(int(s)) if _INT.fullmatch(s) else s.lower()

    return norm(pred) == norm(gold)


def _same_text(pred: str, gold: str) -> bool:
    return normalize_answer(pred) == normalize_answer(str(gold))


@dataclass(frozen=True)
class AnswerChecker:
    """``extract(response) -> answer or None`` and ``correct(answer, gold) -> bool``."""

    name: str
    extract: Callable[[str | None], str | None]
    same: Callable[[str, str], bool]

    def correct(self, answer: str | None, gold: str) -> bool:
        return answer is not None and self.same(answer, gold)

    def score(self, response: str | None, gold: str) -> float:
        """100.0 when the response's answer is right, else 0.0."""
        return 100.0 if self.correct(self.extract(response), gold) else 0.0


CHECKERS = {
    "number": AnswerChecker("number", _number, _same_number),
    "text": AnswerChecker("text", _text, _same_text),
}


def checker(answer_format: str) -> AnswerChecker:
    try:
        return CHECKERS[answer_format]
    except KeyError:
        raise ValueError(f"unknown answer format {answer_format!r}: expected one of "
                         f"{ANSWER_FORMATS}") from None
