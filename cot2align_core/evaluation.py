r"""Scoring students the way the paper does, and saying how sure a difference is.

Generation: every model answers every eval prompt in each form (standard: the Alpaca prompt;
cot: the CoT prompt), greedily and/or sampled at temperature 1 with several decoding seeds
(each prompt's seed derives from (seed, example id), so an answer does not depend on its batch).
Scores per answer: ROUGE-L F x100 of the answer (for the CoT form, the line after "Therefore,
the answer is:") against the gold output, and exact match when the dataset's answers are
checkable (:mod:`cot2align_core.answers`).

Aggregation over *training* seeds (the variance that matters for a method claim): a student
trained with seeds :math:`s = 1..S` has, per seed, its corpus score (sampled decoding: the mean
over decoding seeds); the table reports mean and sample std over :math:`s`.

Paired differences: student A against reference B (the SFT student, the KD base alone) on the
same rows and the same training seeds, :math:`d_{s,i} = x^A_{s,i} - x^B_{s,i}`. The estimate is
the mean of :math:`d`; its 95% interval is the percentile bootstrap over training seeds and eval
rows resampled independently with replacement (a two-level bootstrap: both the training noise
and the finite eval set are in the interval).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cot2align_core.answers import AnswerChecker, split_rationale
from cot2align_core.metrics import rouge_l
from cot2align_core.prompts import cot_prompt, standard_prompt

METRICS = ("exact_match", "rougeL")


def prompt_of(row: Mapping, form: str) -> str:
    return cot_prompt(row) if form == "cot" else standard_prompt(row)


def answer_of(generation: str, form: str) -> str:
    """What ROUGE-L scores: the whole answer (standard form) or the line after the CoT's
    "Therefore, the answer is:"."""
    return split_rationale(generation)[1] if form == "cot" else generation.strip()


def score_answers(texts: Sequence[str], rows: Sequence[Mapping], form: str,
                  checker: AnswerChecker | None) -> list[dict[str, Any]]:
    """Per answer: ``prediction``, ``rougeL`` and ``exact_match`` (None without a checker)."""
    preds = [answer_of(t, form) for t in texts]
    refs = [str(r["output"]) for r in rows]
    rouge = rouge_l(preds, refs)
    out = []
    for text, pred, ref, rg in zip(texts, preds, refs, rouge):
        em = None if checker is None else checker.score(text, ref)
        out.append({"prediction": pred, "rougeL": rg, "exact_match": em})
    return out


@dataclass(frozen=True)
class Decoding:
    """One decoding pass: ``greedy`` (seed 0) or ``sampled`` with its seed."""

    kind: str
    seed: int


def decodings(kinds: Sequence[str], seeds: Sequence[int]) -> list[Decoding]:
    out = []
    for kind in kinds:
        out += [Decoding("greedy", 0)] if kind == "greedy" else [Decoding("sampled", s) for s in seeds]
    return out


def generate_answers(backend, rows: Sequence[Mapping], *, forms: Sequence[str],
                     passes: Sequence[Decoding], max_tokens: int, temperature: float = 1.0,
                     top_p: float = 1.0, checker: AnswerChecker | None = None
                     ) -> list[dict[str, Any]]:
    """Every row answered in every form and decoding pass by one model's ``backend``.

    Returns one dict per (form, pass, row): form, decoding, seed, id, prompt, reference,
    generation, prediction, rougeL, exact_match.
    """
    from cot2align_core.generation import SamplingConfig, derive_seed

    out = []
    for form in forms:
        prompts = [prompt_of(r, form) for r in rows]
        for p in passes:
            greedy = p.kind == "greedy"
            sampling = SamplingConfig(n=1, temperature=0.0 if greedy else temperature,
                                      top_p=1.0 if greedy else top_p, max_tokens=max_tokens,
                                      seed=p.seed)
            gens = backend.generate(prompts, sampling, [derive_seed(p.seed, r["id"]) for r in rows],
                                    ids=[r["id"] for r in rows])
            texts = [g[0].text if g else "" for g in gens]
            scores = score_answers(texts, rows, form, checker)
            out += [dict(form=form, decoding=p.kind, seed=p.seed, id=r["id"], prompt=pr,
                         reference=str(r["output"]), generation=t, **sc)
                    for r, pr, t, sc in zip(rows, prompts, texts, scores)]
    return out


def greedy_score(model, tokenizer, rows: Sequence[Mapping], forms: Sequence[str], *,
                 metric: str, max_tokens: int, checker: AnswerChecker | None,
                 batch_size: int = 64) -> dict[str, float]:
    """Mean greedy ``metric`` of a model in memory, per form and overall (``score``).

    What checkpoint selection on the dev split and the teacher's SFT check call."""
    from cot2align_core.generation import HFBackend, HFOptions

    backend = HFBackend(model, tokenizer, HFOptions(batch_size=batch_size))
    rows_out = generate_answers(backend, rows, forms=forms, passes=[Decoding("greedy", 0)],
                                max_tokens=max_tokens, checker=checker)
    per_form = {f: float(np.mean([r[metric] for r in rows_out if r["form"] == f])) for f in forms}
    return {**{f"{metric}/{f}": v for f, v in per_form.items()},
            "score": float(np.mean(list(per_form.values())))}


