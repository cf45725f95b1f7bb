"""Dual tokenisation with the paper's real tokenizers (GPT-2: no bos; TinyLlama: bos, SentencePiece
pieces; Qwen1.5: byte-level BPE without bos) and with BPE, WordPiece and unigram tokenizers trained
here, on Dolly rows in both forms: the sequence is the joint tokenization of prompt + response."""
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
    prompt_token_ids,
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


# --------------------------------------------------------------------------- the joint text
TRAINED = ("bpe", "wordpiece", "unigram")


@pytest.fixture(scope="module")
def trained(dolly_rows):
    """Tokenizers trained here on Dolly texts (both forms), as the prepare stage trains them."""
    from cot2align_core.modeling import train_tokenizer
    from cot2align_core.sft_data import tokenizer_corpus

    corpus = tokenizer_corpus([dict(r, rationale=RATIONALE) for r in dolly_rows[:120]])
    return {kind: train_tokenizer(corpus, kind, 1500) for kind in TRAINED}


@pytest.fixture(scope="module")
def real(shared_tokenizer_dir):
    from transformers import AutoTokenizer

    return {n: AutoTokenizer.from_pretrained(str(shared_tokenizer_dir(n))) for n in NAMES}


def test_joint_encoding_is_prompt_plus_response_for_every_dolly_row(real, trained, dolly_rows):
    """For every Dolly row in both forms and every tokenizer: the encoding of prompt + response
    is exactly prompt ids + response ids, the prompt ids are what an engine is given, and the
    response mask decodes to exactly the response (+ eos)."""
    for name, tok in {**real, **trained}.items():
        bos = [tok.bos_token_id] if adds_bos(tok) else []
        unknown = 0
        for row, form, (prompt, response) in examples(dolly_rows):
            ex = tokenize_pair(tok, row["id"], form, prompt, response, max_length=BIG)
            joint = tok(prompt + response, add_special_tokens=False)["input_ids"]
            assert ex.input_ids == bos + joint + [tok.eos_token_id], (name, row["id"], form)
            assert ex.input_ids[:ex.prompt_tokens] == prompt_token_ids(tok, prompt), (name, row["id"])
            assert not ex.straddles and not ex.truncated
            masked = [t for t, m in zip(ex.input_ids, ex.response_mask) if m]
            if tok.unk_token_id not in (None, tok.eos_token_id) and tok.unk_token_id in masked:
                unknown += 1  # characters a small trained vocabulary lacks (e.g. "ė" in "Klaipėda")
                continue
            assert tok.decode(masked) == response + tok.eos_token, (name, row["id"], form)
        assert unknown <= (0 if name in real else 100), (name, unknown)


def test_separate_encoding_differed_for_sentencepiece(real, dolly_rows):
    """What the joint encoding fixes: encoding the response on its own puts a "▁" piece in
    front of it with TinyLlama's tokenizer, in every row; GPT-2 and Qwen are unaffected."""
    for name, tok in real.items():
        differ = 0
        for row, form, (prompt, response) in examples(dolly_rows[:200]):
            separate = tok(prompt, add_special_tokens=False)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"]
            differ += separate != tok(prompt + response, add_special_tokens=False)["input_ids"]
        assert differ == (400 if "tinyllama" in name else 0), (name, differ)


def test_a_straddling_token_belongs_to_the_response(trained, dolly_rows):
    """A tokenizer whose merges cross the prompt's end (the trained BPE without its prompt-end
    pre-token boundary): the straddling token is the response's first, the sequence is still
    the joint encoding, and ``straddles`` says so. The boundary in the trained tokenizer makes
    the joint encoding equal the prompt's own tokens + the response's."""
    from tokenizers import pre_tokenizers

    from cot2align_core.modeling import _DIGIT_RUNS

    tok = trained["bpe"]
    plain = copy.deepcopy(tok)
    plain.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [_DIGIT_RUNS, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    straddled = 0
    for row, form, (prompt, response) in examples(dolly_rows[:200]):
        ex = tokenize_pair(plain, row["id"], form, prompt, response, max_length=BIG)
        assert ex.input_ids == [1] + plain(prompt + response, add_special_tokens=False)["input_ids"] + [2]
        k = ex.prompt_tokens
        assert max(ex.offsets_end[:k]) <= len(prompt)
        if ex.straddles:
            straddled += 1
            assert ex.offsets_start[k] < len(prompt) < ex.offsets_end[k]
            assert ex.input_ids[:k] != prompt_token_ids(plain, prompt)
        same = tokenize_pair(tok, row["id"], form, prompt, response, max_length=BIG)
        separate = tok(prompt)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"]
        assert not same.straddles and same.input_ids == separate + [2]
    assert straddled > 100  # of 400 (measured: about half of all Dolly examples)


def test_a_prompt_longer_than_max_prompt_length_is_an_error_not_cut(tok, dolly_rows):
    row = dict(max(dolly_rows, key=lambda r: len(r["input"])))
    prompt, response = format_row(row, "standard")
    with pytest.raises(TokenizerError, match="fit_example") as info:
        tokenize_pair(tok, row["id"], "standard", prompt, response, max_length=BIG, max_prompt_length=48)
    assert row["id"] in str(info.value)
    n = len(prompt_token_ids(tok, prompt))
    ex = tokenize_pair(tok, row["id"], "standard", prompt, response, max_length=BIG, max_prompt_length=n)
    assert ex.prompt_tokens == n


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
        full_prompt = prompt_token_ids(tok, prompt)
        max_len = len(full_prompt) + rng.randrange(1, 200)
        ex = tokenize_pair(tok, row["id"], form, prompt, response, max_length=max_len)
        joint = tok(prompt + response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert len(ex.input_ids) <= max_len and ex.prompt_tokens == len(full_prompt)
        assert ex.input_ids == ([tok.bos_token_id] if bos else []) + joint[:len(ex.input_ids) - bos]
        assert ex.truncated == (len(ex.input_ids) < len(joint) + bos)
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
