"""Fitting long prompts by cutting the row's input, with a real tokenizer pair (TinyLlama as
teacher, GPT-2 as student: different vocabularies, so the tighter one decides) on Dolly rows."""
from __future__ import annotations

import random

import pytest

from cot2align_core.fitting import (
    ELLIPSIS,
    Dropped,
    FitStats,
    FittedExample,
    PromptFit,
    cut_input,
    fit_example,
    fit_prompt,
)
from cot2align_core.prompts import format_row
from cot2align_core.tokenization import prompt_token_ids

LIMIT = 128
RATIONALE = "First, read the context. Then, name what it asks for. So the answer follows."


@pytest.fixture(scope="module")
def toks(shared_tokenizer_dir):
    from transformers import AutoTokenizer

    return {"teacher": AutoTokenizer.from_pretrained(str(shared_tokenizer_dir("tinyllama-1.1b-3T"))),
            "student": AutoTokenizer.from_pretrained(str(shared_tokenizer_dir("gpt2-base")))}


@pytest.fixture(scope="module")
def rows(dolly_dir):
    from cot2align_core.data import read_jsonl

    return read_jsonl(dolly_dir / "dev.jsonl", "train").rows


def counts(toks, prompt):
    return {side: len(prompt_token_ids(tok, prompt)) for side, tok in toks.items()}


@pytest.mark.parametrize("mode", ["end", "middle"])
@pytest.mark.parametrize("form", ["standard", "cot"])
def test_long_inputs_are_cut_and_the_instruction_is_kept(toks, rows, mode, form):
    """Every Dolly row with an input: the fitted prompt fits both tokenizers, keeps the
    template and the whole instruction, keeps the input's beginning (and, in the middle mode,
    its end), and is as long as fits (one more word would not)."""
    stats = FitStats()
    for row in (r for r in rows if r["input"]):
        fit = stats.add(fit_prompt(row, form, toks, LIMIT, mode))
        if isinstance(fit, Dropped):
            assert fit.reason == "prompt_too_long"
            continue
        assert fit.prompt == format_row(fit.row, form, RATIONALE)[0]
        assert fit.prompt_tokens == counts(toks, fit.prompt)
        assert max(fit.prompt_tokens.values()) <= LIMIT
        assert fit.row["instruction"] == row["instruction"] and row["instruction"] in fit.prompt
        if not fit.input_cut:
            assert fit.row == row
            continue
        kept = fit.row["input"]
        head, _, tail = kept.partition(f" {ELLIPSIS}")
        assert row["input"].startswith(head)
        if mode == "middle":
            assert row["input"].endswith(tail.strip())
        else:
            assert tail == ""
        # as long as fits: the original does not, and neither does a cut of some more words
        assert max(counts(toks, format_row(row, form, RATIONALE)[0]).values()) > LIMIT
        longer = {**row, "input": cut_input(row["input"], len(head) + len(tail) + 40, mode)}
        assert max(counts(toks, format_row(longer, form, RATIONALE)[0]).values()) > LIMIT - 8
    # measured: 197 Dolly dev rows have an input, 185 of them cut at 128 tokens, none dropped
    assert stats.examples > 150 and stats.input_truncated > 0.8 * stats.examples
    assert stats.examples == stats.kept + sum(stats.dropped.values())


def test_teacher_and_student_read_the_same_text(toks, rows):
    long_rows = sorted((r for r in rows if r["input"]), key=lambda r: -len(r["input"]))[:40]
    for row in long_rows:
        ex = fit_example(row, "cot", RATIONALE, toks, max_prompt_length=LIMIT, max_length=LIMIT + 64)
        assert isinstance(ex, FittedExample) and ex.fit.input_cut
        teacher, student = ex.sides["teacher"], ex.sides["student"]
        assert teacher.text == student.text == ex.fit.prompt + ex.response
        assert ex.response == format_row(ex.fit.row, "cot", RATIONALE)[1]
        assert max(teacher.prompt_tokens, student.prompt_tokens) <= LIMIT
        # the tighter tokenizer decided: it is within a few tokens of the limit
        assert max(teacher.prompt_tokens, student.prompt_tokens) > LIMIT - 12