# -------------------------------------------------------------------------- aggregation
def _per_row(generations: Sequence[Mapping], metric: str) -> dict[tuple, dict[str, float]]:
    """(model, form, decoding, seed_of_model) -> {example id: score}, sampled passes averaged."""
    acc: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for g in generations:
        if g[metric] is None:
            continue
        acc[(g["model"], g["form"], g["decoding"], g["seed_of_model"])][g["id"]].append(g[metric])
    return {k: {i: float(np.mean(v)) for i, v in rows.items()} for k, rows in acc.items()}


def summary_table(generations: Sequence[Mapping]) -> list[dict[str, Any]]:
    """Rows ``(model, form, decoding, metric, mean, std, n_seeds)``: mean and sample std over
    the model's training seeds of its corpus score (std is NaN for one seed)."""
    table = []
    for metric in METRICS:
        groups: dict[tuple, list[float]] = defaultdict(list)
        for (model, form, dec, seed), rows in sorted(_per_row(generations, metric).items(),
                                                    key=lambda kv: str(kv[0])):
            groups[(model, form, dec)].append(float(np.mean(list(rows.values()))))
        for (model, form, dec), values in groups.items():
            arr = np.asarray(values)
            table.append(dict(model=model, form=form, decoding=dec, metric=metric,
                              mean=float(arr.mean()),
                              std=float(arr.std(ddof=1)) if len(arr) > 1 else float("nan"),
                              n_seeds=len(arr)))
    return table


def paired_difference(a: Mapping[Any, Mapping[str, float]], b: Mapping[Any, Mapping[str, float]],
                      *, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean of ``a - b`` over shared training seeds and rows, with a 95% bootstrap interval.

    ``a``, ``b``: training seed -> {example id: score}. Seeds and rows are paired by key; the
    interval resamples seeds and rows independently with replacement.
    """
    seeds = sorted(set(a) & set(b), key=str)
    if not seeds:
        raise ValueError("no training seed is shared by the two models")
    ids = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds)))
    if not ids:
        raise ValueError("the two models share no scored eval row")
    d = np.array([[a[s][i] - b[s][i] for i in ids] for s in seeds])  # [S, N]
    rng = np.random.default_rng(seed)
    S, N = d.shape
    boots = np.empty(n_boot)
    for k in range(n_boot):
        boots[k] = d[rng.integers(0, S, S)][:, rng.integers(0, N, N)].mean()
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"diff": float(d.mean()), "low": float(lo), "high": float(hi), "n_seeds": S, "n_rows": N}


def paired_differences(generations: Sequence[Mapping], pairs: Sequence[tuple[str, str]], *,
                       n_boot: int = 1000) -> list[dict[str, Any]]:
    """One row per (model, reference, form, decoding, metric) of :func:`paired_difference`."""
    out = []
    for metric in METRICS:
        per_row = _per_row(generations, metric)
        by_model: dict[tuple, dict] = defaultdict(dict)
        for (model, form, dec, seed), rows in per_row.items():
            by_model[(model, form, dec)][seed] = rows
        for model, ref in pairs:
            for (m, form, dec), seeds in sorted(by_model.items()):
                if m != model or (ref, form, dec) not in by_model:
                    continue
                diff = paired_difference(seeds, by_model[(ref, form, dec)], n_boot=n_boot)
                out.append(dict(model=model, reference=ref, form=form, decoding=dec,
                                metric=metric, **diff))
    return out


def reference_pairs(objectives: Mapping[str, Any],
                    is_sft: Callable[[Any], bool], kd_only_of: Callable[[Any, Any], bool]
                    ) -> list[tuple[str, str]]:
    """(student, reference) pairs: every student against each SFT-only student and against
    the student trained with its KD base alone."""
    sft = [k for k, o in objectives.items() if is_sft(o)]
    pairs = []
    for label, o in objectives.items():
        if label in sft:
            continue
        pairs += [(label, r) for r in sft]
        pairs += [(label, r) for r, ro in objectives.items()
                  if r != label and kd_only_of(ro, o)]
    return pairs
