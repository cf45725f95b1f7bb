"""Fitting an example into the token budgets without losing its meaning.

A prompt is the template, the row's instruction and the row's input. When it is longer than
``max_prompt_length`` tokens for any of the tokenizers it is read with (teacher and student),
the row's ``input`` is cut, from its end (``"end"``: keep its beginning) or from its middle
(``"middle"``: keep its beginning and its end), at a space where there is one, and the cut is
marked with ``" ... "``. The instruction and the template are never cut. The kept length is the
longest (binary search on characters) whose prompt fits every tokenizer, so teacher and student
read the same text, and the response is rendered from the cut row. When the instruction and
the template alone do not fit (the input cut to nothing), the example is dropped, with its
reason. Prompt tokens are counted as an engine is given them
(:func:`cot2align_core.tokenization.prompt_token_ids`, bos included).

The stages call :func:`fit_prompt` (generate, evaluate: the prompt text) or :func:`fit_example`
(tokenize, teacher_sft: the tokenized sequences) for every example and add each result to a
:class:`FitStats`, which counts what was cut and what was dropped and why, for the manifest
and for one log line per stage.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from cot2align_core.prompts import cot_prompt, format_row, standard_prompt
from cot2align_core.tokenization import TokenizedExample, prompt_token_ids, tokenize_pair

TruncationMode = Literal["end", "middle"]
TRUNCATION_MODES = ("end", "middle")
ELLIPSIS = "..."


@dataclass(frozen=True)
class PromptFit:
    """A prompt that fits: ``row`` as rendered (its input cut when ``input_cut``), ``prompt``
    its text, ``prompt_tokens`` its length per tokenizer."""

    row: Mapping[str, Any]
    form: str
    prompt: str
    input_cut: bool
    prompt_tokens: Mapping[str, int]


@dataclass(frozen=True)
class FittedExample:
    """An example that fits: the prompt fit, the response text, and one tokenized sequence per
    tokenizer (``sides``). ``response_cut``: some side's response was cut on the right."""

    fit: PromptFit
    response: str
    sides: Mapping[str, TokenizedExample]

    @property
    def response_cut(self) -> bool:
        return any(ex.truncated for ex in self.sides.values())


@dataclass(frozen=True)
class Dropped:
    """An example left out. ``reason``: ``"prompt_too_long"`` (instruction + template alone
    exceed max_prompt_length), ``"response_too_long"`` (the response does not fit max_length
    and the caller drops such examples) or ``"no_room_for_response"`` (the prompt leaves no
    token of max_length)."""

    id: str
    form: str
    reason: str
    detail: str


@dataclass
class FitStats:
    """Counts of fitted examples: ``add`` every result, ``as_dict`` for the manifest."""

    examples: int = 0
    kept: int = 0
    input_truncated: int = 0
    response_truncated: int = 0
    straddled: int = 0
    dropped: Counter = field(default_factory=Counter)

    def add(self, result: PromptFit | FittedExample | Dropped):
        """Count ``result`` and return it."""
        self.examples += 1
        if isinstance(result, Dropped):
            self.dropped[result.reason] += 1
            return result
        self.kept += 1
        fit = result.fit if isinstance(result, FittedExample) else result
        self.input_truncated += fit.input_cut
        if isinstance(result, FittedExample):
            self.response_truncated += result.response_cut
            self.straddled += any(ex.straddles for ex in result.sides.values())
        return result

    def as_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "kept": self.kept, "input_truncated": self.input_truncated,
                "response_truncated": self.response_truncated, "straddled": self.straddled,
                "dropped": dict(sorted(self.dropped.items()))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FitStats":
        return cls(examples=d["examples"], kept=d["kept"], input_truncated=d["input_truncated"],
                   response_truncated=d["response_truncated"], straddled=d["straddled"],
                   dropped=Counter(d["dropped"]))

    def __iadd__(self, other: "FitStats") -> "FitStats":
        self.examples += other.examples
        self.kept += other.kept
        self.input_truncated += other.input_truncated
        self.response_truncated += other.response_truncated
        self.straddled += other.straddled
        self.dropped.update(other.dropped)
        return self

    def summary(self) -> dict[str, int]:
        """Flat counts for a stage summary (the report's stage table)."""
        return {"examples_kept": self.kept, "examples_dropped": sum(self.dropped.values()),
                "inputs_cut": self.input_truncated, "responses_cut": self.response_truncated}

    def log_line(self, stage: str) -> str:
        dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items())) or "none"
        return (f"{stage}: {self.kept} of {self.examples} examples kept; input cut in "
                f"{self.input_truncated}, response cut in {self.response_truncated}; dropped: {dropped}")


