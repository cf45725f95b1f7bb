"""The demo task: short left-to-right arithmetic on single digits, with a gold rationale.

A row (DSKD/Dolly format plus `rationale`):

    instruction: "Compute the value of the expression from left to right."
    input:       "7 + 5 - 3"
    rationale:   "7 + 5 = 12\\n12 - 3 = 9"       one line per operation
    output:      "9"

Why this task: the direct answer needs two table look-ups composed in one forward pass,
while the rationale turns it into one look-up per line (copy two numbers, write their sum or
difference), which a tiny transformer learns in minutes on a CPU. Intermediate values never
go below zero.

The problem space is small (a few thousand expressions), so train/dev/test are disjoint by
construction: every expression is assigned to one split by a hash of its text (independent of
the seed). Rows of a split are drawn without replacement while distinct problems remain.
"""
from __future__ import annotations

import hashlib
import itertools
import random
import re
from functools import lru_cache

from cot2align_core.prompts import ANSWER_PREFIX

INSTRUCTION = "Compute the value of the expression from left to right."

# Percent of the problem space held out per split; the rest is "train".
SPLIT_PERCENT = {"test": 10, "dev": 10}
SPLITS = ("train", "dev", "test")

# The settings measured for the demo (2-core CPU, greedy exact match on 200 test rows).
# Teacher SFT on both forms, 1500 steps x 32 examples (12 epochs of 2000 rows x 2 forms):
# CoT EM 95.5 / 98.5 / 99.0 % and standard EM 88 / 75.5 / 60 % for init seeds 0 / 1 / 2, in
# 106-125 s of CPU time on one thread. At 1000 steps CoT EM was 86.5-87 %, at 1200 steps 73 %
# once, at 400 steps 30 %: fewer than 1500 steps are not safe. A Llama with 2 layers learnt
# far slower (CoT 37.5 % after 1000 steps) than a GPT-2 of the same size (98 %): absolute
# positions suit this fixed format (a GPT-2 teacher of the Llama's size: CoT 92 % at 1000
# steps, 99 / 98.5 % at 1500; both archs load in vLLM).
# The student below, SFT alone on both gold forms for the same 1500 x 32: CoT 88.5 %,
# standard 68 % (65.5 % when trained on the standard form only), about 65 s of CPU time.
# One torch thread: on the shared 2-core machine 2 threads made a step 3-6x slower.
# vLLM (CPU build) loads both saved models and gives the same greedy exact match as HF.
# Copy these into the pipeline config.
DEMO_DEFAULTS: dict = {
    "task": {"n_operands": 3, "min_operand": 0, "max_operand": 9, "ops": "+-"},
    "rows": {"train": 2000, "test": 200},
    # vocab_size is an upper bound: the demo corpus runs out of BPE merges at 500 tokens
    # (every template a single token), so 512 and 1024 give the same tokenizer.
    "teacher_tokenizer": {"kind": "bpe", "vocab_size": 512},
    "student_tokenizer": {"kind": "unigram", "vocab_size": 300, "max_piece_length": 16},
    # head_dim 64 on both (vLLM's CPU attention rejects 16).
    "teacher": {"arch": "llama", "hidden_size": 128, "num_layers": 4, "num_heads": 2},
    "student": {"arch": "gpt2", "hidden_size": 64, "num_layers": 2, "num_heads": 1},
    "teacher_sft": {
        "steps": 1500, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20,
        "weight_decay": 0.01, "grad_clip": 1.0, "schedule": "cosine",
    },
    "torch_threads": 1,
}


def _split_of(expression: str) -> str:
    bucket = int(hashlib.sha1(expression.encode()).hexdigest(), 16) % 100
    lo = 0
    for name, pct in SPLIT_PERCENT.items():
        if bucket < lo + pct:
            return name
        lo += pct
    return "train"


def _steps(operands: tuple[int, ...], ops: tuple[str, ...]) -> list[tuple[int, str, int, int]] | None:
    """Left-to-right evaluation as (left, op, right, result) lines; None if a value < 0."""
    steps, acc = [], operands[0]
    for op, b in zip(ops, operands[1:]):
        result = acc + b if op == "+" else acc - b
        if result < 0:
            return None
        steps.append((acc, op, b, result))
        acc = result
    return steps


