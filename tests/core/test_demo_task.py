"""The demo task, the prompt templates and the SFT examples built from them."""
from __future__ import annotations

import json

import pytest

from cot2align_core import prompts
from cot2align_core.demo_task import (
    DEMO_DEFAULTS,
    count_problems,
    extract_answer,
    is_correct,
    make_demo_rows,
)
from cot2align_core.modeling import train_tokenizer
from cot2align_core.sft_data import build_sft_examples, tokenizer_corpus


def _evaluate(expression: str) -> int:
    tokens = expression.split()
    acc = int(tokens[0])
    for op, b in zip(tokens[1::2], tokens[2::2]):
        acc = acc + int(b) if op == "+" else acc - int(b)
    return acc


def test_rows_have_the_dolly_fields_and_correct_gold():
    rows = make_demo_rows(300, seed=3)
    assert len(rows) == 300
    for row in rows:
        assert set(row) == {"id", "instruction", "input", "output", "rationale"}
        assert row["output"] == str(_evaluate(row["input"]))
        lines = row["rationale"].split("\n")
        assert len(lines) == DEMO_DEFAULTS["task"]["n_operands"] - 1
        # One line per operation, left to right, the last one ending in the answer.
        assert lines[-1].endswith(f"= {row['output']}")
        for line in lines:
            lhs, rhs = line.split(" = ")
            assert _evaluate(lhs) == int(rhs) >= 0
    assert len({r["id"] for r in rows}) == 300
    assert len({r["input"] for r in rows}) == 300  # distinct while the split has enough


def test_rows_are_deterministic_for_a_seed():
    assert make_demo_rows(50, seed=1) == make_demo_rows(50, seed=1)
    assert make_demo_rows(50, seed=1) != make_demo_rows(50, seed=2)


def test_splits_are_disjoint_and_independent_of_the_seed():
    train = {r["input"] for seed in (0, 1) for r in make_demo_rows(count_problems("train"), seed=seed)}
    test = {r["input"] for r in make_demo_rows(count_problems("test"), seed=5, split="test")}
    dev = {r["input"] for r in make_demo_rows(count_problems("dev"), seed=5, split="dev")}
    assert train and test and dev
    assert not train & test and not train & dev and not dev & test
    assert count_problems("test") >= 200  # the 200 held-out rows of the measurements


def test_a_split_is_cycled_when_more_rows_are_asked_than_it_holds():
    n = count_problems("test")
    rows = make_demo_rows(n + 10, seed=0, split="test")
    assert len(rows) == n + 10 and len({r["input"] for r in rows}) == n


def test_task_settings_change_the_problems():
    rows = make_demo_rows(20, seed=0, n_operands=4, min_operand=1, max_operand=5, ops="+")
    for row in rows:
        assert row["input"].count("+") == 3 and "-" not in row["input"]
        assert row["rationale"].count("\n") == 2
    with pytest.raises(ValueError):
        make_demo_rows(5, split="validation")
    with pytest.raises(ValueError):
        make_demo_rows(5, ops="*")


@pytest.mark.parametrize(
    "text, answer",
    [
        ("7 + 5 = 12\n12 - 3 = 9\nTherefore, the answer is: 9", "9"),
        ("7 + 5 = 12\nTherefore, the answer is: 12.\n### Instruction:", "12"),
        ("therefore, the answer is: 3 Therefore, the answer is: 4", "4"),
        ("9", "9"),
        ("  14\n### Response:", "14"),
        ("7 + 5 = 12\n12 - 3 = 9", "7"),  # no marker: the first line is taken as the answer
        ("Therefore, the answer is: ", None),
        ("", None),
        (None, None),
        ("Therefore, the answer is: nine.", "nine"),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_is_correct():
    assert is_correct("9", "9") and is_correct("09", "9") and is_correct(" 9.", "9")
    assert not is_correct("8", "9") and not is_correct(None, "9") and not is_correct("", "9")
    assert is_correct("Nine", "nine")


def test_prompt_forms():
    row = make_demo_rows(1, seed=0)[0]
    prompt, response = prompts.format_standard(row)
    assert prompt.startswith("Below is an instruction that describes a task, paired with an input")
    assert prompt.endswith(f"### Input:\n{row['input']}\n\n### Response:\n")
    assert response == row["output"]
    prompt, response = prompts.format_cot(row)
    assert prompt.endswith(f"{row['input']}\n\n### Response:\nLet's think step by step.\n")
    assert "with reasoning step by step" in prompt
    assert response == row["rationale"] + "\nTherefore, the answer is: " + row["output"]
    assert prompts.format_cot(row, "other chain\n")[1] == "other chain\nTherefore, the answer is: " + row["output"]
    no_input = {**row, "input": ""}
    assert "### Input:" not in prompts.format_standard(no_input)[0]
    assert "### Input:" not in prompts.format_cot(no_input)[0]
    with pytest.raises(ValueError):
        prompts.format_cot({**row, "rationale": None})
    with pytest.raises(ValueError):
        prompts.format_row(row, "other")


def test_standard_prompt_is_the_one_in_the_dsk_dolly_files(dolly_dir):
    with open(dolly_dir / "dev.jsonl") as f:
        rows = [json.loads(line) for _, line in zip(range(200), f)]
    assert any(r["input"] for r in rows) and any(not r["input"] for r in rows)
    for row in rows:
        assert prompts.standard_prompt(row) == row["prompt"]


def test_sft_examples_mark_the_response_and_end_with_eos(tmp_path):
    rows = make_demo_rows(40, seed=0)
    tok = train_tokenizer(tokenizer_corpus(rows), "bpe", 600, tmp_path / "tok")
    examples, stats = build_sft_examples(rows, {"teacher": tok}, "teacher")
    assert [e["form"] for e in examples[:2]] == ["standard", "cot"]
    assert len(examples) == 80 and stats.kept == 80 and not stats.dropped
    for ex, row in zip(examples, [r for r in rows for _ in range(2)]):
        prompt, response = prompts.format_row(row, ex["form"])
        ids, p = ex["input_ids"], ex["prompt_len"]
        # the prompt ids are what a generation engine is given: tok(prompt) with bos
        assert ids[:p] == tok(prompt)["input_ids"] and ids[0] == tok.bos_token_id
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids[p:-1]) == response
        assert ids[1:-1] == tok(prompt + response, add_special_tokens=False)["input_ids"]
    # the teacher's rationales replace the gold ones; too long examples are dropped and counted
    other, _ = build_sft_examples(rows[:2], {"teacher": tok}, "teacher", ["cot"],
                                  rationales={rows[0]["id"]: "1 + 1 = 2"})
    assert tok.decode(other[0]["input_ids"][other[0]["prompt_len"] : -1]).startswith("1 + 1 = 2\n")
    none, stats = build_sft_examples(rows[:5], {"teacher": tok}, "teacher", ["cot"], max_length=12)
    assert none == [] and stats.dropped == {"response_too_long": 5}
    with pytest.raises(ValueError, match="side"):
        build_sft_examples(rows, {"teacher": tok}, "student")


def test_demo_defaults_match_the_generator_defaults():
    import inspect

    params = inspect.signature(make_demo_rows).parameters
    assert {k: params[k].default for k in DEMO_DEFAULTS["task"]} == DEMO_DEFAULTS["task"]
