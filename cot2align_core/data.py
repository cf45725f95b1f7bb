"""Task data: rows in the DSKD/Dolly format, read from jsonl or generated (the demo task).

A row is ``{"id", "instruction", "input", "output"}`` plus an optional gold ``rationale``.
Files in the DSKD format carry a ready ``prompt`` too; it is not needed (prompts are built from
``instruction`` and ``input``) and is dropped. Rows without an ``id`` get ``<split>-<line>``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REQUIRED = ("instruction", "output")


class DataError(ValueError):
    """Task data that cannot be used; the message names the file, the rows and the fix."""


@dataclass
class LoadedSplit:
    rows: list[dict[str, Any]]
    source: str
    skipped: list[str] = field(default_factory=list)  # "line N: reason" of skipped rows


class _InvalidLine:
    """A line of a jsonl file that did not parse (kept in place so line numbers stay right)."""

    def __init__(self, reason: str):
        self.reason = reason


def _check_row(raw: Any) -> str | None:
    if raw is None:
        return "blank line"
    if isinstance(raw, _InvalidLine):
        return raw.reason
    if not isinstance(raw, dict):
        return f"not a JSON object (a {type(raw).__name__})"
    missing = [k for k in REQUIRED if raw.get(k) is None]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    for k in ("instruction", "output", "input", "rationale"):
        if k in raw and raw[k] is not None and not isinstance(raw[k], str):
            return f"field {k!r} is {type(raw[k]).__name__}, expected a string"
    if raw.get("id") is not None and not isinstance(raw["id"], (str, int)):
        return f"field 'id' is {type(raw['id']).__name__}, expected a string or an integer"
    if not raw["output"].strip():
        return "empty 'output'"
    if not raw["instruction"].strip():
        return "empty 'instruction'"
    return None


def normalise_row(raw: dict[str, Any], default_id: str) -> dict[str, Any]:
    row = {
        "id": default_id if raw.get("id") is None or str(raw["id"]).strip() == ""
        else str(raw["id"]).strip(),
        "instruction": raw["instruction"].strip(),
        "input": (raw.get("input") or "").strip(),
        "output": raw["output"].strip(),
    }
    if raw.get("rationale"):
        row["rationale"] = raw["rationale"].strip()
    return row


def validate_rows(raws: list[Any], source: str, split: str, on_invalid: str = "error",
                  limit: int | None = None) -> LoadedSplit:
    rows, bad = [], []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raws, start=1):
        problem = _check_row(raw)
        if problem is None:
            row = normalise_row(raw, f"{split}-{i:06d}")
            if row["id"] in seen:
                problem = f"duplicate id {row['id']!r} (first on line {seen[row['id']]})"
            else:
                seen[row["id"]] = i
        if problem:
            bad.append(f"line {i}: {problem}")
            continue
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    if bad and on_invalid == "error":
        shown = "\n  ".join(bad[:10]) + (f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise DataError(
            f"{source}: {len(bad)} invalid row(s):\n  {shown}\n"
            "Fix the rows (each needs non-empty 'instruction' and 'output' strings), or set "
            "data.on_invalid_rows: skip to leave them out (they are counted in the manifest)."
        )
    if not rows:
        raise DataError(f"{source}: no usable rows")
    return LoadedSplit(rows=rows, source=source, skipped=bad)


def read_jsonl(path: str | Path, split: str, on_invalid: str = "error",
               limit: int | None = None) -> LoadedSplit:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path} (check data.train_path / data.eval_path)")
    raws: list[Any] = []
    with path.open("rb") as fh:
        for i, raw_line in enumerate(fh, start=1):
            try:
                line = raw_line.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raws.append(_InvalidLine(f"not UTF-8 text ({err.reason} at byte {err.start})"))
                continue
            if not line.strip():
                raws.append(None)
                continue
            try:
                raws.append(json.loads(line))
            except json.JSONDecodeError as err:
                raws.append(_InvalidLine(f"invalid JSON: {err.msg} (column {err.colno})"))
    return validate_rows(raws_without_blank(raws), str(path), split, on_invalid, limit)


def raws_without_blank(raws: list[Any]) -> list[Any]:
    # Keep line numbers meaningful: blank lines stay as None and are reported as invalid only
    # when they are not trailing.
    while raws and raws[-1] is None:
        raws.pop()
    return raws


def has_cot_form(row: dict[str, Any], cot_requires_input: bool) -> bool:
    """Whether an example gets a CoT form (the paper: only rows with a non-empty input)."""
    return bool(str(row.get("input") or "").strip()) or not cot_requires_input


def hold_out(rows: list[dict[str, Any]], n: int, source: str) -> tuple[list[dict], list[dict]]:
    """(rest, held out): ``n`` rows chosen by a hash of their id, so the choice does not depend
    on the rows' order or on which other rows the file holds."""
    import hashlib

    if n >= len(rows):
        raise DataError(f"{source}: data.dev_from_train is {n} but the split has only "
                        f"{len(rows)} rows; hold out fewer rows")
    ranked = sorted(rows, key=lambda r: hashlib.sha1(r["id"].encode()).hexdigest())
    chosen = {r["id"] for r in ranked[:n]}
    return [r for r in rows if r["id"] not in chosen], [r for r in rows if r["id"] in chosen]


def load_splits(d) -> dict[str, LoadedSplit]:
    """The splits of the config's data section (``cot2align_core.config.DataConfig``):
    ``train`` always, ``dev`` when the config has one (checkpoint selection), ``eval`` when it
    has one."""
    import os

    if d.source == "demo":
        from cot2align_core.demo_task import make_demo_rows

        task = dict(n_operands=d.demo.n_operands, min_operand=d.demo.min_operand,
                    max_operand=d.demo.max_operand, ops=d.demo.ops)
        sizes = {"train": ("train", d.demo.n_train), "dev": ("dev", d.demo.n_dev),
                 "eval": ("test", d.demo.n_eval)}
        return {name: validate_rows(make_demo_rows(n, d.demo.seed, split=split, **task),
                                    f"demo task ({split})", name)
                for name, (split, n) in sizes.items() if n > 0}
    out = {"train": read_jsonl(os.path.expandvars(d.train_path), "train", d.on_invalid_rows,
                               d.max_train_rows)}
    if d.dev_path:
        out["dev"] = read_jsonl(os.path.expandvars(d.dev_path), "dev", d.on_invalid_rows)
    elif d.dev_from_train:
        train = out["train"]
        rest, dev = hold_out(train.rows, d.dev_from_train, train.source)
        out["train"] = LoadedSplit(rest, train.source, train.skipped)
        out["dev"] = LoadedSplit(dev, f"{train.source} (held out by data.dev_from_train)")
    if d.eval_path:
        out["eval"] = read_jsonl(os.path.expandvars(d.eval_path), "eval", d.on_invalid_rows,
                                 d.max_eval_rows)
    return out
