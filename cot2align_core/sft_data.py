"""SFT examples: a row in one form -> token ids of prompt + response, and the prompt length.

Every example goes through :func:`cot2align_core.fitting.fit_example`, the path of the tokenize
stage: the prompt is fitted by cutting the row's input (never the instruction), the sequence is
the joint tokenization of prompt + response with the tokenizer's bos in front when it adds one
and eos after the response, so the model is trained on the prompt ids it is later given to
generate from. Examples whose response does not fit are dropped (a cut response would teach the
model to stop mid-sentence), and every drop is counted with its reason.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from cot2align_core.fitting import Dropped, FitStats, TruncationMode, fit_example
from cot2align_core.prompts import FORMS, format_row


def build_sft_examples(
    rows: Iterable[Mapping],
    tokenizers: Mapping[str, Any],
    side: str,
    forms: Iterable[str] = FORMS,
    *,
    max_length: int = 512,
    max_prompt_length: int = 256,
    truncation: TruncationMode = "end",
    rationales: Mapping[str, str] | None = None,
) -> tuple[list[dict], FitStats]:
    """(examples, counts): one example per (row, form), ``{"id", "form", "input_ids",
    "prompt_len"}`` in ``tokenizers[side]``'s tokens, and the :class:`FitStats` of the fitting.

    ``tokenizers``: every tokenizer the text must fit (the cut of a long input is decided with
    all of them, so the text is the one the tokenize stage gives both models); ``side`` names
    the one whose ids are returned. forms: "standard" (Alpaca prompt -> answer) and/or "cot"
    (CoT prompt -> rationale + "Therefore, the answer is: " + answer). The CoT form uses
    ``rationales[row["id"]]`` when given (the teacher's), else the row's own ``rationale``; rows
    without one get no CoT form (not counted). ``truncation``: how a long input is cut.
    """
    forms = tuple(forms)
    for form in forms:
        if form not in FORMS:
            raise ValueError(f"unknown form {form!r}: expected one of {FORMS}")
    if side not in tokenizers:
        raise ValueError(f"side {side!r} is not among the tokenizers {sorted(tokenizers)}")
    stats = FitStats()
    examples = []
    for row in rows:
        for form in forms:
            rationale = None
            if form == "cot":
                rationale = (rationales or {}).get(row["id"], row.get("rationale"))
                if not rationale:
                    continue
            fitted = stats.add(fit_example(row, form, rationale, tokenizers, max_length=max_length,
                                           max_prompt_length=max_prompt_length, mode=truncation,
                                           long_response="drop"))
            if isinstance(fitted, Dropped):
                continue
            ex = fitted.sides[side]
            examples.append({"id": ex.id, "form": form, "input_ids": ex.input_ids,
                             "prompt_len": ex.prompt_tokens})
    return examples, stats


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