def test_what_cannot_fit_is_dropped_with_its_reason(toks, rows):
    row = dict(rows[0], instruction=" ".join(["Explain the history of the region"] * 30))
    stats = FitStats()
    dropped = stats.add(fit_prompt(row, "standard", toks, LIMIT))
    assert isinstance(dropped, Dropped) and dropped.reason == "prompt_too_long"
    assert dropped.id == row["id"] and str(LIMIT) in dropped.detail
    no_input = dict(row, input="")
    assert stats.add(fit_prompt(no_input, "cot", toks, LIMIT)).reason == "prompt_too_long"
    # a response longer than max_length: cut (tokenize) or dropped (SFT)
    short = next(r for r in rows if not r["input"] and len(r["output"]) > 400)
    cut = stats.add(fit_example(short, "standard", None, toks, max_prompt_length=LIMIT, max_length=80))
    assert isinstance(cut, FittedExample) and cut.response_cut
    assert all(len(ex.input_ids) == 80 for ex in cut.sides.values())
    gone = stats.add(fit_example(short, "standard", None, toks, max_prompt_length=LIMIT, max_length=80,
                                 long_response="drop"))
    assert isinstance(gone, Dropped) and gone.reason == "response_too_long"
    room = stats.add(fit_example(short, "standard", None, toks, max_prompt_length=LIMIT, max_length=20))
    assert isinstance(room, Dropped) and room.reason == "no_room_for_response"
    assert stats.as_dict() == {"examples": 5, "kept": 1, "input_truncated": 0, "response_truncated": 1,
                               "straddled": 0, "dropped": {"no_room_for_response": 1,
                                                           "prompt_too_long": 2,
                                                           "response_too_long": 1}}
    assert stats.log_line("tokenize") == (
        "tokenize: 1 of 5 examples kept; input cut in 0, response cut in 1; dropped: "
        "1 no_room_for_response, 2 prompt_too_long, 1 response_too_long")


def test_cut_input_cuts_at_spaces():
    text = "alpha beta gamma delta epsilon zeta"
    assert cut_input(text, 13, "end") == "alpha beta ..."  # not "alpha beta ga"
    assert cut_input(text, 0, "end") == ELLIPSIS == cut_input(text, 0, "middle")
    assert cut_input(text, 22, "middle") == "alpha beta ... zeta"
    assert cut_input("x" * 50, 10, "end") == "x" * 10 + " ..."  # no space: characters
    rng = random.Random(0)
    for _ in range(200):
        words = [rng.choice(["a", "bb", "ccc", "dddd"]) for _ in range(rng.randint(1, 30))]
        text = " ".join(words)
        keep = rng.randint(0, len(text))
        head, _, tail = cut_input(text, keep, "middle").partition(ELLIPSIS)
        assert text.startswith(head.strip()) and text.endswith(tail.strip())
        assert len(head.strip()) + len(tail.strip()) <= keep


def test_bad_settings_are_refused(toks, rows):
    with pytest.raises(ValueError, match="truncation mode"):
        fit_prompt(rows[0], "standard", toks, LIMIT, "start")
    with pytest.raises(ValueError, match="form"):
        fit_prompt(rows[0], "qa", toks, LIMIT)
    fit = fit_prompt(rows[0], "standard", toks, 10_000)
    assert isinstance(fit, PromptFit) and not fit.input_cut and fit.row is rows[0]


def test_sft_examples_count_every_example_they_leave_out(toks, dolly_dir):
    """teacher_sft's path: every Dolly row is kept (its input cut when needed) or counted as
    dropped with its reason; nothing disappears silently."""
    from cot2align_core.data import read_jsonl
    from cot2align_core.sft_data import build_sft_examples

    rows = read_jsonl(dolly_dir / "valid.jsonl", "train").rows
    examples, stats = build_sft_examples(rows, toks, "teacher", ["standard"], max_length=512,
                                         max_prompt_length=256)
    assert stats.examples == len(rows) == len(examples) + sum(stats.dropped.values())
    assert set(stats.dropped) <= {"response_too_long", "prompt_too_long"}
    assert stats.dropped["response_too_long"] > 0 and stats.input_truncated > 0
    teacher = toks["teacher"]
    for ex in examples:
        assert len(ex["input_ids"]) <= 512 and ex["prompt_len"] <= 256
        assert ex["input_ids"][-1] == teacher.eos_token_id
