"""Metrics against an independent ROUGE-L (token LCS by dynamic programming) and edge cases."""
from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest

from cot2align_core.metrics import (
    exact_match,
    normalize_answer,
    rouge_l,
    score_generations,
    summarize,
)


# ---------------------------------------------------------------------------------------------
# an independent ROUGE-L: same tokenisation rule as Lin's ROUGE / rouge_score, LCS by DP


def _naive_tokens(text: str, stem=None) -> list[str]:
    words = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    if stem is not None:
        words = [stem(w) if len(w) > 3 else w for w in words]
    return words


def _lcs(a: list[str], b: list[str]) -> int:
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            dp[i][j] = dp[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(dp[i - 1][j],
                                                                               dp[i][j - 1])
    return dp[-1][-1]


def _naive_rouge_l(pred: str, ref: str, stem=None) -> float:
    p, r = _naive_tokens(pred, stem), _naive_tokens(ref, stem)
    if not p or not r:
        return 0.0
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 100.0 * 2 * prec * rec / (prec + rec)


def test_known_value():
    # LCS "the cat on the mat" = 5 of 6 tokens on both sides.
    assert rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == [
        pytest.approx(100 * 5 / 6)]
    assert rouge_l(["identical text here"], ["identical text here"]) == [pytest.approx(100.0)]
    assert rouge_l(["abc def"], ["ghi jkl"]) == [0.0]


def test_matches_naive_lcs_where_stemming_cannot_matter():
    # Words of at most 3 characters are never stemmed, so the naive version needs no stemmer.
    rng = random.Random(0)
    vocab = ["a", "the", "cat", "dog", "on", "in", "is", "sat", "mat", "ran", "9", "42", "ox"]
    preds, refs = [], []
    for _ in range(200):
        preds.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 25))))
        refs.append(", ".join(rng.choice(vocab).upper() for _ in range(rng.randint(0, 25))))
    got = rouge_l(preds, refs)
    want = [_naive_rouge_l(p, r) for p, r in zip(preds, refs)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_matches_naive_lcs_with_the_porter_stemmer():
    from nltk.stem import porter  # rouge_score depends on nltk for its stemmer

    stem = porter.PorterStemmer().stem
    pairs = [
        ("The students were running quickly to their classes",
         "A student runs quick to the class"),
        ("Reasoning step by step, the answers are computed.",
         "We compute the answer by reasoning in steps"),
        ("Generated responses sometimes repeat repeated repeating words",
         "repeats of words in generation"),
    ]
    preds, refs = zip(*pairs)
    got = rouge_l(list(preds), list(refs))
    want = [_naive_rouge_l(p, r, stem) for p, r in pairs]
    np.testing.assert_allclose(got, want, atol=1e-9)
    # and the stemmer is really on: "running" and "runs" meet at "run"
    assert rouge_l(["running"], ["runs"]) == [pytest.approx(100.0)]


def test_whole_response_not_sentence_split():
    # rougeL (whole text), not rougeLsum (per line): the LCS crosses the newline.
    assert rouge_l(["a b\nc d"], ["a b c d"]) == [pytest.approx(100.0)]
    assert rouge_l(["c d\na b"], ["a b c d"]) == [pytest.approx(50.0)]


def test_symmetric_f_measure_and_range():
    a, b = "one two three four five", "two four six"
    assert rouge_l([a], [b]) == pytest.approx(rouge_l([b], [a]))
    assert 0.0 <= rouge_l([a], [b])[0] <= 100.0


def test_empty_prediction_reference_and_both():
    assert rouge_l([""], ["some reference"]) == [0.0]
    assert rouge_l(["some prediction"], [""]) == [0.0]
    # rouge_score's convention, kept for comparability: no tokens on either side scores 0.
    assert rouge_l([""], [""]) == [0.0]
    assert rouge_l(["   \n\t"], ["!!!"]) == [0.0]
    assert rouge_l([], []) == []


def test_unicode():
    # Non-ASCII characters are separators for rouge_score's tokenizer ("café" -> "caf").
    assert rouge_l(["Café au lait"], ["cafe au lait"]) == pytest.approx(
        [_naive_rouge_l("Café au lait", "cafe au lait")])
    assert rouge_l(["Café au lait"], ["cafe au lait"])[0] == pytest.approx(100 * 2 / 3)
    # Text without ASCII letters or digits has no tokens at all.
    assert rouge_l(["日本語のテキスト"], ["日本語のテキスト"]) == [0.0]
    assert rouge_l(["the answer is 42 🎉"], ["The answer is 42."]) == [pytest.approx(100.0)]


def test_multiple_references_take_the_best():
    got = rouge_l(["the cat sat"], [["dog ran", "the cat sat", "cat"]])
    assert got == [pytest.approx(100.0)]
    assert rouge_l(["x y"], [("z",)]) == [0.0]
    with pytest.raises(ValueError, match="empty list"):
        rouge_l(["x"], [[]])


def test_input_validation():
    with pytest.raises(ValueError, match="pair up"):
        rouge_l(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="not a string"):
        rouge_l("abc", "abc")
    with pytest.raises(TypeError, match="prediction 1"):
        rouge_l(["a", None], ["a", "b"])
    with pytest.raises(TypeError, match="reference 0"):
        rouge_l(["a"], [[1]])


# ---------------------------------------------------------------------------------------------
# exact match


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("  Paris. ", "paris"),
        ("New\n  York\tCity", "new york city"),
        ("3.5", "3.5"),
        ("Yes...", "yes"),
        ("e\u0301t\u00e9", "\u00e9t\u00e9"),  # decomposed and composed accents compare equal
        ("ＡＢＣ１２", "abc12"),  # full-width forms (NFKC)
        ("", ""),
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_basic():
    preds = ["Paris.", "paris", "Lyon", "  PARIS  ", ""]
    refs = ["Paris", "Paris", "Paris", "paris.", ""]
    assert exact_match(preds, refs) == [100.0, 100.0, 0.0, 100.0, 100.0]
    assert exact_match(["Paris."], ["Paris"], normalize=None) == [0.0]
    assert exact_match(["b"], [["a", "B"]]) == [100.0]


def test_exact_match_with_extractor():
    def extract(response: str):
        marker = "Therefore, the answer is:"
        return response.rsplit(marker, 1)[1] if marker in response else None

    preds = [
        "Step 1: ... Step 2: ...\nTherefore, the answer is: 42.",
        "I am not sure.",
        "Therefore, the answer is: 41",
    ]
    assert exact_match(preds, ["42", "I am not sure.", "42"], extract=extract) == [100.0, 0.0,
                                                                                   0.0]


def test_score_generations():
    out = score_generations(["the cat sat", "Paris."], ["the cat sat", "paris"])
    assert out["exact_match"] == pytest.approx(100.0)
    assert out["rougeL"] == pytest.approx(100.0)
    out = score_generations(["a", "b"], ["a", "c"])
    assert out == {"rougeL": pytest.approx(50.0), "exact_match": pytest.approx(50.0)}
    with pytest.raises(ValueError):
        score_generations([], [])


# ---------------------------------------------------------------------------------------------
# summary over seeds


def test_summarize_mean_and_sample_std():
    per_seed = {s: {"rougeL": v, "exact_match": v / 10} for s, v in
                zip([3, 1, 2, 5, 4], [24.1, 25.3, 23.9, 24.8, 25.0])}
    out = summarize(per_seed)
    vals = np.array([25.3, 23.9, 24.1, 25.0, 24.8])  # by increasing seed
    assert list(out) == ["rougeL", "exact_match"]
    assert out["rougeL"]["mean"] == pytest.approx(vals.mean())
    assert out["rougeL"]["std"] == pytest.approx(vals.std(ddof=1))
    assert out["rougeL"]["std"] != pytest.approx(vals.std(ddof=0))
    assert out["rougeL"]["n_seeds"] == 5
    assert list(out["rougeL"]["values"]) == [1, 2, 3, 4, 5]
    assert list(out["rougeL"]["values"].values()) == pytest.approx(list(vals))
    assert out["exact_match"]["mean"] == pytest.approx(vals.mean() / 10)


def test_summarize_single_seed_std_is_nan():
    out = summarize({0: {"rougeL": 21.5}})
    assert out["rougeL"]["mean"] == 21.5
    assert math.isnan(out["rougeL"]["std"])
    assert out["rougeL"]["n_seeds"] == 1


def test_summarize_identical_seeds_and_non_finite():
    assert summarize({0: {"m": 2.0}, 1: {"m": 2.0}})["m"]["std"] == 0.0
    out = summarize({0: {"m": 1.0}, 1: {"m": float("nan")}})
    assert math.isnan(out["m"]["mean"]) and math.isnan(out["m"]["std"])


def test_summarize_rejects_bad_input():
    with pytest.raises(ValueError, match="no seeds"):
        summarize({})
    with pytest.raises(ValueError, match="seed 1"):
        summarize({0: {"a": 1.0, "b": 2.0}, 1: {"a": 1.0}})
