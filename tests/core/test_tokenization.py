"""Dual tokenisation with the paper's real tokenizers (GPT-2: no bos; TinyLlama: bos, SentencePiece
pieces; Qwen1.5: byte-level BPE without bos) on Dolly rows in both forms."""
from __future__ import annotations

import copy
import random
import re

import pytest

from cot2align_core.prompts import ANSWER_PREFIX, format_row
from cot2align_core.tokenization import (
    TokenizedExample,
    TokenizerError,
    check_tokenizer,
    pad_token_id,
    response_ids,
    tokenize_pair,
)

NAMES = ("gpt2-base", "tinyllama-1.1b-3T", "Qwen1.5-1.8B")
BIG = 100_000
RATIONALE = ("The context names the people involved. First, find who led it. Then, list "
             "the aides who took part, one by one — e.g. “Dean” and ‘Haldeman’ (≈ 2 steps).")


@pytest.fixture(scope="module", params=NAMES)
def tok(request, shared_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_tokenizer_dir(request.param)))


@pytest.fixture(scope="module")
def gpt2(shared_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_tokenizer_dir("gpt2-base")))


@pytest.fixture(scope="module")
def dolly_rows(dolly_dir):
    from cot2align_core.data import read_jsonl

    return read_jsonl(dolly_dir / "dev.jsonl", "train").rows


@pytest.fixture(scope="module")
def sample_rows(dolly_rows):
    """A fixed random sample with rows with and without input, plus the longest row."""
    rng = random.Random(1234)
    rows = rng.sample(dolly_rows, 12)
    rows.append(max(dolly_rows, key=lambda r: len(r["instruction"]) + len(r["input"])))
    assert any(r["input"] for r in rows) and not all(r["input"] for r in rows)
    return rows


def examples(rows):
    for row in rows:
        for form in ("standard", "cot"):
            yield row, form, format_row(row, form, RATIONALE if form == "cot" else None)


def adds_bos(tok) -> bool:
    ids = tok("a")["input_ids"]
    return tok.bos_token_id is not None and ids[0] == tok.bos_token_id


# --------------------------------------------------------------------------- token text
def _is_metaspace(tok) -> bool:
    pieces = tok.convert_ids_to_tokens(tok("a b", add_special_tokens=False)["input_ids"])
    return any("▁" in p for p in pieces)


def token_text(tok, tid: int) -> str | None:
    """The characters a token stands for, or None where one token alone is not exact text
    (a byte of a multi-byte character)."""
    if _is_metaspace(tok):
        piece = tok.convert_ids_to_tokens(tid)
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if m:
            b = int(m.group(1), 16)
            return chr(b) if b < 128 else None
        return piece.replace("▁", " ")
    text = tok.decode([tid])
    return None if "\ufffd" in text else text


def check_offsets(tok, ex: TokenizedExample, prompt: str) -> int:
    """Offsets index ``text``, are monotonic, and give each token's characters. Returns how
    many tokens were checked against their text."""
    n = len(ex.input_ids)
    assert len(ex.offsets_start) == len(ex.offsets_end) == n
    starts, ends = ex.offsets_start, ex.offsets_end
    assert all(0 <= a <= b <= len(ex.text) for a, b in zip(starts, ends))
    assert starts == sorted(starts) and ends == sorted(ends)
    split = ex.prompt_tokens
    assert all(b <= len(prompt) for b in ends[:split])
    assert all(a >= len(prompt) for a in starts[split:])
    segment_starts = {starts[0], len(prompt)}
    special = set(tok.all_special_ids)
    checked = 0
    for k, (tid, a, b) in enumerate(zip(ex.input_ids, starts, ends)):
        if tid in special:
            assert a == b, f"special token {tid} at {k} has a non-empty span"
            continue
        want = token_text(tok, tid)
        if want is None:
            continue
        got = ex.text[a:b]
        # SentencePiece marks the start of an encoded text with a space that is no character:
        # glued to the first word, or alone (then the library gives it the next one's span).
        if got != want and a in segment_starts and want.startswith(" "):
            if want == " ":
                continue
            if want == " " + got:
                want = got
        assert got == want, f"token {k} ({tid}): text[{a}:{b}] = {got!r}, token is {want!r}"
        checked += 1
    return checked


