"""Helpers shared by the storage tests: small deterministic rows of every table kind."""
from __future__ import annotations

import uuid

import pytest
import torch

from storage.schemas import rationales_table, tokenized_table
from storage.store import ArtifactStore


def cache_row(i: int, form: str, dtype: torch.dtype = torch.float16, *, n_layers: int = 2,
              width: int = 32, topk: int = 0, seed: int = 0) -> dict:
    """The arguments of one ``TeacherCacheWriter.add`` call, a function of (i, form, seed)."""
    g = torch.Generator().manual_seed(seed * 100_003 + i * 2 + (form == "cot"))
    n_tokens = 3 + (i * 7 + (form == "cot") * 5) % 17
    seq = n_tokens + 4 + i % 3
    row = {
        "id": f"ex{i:04d}", "form": form,
        "hidden": (torch.randn(n_layers, n_tokens, width, generator=g) * 3).to(dtype),
        "layers": list(range(-n_layers, 0)),
        "input_ids": torch.randint(0, 1000, (seq,), generator=g),
        "positions": torch.arange(seq - n_tokens - 1, seq - 1),
        "target_ids": torch.randint(0, 1000, (n_tokens,), generator=g),
    }
    if topk:
        row["topk_ids"] = torch.randint(0, 1000, (n_tokens, topk), generator=g)
        row["topk_logits"] = torch.randn(n_tokens, topk, generator=g).half()
    return row


def add_row(cache, row: dict) -> None:
    kw = {k: v for k, v in row.items() if k not in ("id", "form", "hidden")}
    cache.add(row["id"], row["form"], row["hidden"], **kw)


def student_rows(n: int, forms_of=lambda i: ("standard", "cot")) -> list[dict]:
    rows = []
    for i in range(n):
        for form in forms_of(i):
            text = f"prompt {i} -> answer {form}"
            k = 5 + i % 4
            rows.append({
                "id": f"ex{i:04d}", "form": form, "text": text,
                "input_ids": list(range(100 + i, 100 + i + k)),
                "response_mask": [0, 0] + [1] * (k - 2),
                "offsets_start": [min(j * 2, len(text)) for j in range(k)],
                "offsets_end": [min(j * 2 + 2, len(text)) for j in range(k)],
                "prompt_tokens": 2,
                "mined_alignment": None if i % 2 else list(range(k - 2)),
            })
    return rows


def student_table(n: int, **kw):
    return tokenized_table(student_rows(n, **kw), "student")


def rationale_rows(n: int) -> list[dict]:
    return [{"id": f"ex{i:04d}", "prompt": f"What is {i} + 1?", "rationale": f"{i} plus 1 is "
             f"{i + 1}. Therefore, the answer is: {i + 1}", "answer": str(i + 1),
             "prediction": str(i + 1) if i % 3 else "", "kept": bool(i % 3),
             "filter_reason": None if i % 3 else "wrong_answer", "sample_index": 0,
             "temperature": 1.0, "top_p": 1.0, "max_tokens": 256, "seed": 1234 + i}
            for i in range(n)]


def rationale_table(n: int):
    return rationales_table(rationale_rows(n))


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def memory_store() -> ArtifactStore:
    return ArtifactStore(f"memory://cot2align-test-{uuid.uuid4().hex}")
