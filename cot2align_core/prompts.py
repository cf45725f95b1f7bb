"""Prompt templates of the two example forms (METHOD.md, "CoT augmentation").

- standard: the Alpaca prompt (the one in the DSKD Dolly files) -> the gold answer.
- CoT: the paper's CoT prompt, which ends in "Let's think step by step.\\n" ->
  rationale + ANSWER_PREFIX + gold answer.

The texts are copied character for character from the DSKD data and the CoT2Align scripts;
tokenizers trained for the demo see them in their training texts so that they cost few tokens.
"""
from __future__ import annotations

from collections.abc import Mapping

STANDARD_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
STANDARD_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
COT_PROMPT = (
    "Below is an instruction that describes a task. Write a response with reasoning step by "
    "step that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    "Let's think step by step.\n"
)
# The paper only builds CoT forms for rows with an input; this variant covers the others.
COT_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response with reasoning step by "
    "step that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\nLet's think step by step.\n"
)
ANSWER_PREFIX = "\nTherefore, the answer is: "
RESPONSE_HEADER = "### Response:\n"
COT_TRIGGER = "Let's think step by step.\n"

FORMS = ("standard", "cot")


def _regex_literal(text: str) -> str:
    """``text`` as a regular expression matching itself (Python and Oniguruma syntax)."""
    special = set(".^$|?*+()[]{}\\")
    return "".join("\\n" if c == "\n" else "\\" + c if c in special else c for c in text)


# Where every prompt template ends: the response header, then the CoT trigger in the CoT form.
# Tokenizers trained here end a pre-token there, so no token spans a prompt and its response.
PROMPT_END_REGEX = _regex_literal(RESPONSE_HEADER) + "(?:" + _regex_literal(COT_TRIGGER) + ")?"


def _has_input(row: Mapping) -> bool:
    return bool(str(row.get("input") or "").strip())


def standard_prompt(row: Mapping) -> str:
    """The Alpaca prompt of a row (with the input section when the row has an input)."""
    if _has_input(row):
        return STANDARD_PROMPT.format(instruction=row["instruction"], input=row["input"])
    return STANDARD_PROMPT_NO_INPUT.format(instruction=row["instruction"])


def cot_prompt(row: Mapping) -> str:
    """The paper's CoT prompt of a row, ending in "Let's think step by step.\\n"."""
    if _has_input(row):
        return COT_PROMPT.format(instruction=row["instruction"], input=row["input"])
    return COT_PROMPT_NO_INPUT.format(instruction=row["instruction"])


def cot_response(rationale: str, answer: str) -> str:
    """rationale + "\\nTherefore, the answer is: " + answer (trailing whitespace of the
    rationale dropped so that the prefix joins it the same way every time)."""
    return rationale.rstrip() + ANSWER_PREFIX + str(answer)


def format_standard(row: Mapping) -> tuple[str, str]:
    """(prompt, response) of the standard form: Alpaca prompt -> gold answer (`output`)."""
    return standard_prompt(row), str(row["output"])


def format_cot(row: Mapping, rationale: str | None = None) -> tuple[str, str]:
    """(prompt, response) of the CoT form: CoT prompt -> rationale + ANSWER_PREFIX + answer.

    `rationale` defaults to the row's own `rationale` (the gold one in the demo task; the
    teacher's generated one after the generate stage)."""
    if rationale is None:
        rationale = row.get("rationale")
    if rationale is None:
        raise ValueError(f"row {row.get('id')!r} has no rationale for the CoT form")
    return cot_prompt(row), cot_response(rationale, row["output"])


def format_row(row: Mapping, form: str, rationale: str | None = None) -> tuple[str, str]:
    """(prompt, response) of `row` in `form` ("standard" or "cot")."""
    if form == "standard":
        return format_standard(row)
    if form == "cot":
        return format_cot(row, rationale)
    raise ValueError(f"unknown form {form!r}: expected one of {FORMS}")
