"""Evaluation metrics: ROUGE-L, exact match, and their summary over seeds.

The paper's number is ROUGE-L F-measure x 100 computed by Google's ``rouge_score`` package with
the Porter stemmer on, on the whole generated response (``rougeL``, not the newline-split
``rougeLsum``), averaged over the test set, for each of 5 sampling seeds; the table reports the
mean and standard deviation over seeds. DSKD's evaluation (which the authors reuse) scores each
prediction against its references and keeps the best (max over references); here a reference
may be one string or a list of strings, with the same rule.

Conventions kept from ``rouge_score`` on purpose, so that the numbers compare with the paper:

- Its tokenizer lower-cases, replaces every character outside ``[a-z0-9]`` by a space and
  stems words longer than 3 characters. Text without any ASCII letter or digit (empty, or
  e.g. only CJK characters) therefore has no tokens, and its score is 0 -- also when both the
  prediction and the reference are empty.
- F-measure is the harmonic mean of LCS precision and recall (beta = 1).

Functions are pure: lists in, lists of per-example floats out (so that a caller can store them
beside the generations and aggregate however it wants).
"""
from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "rouge_l",
    "normalize_answer",
    "exact_match",
    "score_generations",
    "summarize",
]

Reference = str | Sequence[str]


@functools.cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _check_pairs(predictions: Sequence, references: Sequence) -> None:
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be sequences of strings, not a string")
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references: they must pair up"
        )
    for i, p in enumerate(predictions):
        if not isinstance(p, str):
            raise TypeError(f"prediction {i} is {type(p).__name__}, expected str")


def _as_reference_list(ref: Reference, i: int) -> list[str]:
    refs = [ref] if isinstance(ref, str) else list(ref)
    if not refs:
        raise ValueError(f"reference {i} is an empty list: give at least one reference string")
    for r in refs:
        if not isinstance(r, str):
            raise TypeError(f"reference {i} holds a {type(r).__name__}, expected str")
    return refs


def rouge_l(predictions: Sequence[str], references: Sequence[Reference]) -> list[float]:
    """Per-example ROUGE-L F-measure x 100 (``rouge_score``, ``rougeL``, stemmer on).

    Args:
        predictions: generated responses, one per example.
        references: one reference string per example, or a list of references per example
            (the best score over them is kept, as DSKD's ``metric_max_over_ground_truths``).

    Returns:
        ``len(predictions)`` floats in [0, 100]. The corpus score is their mean.
    """
    _check_pairs(predictions, references)
    scorer = _scorer()
    out = []
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        best = max(scorer.score(r, pred)["rougeL"].fmeasure for r in _as_reference_list(ref, i))
        out.append(100.0 * best)
    return out


_WS = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Normalise a short answer for exact match.

    Unicode NFKC (so composed and decomposed forms, full-width digits... compare equal), strip,
    lower-case, collapse every run of whitespace to one space, drop trailing periods
    (``"Paris."`` == ``"paris"``). Other punctuation and articles are kept: "3.5" and "3,5"
    stay different.
    """
    text = unicodedata.normalize("NFKC", text)
    text = _WS.sub(" ", text.strip().lower())
    return text.rstrip(".").rstrip()


def exact_match(
    predictions: Sequence[str],
    references: Sequence[Reference],
    normalize: Callable[[str], str] | None = normalize_answer,
    extract: Callable[[str], str | None] | None = None,
) -> list[float]:
    """Per-example exact match, 100.0 or 0.0.

    Args:
        predictions: generated responses.
        references: gold answers (a string, or a list of acceptable answers, per example).
        normalize: applied to both sides before comparing; ``None`` compares raw strings.
        extract: parses the final answer out of a generated response (e.g. the text after
            "Therefore, the answer is:"); applied to predictions only, before ``normalize``.
            An extractor returning ``None`` (no answer found) scores 0.

    Returns:
        ``len(predictions)`` floats, each 100.0 (match) or 0.0.
    """
    _check_pairs(predictions, references)
    norm = normalize if normalize is not None else (lambda s: s)
    out = []
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        answer = extract(pred) if extract is not None else pred
        if answer is None:
            out.append(0.0)
            continue
        answer = norm(answer)
        hit = any(answer == norm(r) for r in _as_reference_list(ref, i))
        out.append(100.0 if hit else 0.0)
    return out


def score_generations(
    predictions: Sequence[str],
    references: Sequence[Reference],
    extract: Callable[[str], str | None] | None = None,
) -> dict[str, float]:
    """Corpus scores of one model and one seed: ``{"rougeL": mean, "exact_match": mean}``.

    Both are means of the per-example values above (x 100). An empty corpus raises.
    """
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    rl = rouge_l(predictions, references)
    em = exact_match(predictions, references, extract=extract)
    return {"rougeL": sum(rl) / len(rl), "exact_match": sum(em) / len(em)}


def summarize(per_seed: Mapping[int, Mapping[str, float]]) -> dict[str, dict]:
    """Mean and standard deviation of each metric over seeds.

    Args:
        per_seed: ``{seed: {metric: corpus score}}``; every seed must carry the same metrics.

    Returns:
        ``{metric: {"mean": float, "std": float, "n_seeds": int, "values": {seed: float}}}``,
        metrics in the order of the first seed, ``values`` by increasing seed.

    ``std`` is the *sample* standard deviation (ddof = 1), the usual convention when papers
    report "mean +- std over N seeds". It is undefined for a single seed and is then
    ``float("nan")`` (rendered "n/a" by :mod:`cot2align_core.report`), never 0, which would
    read as "perfectly stable". Non-finite scores are kept and propagate to mean and std.
    """
    if not per_seed:
        raise ValueError("no seeds to summarize")
    seeds = sorted(per_seed)
    metrics = list(per_seed[seeds[0]])
    for s in seeds[1:]:
        if set(per_seed[s]) != set(metrics):
            raise ValueError(
                f"seed {s} has metrics {sorted(per_seed[s])}, seed {seeds[0]} has {sorted(metrics)}"
            )
    out: dict[str, dict] = {}
    for m in metrics:
        values = [float(per_seed[s][m]) for s in seeds]
        arr = np.asarray(values, dtype=np.float64)
        with np.errstate(invalid="ignore"):  # inf - inf in std: nan, as documented
            mean = float(arr.mean())
            std = float(arr.std(ddof=1)) if len(values) > 1 else float("nan")
        out[m] = {
            "mean": mean,
            "std": std,
            "n_seeds": len(values),
            "values": dict(zip(seeds, values)),
        }
    return out