def _head(text: str, n: int) -> str:
    """The first ``n`` characters of ``text``, ending at the last space in them if any."""
    cut = text[:n]
    if n < len(text) and not text[n].isspace():
        space = max(cut.rfind(" "), cut.rfind("\n"), cut.rfind("\t"))
        cut = cut[:space] if space > 0 else cut
    return cut.rstrip()


def _tail(text: str, n: int) -> str:
    """The last ``n`` characters of ``text``, starting after a space in them if any."""
    if n <= 0:
        return ""
    cut = text[len(text) - n:]
    if n < len(text) and not text[len(text) - n - 1].isspace():
        spaces = [i for i in (cut.find(" "), cut.find("\n"), cut.find("\t")) if i >= 0]
        cut = cut[min(spaces) + 1:] if spaces and min(spaces) + 1 < len(cut) else cut
    return cut.lstrip()


def cut_input(text: str, keep: int, mode: TruncationMode) -> str:
    """``text`` shortened to about ``keep`` characters (from its end or its middle), the cut
    marked with ``" ... "``."""
    if mode == "end":
        return f"{_head(text, keep)} {ELLIPSIS}".strip()
    return f"{_head(text, (keep + 1) // 2)} {ELLIPSIS} {_tail(text, keep // 2)}".strip()


def _render(row: Mapping[str, Any], form: str) -> str:
    return standard_prompt(row) if form == "standard" else cot_prompt(row)


def fit_prompt(row: Mapping[str, Any], form: str, tokenizers: Mapping[str, Any],
               max_prompt_length: int, mode: TruncationMode = "end") -> PromptFit | Dropped:
    """The row's prompt in ``form``, its input cut until the prompt has at most
    ``max_prompt_length`` tokens for every tokenizer (module docstring), or :class:`Dropped`.
    """
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation mode must be one of {TRUNCATION_MODES}, got {mode!r}")
    if form not in ("standard", "cot"):
        raise ValueError(f"unknown form {form!r}: expected 'standard' or 'cot'")

    def attempt(candidate: Mapping[str, Any]) -> tuple[str, dict[str, int]]:
        prompt = _render(candidate, form)
        return prompt, {side: len(prompt_token_ids(tok, prompt)) for side, tok in tokenizers.items()}

    prompt, counts = attempt(row)
    if max(counts.values()) <= max_prompt_length:
        return PromptFit(row, form, prompt, False, counts)
    text = str(row.get("input") or "")
    shortest = {**row, "input": cut_input(text, 0, mode)}
    prompt, counts = attempt(shortest)
    if not text.strip() or max(counts.values()) > max_prompt_length:
        return Dropped(str(row.get("id")), form, "prompt_too_long",
                       f"the instruction and the template alone take {counts} prompt tokens "
                       f"(limit {max_prompt_length})")
    best = PromptFit(shortest, form, prompt, True, counts)
    lo, hi = 0, len(text)  # invariant: keep=lo fits, keep=hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        candidate = {**row, "input": cut_input(text, mid, mode)}
        prompt, counts = attempt(candidate)
        if max(counts.values()) <= max_prompt_length:
            lo, best = mid, PromptFit(candidate, form, prompt, True, counts)
        else:
            hi = mid
    return best


def fit_example(row: Mapping[str, Any], form: str, rationale: str | None,
                tokenizers: Mapping[str, Any], *, max_prompt_length: int, max_length: int,
                mode: TruncationMode = "end", long_response: Literal["truncate", "drop"] = "truncate",
                ) -> FittedExample | Dropped:
    """One example (``row`` in ``form``; ``rationale`` for the CoT form, default the row's)
    fitted (:func:`fit_prompt`) and tokenized by every tokenizer
    (:func:`cot2align_core.tokenization.tokenize_pair`), all from the same text.

    ``long_response``: a response longer than ``max_length`` allows is cut on the right
    (``"truncate"``: the tokenize stage) or the example is dropped (``"drop"``: SFT, where a
    cut response would teach the model to stop mid-sentence).
    """
    fit = fit_prompt(row, form, tokenizers, max_prompt_length, mode)
    if isinstance(fit, Dropped):
        return fit
    prompt, response = format_row(fit.row, form, rationale)
    example_id = str(row["id"])
    sides = {}
    for side, tok in tokenizers.items():
        if max_length - fit.prompt_tokens[side] < 1:
            return Dropped(example_id, form, "no_room_for_response",
                           f"{side}: a {fit.prompt_tokens[side]}-token prompt leaves no room in "
                           f"max_length {max_length}")
        ex = tokenize_pair(tok, example_id, form, prompt, response, max_length=max_length)
        if ex.truncated and long_response == "drop":
            return Dropped(example_id, form, "response_too_long",
                           f"{side}: prompt + response exceed max_length {max_length}")
        sides[side] = ex
    return FittedExample(fit, response, sides)
