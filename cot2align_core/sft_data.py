"""SFT examples: a row in one form -> token ids of prompt + response, and the prompt length.

The prompt is encoded with the tokenizer's special tokens (`<s>` in front, exactly what
generation and vLLM feed the model), the response without them, followed by `</s>`. Prompt
and response are encoded separately so that the boundary never moves with the tokenizer:
the model is trained on the same prompt ids that it is later given to generate from.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from cot2align_core.prompts import FORMS, format_row


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids as the model sees them when generating (`<s>` + prompt)."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_example(tokenizer, prompt: str, response: str, *, add_eos: bool = True) -> dict:
    """{"input_ids": prompt ids + response ids (+ eos), "prompt_len": len(prompt ids)}."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if add_eos:
        response_ids.append(tokenizer.eos_token_id)
    return {"input_ids": prompt_ids + response_ids, "prompt_len": len(prompt_ids)}


def build_sft_examples(
    rows: Iterable[Mapping],
    tokenizer,
    forms: Iterable[str] = FORMS,
    *,
    max_length: int | None = None,
    rationales: Mapping[str, str] | None = None,
) -> list[dict]:
    """One example per (row, form): {"id", "form", "input_ids", "prompt_len"}.

    forms: "standard" (Alpaca prompt -> answer) and/or "cot" (CoT prompt -> rationale +
    "Therefore, the answer is: " + answer). The CoT form uses `rationales[row["id"]]` when
    given (the teacher's), else the row's own `rationale`; rows without one get no CoT form.
    Examples longer than `max_length` tokens are dropped (a truncated response would teach
    the model to stop mid-sentence).
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
            prompt, response = format_row(row, form, rationale)
            example = encode_example(tokenizer, prompt, response)
            if max_length is not None and len(example["input_ids"]) > max_length:
                continue
            examples.append({"id": row["id"], "form": form, **example})
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
