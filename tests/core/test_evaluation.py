"""Scoring and aggregation over training seeds, paired differences with bootstrap intervals,
and the answer checkers, against naive references on fresh random data."""
from __future__ import annotations

import numpy as np
import pytest

from cot2align_core.answers import checker, split_rationale
from cot2align_core.evaluation import (Decoding, decodings, paired_difference,
                                       paired_differences, reference_pairs, score_answers,
                                       summary_table)


# ------------------------------------------------------------------------------ answers
@pytest.mark.parametrize("text, rationale, answer", [
    ("7 + 5 = 12\n12 - 3 = 9\nTherefore, the answer is: 9", "7 + 5 = 12\n12 - 3 = 9", "9"),
    ("no marker here", "no marker here", ""),
    ("a\nTherefore, the answer is: 3\nTherefore, the answer is: 4\nmore", "a\nTherefore, the "
     "answer is: 3", "4"),
    ("x therefore, THE ANSWER IS:   \n  5 apples", "x", "5 apples"),
])
def test_split_rationale(text, rationale, answer):
    assert split_rationale(text) == (rationale, answer)


def test_number_checker_agrees_with_the_demo_tasks_own():
    from cot2align_core.demo_task import extract_answer, is_correct

    check = checker("number")
    cases = ["9", " 12.", "Therefore, the answer is: 007", "x\nTherefore, the answer is: -3 and",
             "", "\n\n", "seven", "1 + 2 = 3\nTherefore, the answer is: 3", None]
    for text in cases:
        assert check.extract(text) == extract_answer(text), text
        for gold in ("9", "12", "7", "-3", "seven", "3"):
            assert check.correct(check.extract(text), gold) == \
                is_correct(extract_answer(text), gold), (text, gold)


def test_text_checker_normalises_case_space_and_final_period():
    check = checker("text")
    assert check.score("Paris.", "paris") == 100.0
    assert check.score("Therefore, the answer is:  New   York", "new york") == 100.0
    assert check.score("Rome", "paris") == 0.0
    assert check.score("", "x") == 0.0
    with pytest.raises(ValueError, match="unknown answer format 'int'"):
        checker("int")


def test_score_answers_reads_the_cot_answer_line():
    rows = [{"output": "9"}, {"output": "4"}]
    texts = ["1 + 8 = 9\nTherefore, the answer is: 9", "2 + 1 = 3\nTherefore, the answer is: 3"]
    out = score_answers(texts, rows, "cot", checker("number"))
    assert [o["prediction"] for o in out] == ["9", "3"]
    assert [o["exact_match"] for o in out] == [100.0, 0.0]
    assert out[0]["rougeL"] == 100.0 and out[1]["rougeL"] == 0.0
    assert all(o["exact_match"] is None for o in score_answers(texts, rows, "cot", None))


def test_decodings():
    assert decodings(["greedy", "sampled"], [3, 4]) == [
        Decoding("greedy", 0), Decoding("sampled", 3), Decoding("sampled", 4)]


# ------------------------------------------------------------------------- aggregation
def _generations(rng, models: dict[str, float], seeds, n_rows, dec_seeds=(0, 1)):
    """Scores drawn per (model, training seed, decoding seed, row) around a model's level."""
    out = []
    for model, level in models.items():
        for s in seeds:
            for d in dec_seeds:
                for i in range(n_rows):
                    em = float(rng.random() < level) * 100.0
                    out.append(dict(model=model, seed_of_model=s, form="standard",
                                    decoding="sampled", seed=d, id=f"r{i}", rougeL=em / 2,
                                    exact_match=em))
    return out


def test_summary_is_mean_and_std_over_training_seeds_of_decoding_averaged_scores():
    rng = np.random.default_rng(1)
    gens = _generations(rng, {"a": 0.6}, seeds=[0, 1, 2], n_rows=17, dec_seeds=(5, 6, 7))
    table = {r["metric"]: r for r in summary_table(gens)}
    per_seed = []
    for s in (0, 1, 2):
        vals = [g["exact_match"] for g in gens if g["seed_of_model"] == s]
        per_seed.append(np.mean(vals))  # equal rows per decoding seed: the same as nested means
    assert table["exact_match"]["mean"] == pytest.approx(np.mean(per_seed))
    assert table["exact_match"]["std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert table["exact_match"]["n_seeds"] == 3
    one = summary_table(_generations(rng, {"t": 0.5}, seeds=[None], n_rows=5))
    assert all(np.isnan(r["std"]) and r["n_seeds"] == 1 for r in one)


def test_paired_difference_matches_a_naive_mean_and_covers_a_known_effect():
    rng = np.random.default_rng(7)
    S, N = 3, 200
    a = {s: {f"r{i}": float(rng.normal(1.0, 2.0)) for i in range(N)} for s in range(S)}
    b = {s: {k: v - 1.0 + float(rng.normal(0, 0.5)) for k, v in rows.items()}
         for s, rows in a.items()}
    out = paired_difference(a, b, n_boot=2000, seed=3)
    naive = np.mean([a[s][k] - b[s][k] for s in range(S) for k in a[s]])
    assert out["diff"] == pytest.approx(naive)
    assert out["low"] < 1.0 < out["high"]  # the true effect is 1.0
    assert out["low"] < out["diff"] < out["high"]
    assert (out["n_seeds"], out["n_rows"]) == (S, N)
    assert paired_difference(a, b, n_boot=2000, seed=3) == out  # seeded: reproducible


def test_a_difference_over_more_rows_has_a_narrower_interval():
    rng = np.random.default_rng(11)

    def width(n):
        a = {0: {str(i): float(rng.normal()) for i in range(n)},
             1: {str(i): float(rng.normal()) for i in range(n)}}
        b = {s: {k: 0.0 for k in rows} for s, rows in a.items()}
        out = paired_difference(a, b, n_boot=1000)
        return out["high"] - out["low"]

    assert width(1000) < width(50) / 2


def test_paired_differences_pair_by_seed_and_row_and_refuse_disjoint_models():
    rng = np.random.default_rng(2)
    gens = _generations(rng, {"ot": 0.8, "sft": 0.4}, seeds=[0, 1], n_rows=40)
    rows = paired_differences(gens, [("ot", "sft")], n_boot=300)
    em = next(r for r in rows if r["metric"] == "exact_match")
    assert em["model"] == "ot" and em["reference"] == "sft" and em["n_rows"] == 40
    assert em["low"] > 0  # 0.8 vs 0.4 over 160 paired scores: clearly positive
    with pytest.raises(ValueError, match="no training seed is shared"):
        paired_difference({0: {"a": 1.0}}, {1: {"a": 1.0}})


def test_reference_pairs_compare_with_sft_and_the_kd_base_alone():
    class O:  # the three properties the pairing reads
        def __init__(self, kd, ot, base="dskd"):
            self.uses_kd, self.uses_ot, self.kd_base = kd, ot, base

    objectives = {"cot2align": O(True, True), "sft": O(False, False), "dskd": O(True, False),
                  "uld": O(True, False, "uld"), "uld_ot": O(True, True, "uld")}
    pairs = reference_pairs(objectives, is_sft=lambda o: not (o.uses_kd or o.uses_ot),
                            kd_only_of=lambda r, o: (r.uses_kd and not r.uses_ot and o.uses_ot
                                                     and r.kd_base == o.kd_base))
    assert set(pairs) == {("cot2align", "sft"), ("cot2align", "dskd"), ("dskd", "sft"),
                          ("uld", "sft"), ("uld_ot", "sft"), ("uld_ot", "uld")}