# --------------------------------------------------------------------------- the layout
def test_responses_round_trip_on_dolly_rows(tok, sample_rows):
    for row, form, (prompt, response) in examples(sample_rows):
        ex = tokenize_pair(tok, row["id"], form, prompt, response,
                           max_length=BIG, max_prompt_length=BIG)
        assert (ex.id, ex.form, ex.text) == (row["id"], form, prompt + response)
        assert not ex.truncated
        assert tok.decode(ex.input_ids[ex.prompt_tokens:]) == response + tok.eos_token
        assert ex.input_ids[-1] == tok.eos_token_id
        assert response_ids(ex) == ex.input_ids[ex.prompt_tokens:]
        assert ex.response_mask == [0] * ex.prompt_tokens + [1] * (len(ex.input_ids) - ex.prompt_tokens)
        assert ex.response_tokens == len(response_ids(ex))
        # The prompt tokens are what a generation engine encodes from the prompt alone.
        assert ex.input_ids[:ex.prompt_tokens] == tok(prompt)["input_ids"]
        if form == "cot":
            assert prompt.endswith("Let's think step by step.\n") and ANSWER_PREFIX in response


def test_bos_is_added_exactly_when_the_tokenizer_adds_one(tok, sample_rows):
    row = sample_rows[0]
    prompt, response = format_row(row, "standard")
    ex = tokenize_pair(tok, row["id"], "standard", prompt, response,
                       max_length=BIG, max_prompt_length=BIG)
    name = tok.name_or_path
    expected = "tinyllama" in name
    assert adds_bos(tok) is expected
    assert (ex.input_ids[0] == tok.bos_token_id) is expected
    if expected:
        assert (ex.offsets_start[0], ex.offsets_end[0]) == (0, 0)
        assert tok.bos_token_id not in ex.input_ids[1:]
    elif tok.bos_token_id is not None:  # GPT-2: bos == eos, only at the end
        assert ex.input_ids.count(tok.bos_token_id) == 1


def test_offsets_map_tokens_back_to_their_characters(tok, sample_rows):
    checked = 0
    for row, form, (prompt, response) in examples(sample_rows):
        ex = tokenize_pair(tok, row["id"], form, prompt, response,
                           max_length=BIG, max_prompt_length=BIG)
        checked += check_offsets(tok, ex, prompt)
        eos_at = len(ex.input_ids) - 1
        assert ex.offsets_start[eos_at] == ex.offsets_end[eos_at] == len(ex.text)
    assert checked > 1000


def test_non_ascii_text_keeps_consistent_offsets(tok):
    prompt, response = format_row({"instruction": "Translate “café” 😀", "input": "naïve"}
                                  | {"output": "Ça va — très bien 😀!"}, "standard")
    ex = tokenize_pair(tok, "u1", "standard", prompt, response, max_length=BIG,
                       max_prompt_length=BIG)
    assert tok.decode(response_ids(ex)) == response + tok.eos_token
    check_offsets(tok, ex, prompt)


def test_empty_response_is_just_eos(tok):
    ex = tokenize_pair(tok, "e", "standard", "### Response:\n", "", max_length=64,
                       max_prompt_length=32)
    assert response_ids(ex) == [tok.eos_token_id] and ex.response_tokens == 1


# --------------------------------------------------------------------------- truncation
def long_row(dolly_rows):
    row = dict(max(dolly_rows, key=lambda r: len(r["input"])))
    row["input"] = (row["input"] + " ") * 3
    return row


@pytest.mark.parametrize("form", ["standard", "cot"])
def test_long_prompts_lose_their_beginning(tok, dolly_rows, form):
    row = long_row(dolly_rows)
    prompt, response = format_row(row, form, RATIONALE if form == "cot" else None)
    full = tok(prompt)["input_ids"]
    limit = 48
    assert len(full) > 4 * limit
    ex = tokenize_pair(tok, row["id"], form, prompt, response, max_length=BIG,
                       max_prompt_length=limit)
    assert ex.truncated and ex.prompt_tokens == limit
    # The generation engine's rule: a leading bos stays, then the last tokens.
    expected = [full[0]] + full[-(limit - 1):] if adds_bos(tok) else full[-limit:]
    assert ex.input_ids[:limit] == expected
    kept = tok.decode(ex.input_ids[:limit], skip_special_tokens=True)
    assert kept.endswith("### Response:\n" if form == "standard" else "Let's think step by step.\n")
    assert not prompt.startswith(kept)
    # The response is untouched, and offsets still index the full text.
    assert tok.decode(response_ids(ex)) == response + tok.eos_token
    check_offsets(tok, ex, prompt)
    assert ex.offsets_start[limit - 1] > len(prompt) // 2


