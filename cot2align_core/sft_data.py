"""SFT examples: a row in one form -> token ids of prompt + response, and the prompt length.

Encoding is :func:`cot2align_core.tokenization.tokenize_pair`'s (prompt and response encoded
separately, the tokenizer's bos in front when it adds one, eos after the response), so the model
is trained on the same prompt ids it is later given to generate from, and the teacher's SFT
sees exactly the tokenisation of the tokenize stage.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from cot2align_core.prompts import FORMS, format_row
from cot2align_core.tokenization import tokenize_pair


def build_sft_examples(
    rows: Iterable[Mapping],
    tokenizer,
    forms: Iterable[str] = FORMS,
    *,
    max_length: int = 512,
    max_prompt_length: int = 256,
    rationales: Mapping[str, str] | None = None,
) -> list[dict]:
    """One example per (row, form): {"id", "form", "input_ids", "prompt_len"}.

    forms: "standard" (Alpaca prompt -> answer) and/or "cot" (CoT prompt -> rationale +
    "Therefore, the answer is: " + answer). The CoT form uses `rationales[row["id"]]` when
    given (the teacher's), else the row's own `rationale`; rows without one get no CoT form.
    Examples that do not fit `max_length` / `max_prompt_length` are dropped (a truncated
    response would teach the model to stop mid-sentence).
    """
    forms = tuple(forms)
    for form in forms:
        if form not in FORMS:
            raise ValueError(f"unknown form {form!r}: expected one of {FORMS}")
    examples = []
    for row in rows:
        for form in forms:
            rationale = None
            if form == "cot":
                rationale = (rationales or {}).get(row["id"], row.get("rationale"))
                if not rationale:
                    continue
            ex = tokenize_pair(tokenizer, row["id"], form, *format_row(row, form, rationale),
                               max_length=max_length, max_prompt_length=max_prompt_length)
            if ex.truncated:
                continue
            examples.append({"id": ex.id, "form": form, "input_ids": ex.input_ids,
                             "prompt_len": ex.prompt_tokens})
    return examples


def tokenizer_corpus(rows: Iterable[Mapping], forms: Iterable[str] = FORMS) -> list[str]:
    """Texts to train a tokenizer on: every (prompt + response) of `rows` in `forms`, so the
    fixed templates are learnt as few tokens."""
    texts = []
    for row in rows:
        for form in forms:
            if form == "cot" and not row.get("rationale"):
                continue
            prompt, response = format_row(row, form)
            texts.append(prompt + response)
    return texts