@lru_cache(maxsize=16)
def _problem_space(n_operands: int, min_operand: int, max_operand: int, ops: str) -> dict[str, list]:
    """Every valid expression of the given shape, grouped by split, in a fixed order."""
    if n_operands < 2:
        raise ValueError("n_operands must be at least 2 (at least one operation)")
    if not set(ops) <= {"+", "-"} or not ops:
        raise ValueError(f"ops must be made of '+' and '-', got {ops!r}")
    if not 0 <= min_operand <= max_operand:
        raise ValueError("need 0 <= min_operand <= max_operand")
    space: dict[str, list] = {s: [] for s in SPLITS}
    digits = range(min_operand, max_operand + 1)
    for operands in itertools.product(digits, repeat=n_operands):
        for op_seq in itertools.product(sorted(set(ops)), repeat=n_operands - 1):
            steps = _steps(operands, op_seq)
            if steps is None:
                continue
            expression = " ".join(
                [str(operands[0])] + [f"{op} {b}" for op, b in zip(op_seq, operands[1:])]
            )
            space[_split_of(expression)].append((expression, steps))
    return space


def count_problems(split: str = "train", **task) -> int:
    """How many distinct expressions `split` holds for the task settings `task`."""
    params = {**DEMO_DEFAULTS["task"], **task}
    return len(_problem_space(**params)[split])


def make_demo_rows(
    n: int,
    seed: int = 0,
    *,
    split: str = "train",
    n_operands: int = 3,
    min_operand: int = 0,
    max_operand: int = 9,
    ops: str = "+-",
) -> list[dict]:
    """`n` rows of `split`, deterministic for (seed, split, task settings).

    Rows: {"id", "instruction", "input", "output", "rationale"}. Distinct expressions while
    the split has enough of them; past that, the split is cycled through again in a new order.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    pool = _problem_space(n_operands, min_operand, max_operand, ops)[split]
    if not pool:
        raise ValueError(f"split {split!r} holds no problem for these task settings")
    rng = random.Random(f"{seed}:{split}")
    chosen: list = []
    while len(chosen) < n:
        order = list(range(len(pool)))
        rng.shuffle(order)
        chosen.extend(pool[i] for i in order[: n - len(chosen)])
    rows = []
    for i, (expression, steps) in enumerate(chosen):
        rationale = "\n".join(f"{a} {op} {b} = {r}" for a, op, b, r in steps)
        rows.append(
            {
                "id": f"{split}-{seed}-{i:06d}",
                "instruction": INSTRUCTION,
                "input": expression,
                "output": str(steps[-1][3]),
                "rationale": rationale,
            }
        )
    return rows


_MARKER = re.compile(re.escape(ANSWER_PREFIX.strip()), re.IGNORECASE)
_INT = re.compile(r"-?\d+")


def extract_answer(text: str | None) -> str | None:
    """The final answer in a generated response, or None when there is none.

    After the last "Therefore, the answer is:" when present (CoT form), else the first
    non-empty line (standard form); the first integer there if any, else that stripped text.
    """
    if not text:
        return None
    matches = list(_MARKER.finditer(text))
    if matches:
        tail = text[matches[-1].end():]
    else:
        tail = text
    line = next((ln.strip() for ln in tail.splitlines() if ln.strip()), "")
    if not line:
        return None
    number = _INT.search(line)
    if number:
        return str(int(number.group()))
    return line.rstrip(".").strip() or None


def _normalise(answer: str) -> str:
    answer = str(answer).strip().rstrip(".").strip()
    return str(int(answer)) if _INT.fullmatch(answer) else answer.lower()


def is_correct(pred: str | None, gold: str) -> bool:
    """Exact match of an extracted answer with the gold one (integers compared as numbers)."""
    if pred is None:
        return False
    return _normalise(pred) == _normalise(gold)