def test_long_responses_lose_their_end_and_their_eos(tok, sample_rows):
    row = sample_rows[0]
    prompt, response = format_row(row, "cot", RATIONALE * 4)
    n_prompt = len(tok(prompt)["input_ids"])
    room = 10
    ex = tokenize_pair(tok, row["id"], "cot", prompt, response,
                       max_length=n_prompt + room, max_prompt_length=BIG)
    assert ex.truncated and len(ex.input_ids) == n_prompt + room
    assert ex.prompt_tokens == n_prompt and ex.response_tokens == room
    assert tok.eos_token_id not in response_ids(ex)
    assert response.startswith(tok.decode(response_ids(ex)).rstrip("\ufffd"))
    check_offsets(tok, ex, prompt)


def test_a_response_that_fits_exactly_is_not_truncated(tok, sample_rows):
    row = sample_rows[1]
    prompt, response = format_row(row, "standard")
    full = tokenize_pair(tok, row["id"], "standard", prompt, response,
                         max_length=BIG, max_prompt_length=BIG)
    ex = tokenize_pair(tok, row["id"], "standard", prompt, response,
                       max_length=len(full.input_ids), max_prompt_length=BIG)
    assert ex == full and not ex.truncated
    short = tokenize_pair(tok, row["id"], "standard", prompt, response,
                          max_length=len(full.input_ids) - 1, max_prompt_length=BIG)
    assert short.truncated and short.input_ids == full.input_ids[:-1]


def test_an_impossible_max_length_names_the_example_and_the_keys(tok, sample_rows):
    row = sample_rows[2]
    prompt, response = format_row(row, "cot", RATIONALE)
    n_prompt = len(tok(prompt)["input_ids"])
    with pytest.raises(TokenizerError) as info:
        tokenize_pair(tok, row["id"], "cot", prompt, response, max_length=n_prompt,
                      max_prompt_length=BIG)
    msg = str(info.value)
    assert row["id"] in msg and "(cot)" in msg
    assert "tokenize.max_length" in msg and "tokenize.max_prompt_length" in msg
    with pytest.raises(TokenizerError, match="max_prompt_length must be at least 1"):
        tokenize_pair(tok, row["id"], "cot", prompt, response, max_length=BIG,
                      max_prompt_length=0)


def test_invariants_on_random_rows_and_budgets(tok, dolly_rows):
    """Property: for random rows, forms and budgets the layout invariants hold."""
    rng = random.Random(7)
    bos = adds_bos(tok)
    for _ in range(30):
        row = rng.choice(dolly_rows)
        form = rng.choice(["standard", "cot"])
        prompt, response = format_row(row, form, RATIONALE[: rng.randrange(1, len(RATIONALE))])
        max_prompt = rng.randrange(2, 200)
        max_len = max_prompt + rng.randrange(1, 200)
        ex = tokenize_pair(tok, row["id"], form, prompt, response, max_length=max_len,
                           max_prompt_length=max_prompt)
        full_prompt = tok(prompt)["input_ids"]
        full_response = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert len(ex.input_ids) <= max_len and ex.prompt_tokens <= max_prompt
        assert ex.prompt_tokens == min(len(full_prompt), max_prompt)
        tail = ex.input_ids[int(bos):ex.prompt_tokens]
        assert full_prompt[len(full_prompt) - len(tail):] == tail
        assert response_ids(ex) == full_response[:len(response_ids(ex))]
        assert ex.truncated == (len(full_prompt) > max_prompt
                                or len(response_ids(ex)) < len(full_response))
        assert sum(ex.response_mask) == len(ex.input_ids) - ex.prompt_tokens >= 1
        check_offsets(tok, ex, prompt)


# --------------------------------------------------------------------------- checks
def test_the_real_tokenizers_pass_the_check(tok):
    check_tokenizer(tok, "student")
    assert pad_token_id(tok) == (tok.pad_token_id if tok.pad_token_id is not None
                                 else tok.eos_token_id)


def test_pad_falls_back_to_eos_for_gpt2(gpt2):
    assert gpt2.pad_token_id is None
    assert pad_token_id(gpt2) == gpt2.eos_token_id == 50256


def test_a_tokenizer_without_eos_is_refused(gpt2):
    tok = copy.deepcopy(gpt2)
    tok.eos_token = None
    assert tok.eos_token_id is None
    with pytest.raises(TokenizerError, match="teacher tokenizer has no eos token.*eos_token"):
        check_tokenizer(tok, "teacher")
    with pytest.raises(TokenizerError, match="no eos token"):
        tokenize_pair(tok, "x", "standard", "p", "r", max_length=16, max_prompt_length=8)


def test_a_slow_tokenizer_is_refused():
    class Slow:
        eos_token_id = 0
        is_fast = False

    with pytest.raises(TokenizerError, match="slow .*tokenizer.json"):
        check_tokenizer(Slow(), "student")
