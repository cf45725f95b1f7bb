"""The Parquet schemas of the pipeline's tables, with builders (python rows -> Arrow) and
readers (Arrow -> python / torch).

The kinds of tables:

- **rows** (stage ``prepare``): the task's examples, one shard per split (``train``, ``dev``,
  ``eval``).
- **rationales** (stage ``generate``): one row per sampled rationale.
- **tokenized** (stage ``tokenize``): one table per tokenizer side, shards named
  ``teacher-NNNNN`` / ``student-NNNNN`` (so the shard kind is the side), one row per example
  id and form (``standard`` | ``cot``).
- **teacher cache** (stage ``cache_teacher``): see :data:`TEACHER_CACHE_SCHEMA` and
  :mod:`storage.teacher_cache`.
- **generations** (stage ``evaluate``): one row per (model, form, decoding, seed, example).

Tensors are stored as a ``large_binary`` blob per row (C-order bytes) beside their shape and
dtype columns: about 10x faster to write and read than nested lists, read back without a
copy by ``torch.frombuffer``, and it carries bfloat16, which Arrow has no type for.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from cot2align_core.prompts import FORMS  # the example forms are the method's: one definition
from storage.errors import StoreError

SIDES = ("teacher", "student")
HIDDEN_DTYPES = ("float16", "bfloat16", "float32")
TOPK_LOGIT_DTYPES = ("float16", "float32")

SPLITS = ("train", "dev", "eval")

ROWS_SCHEMA = pa.schema([
    ("id", pa.string()), ("instruction", pa.string()), ("input", pa.string()),
    ("output", pa.string()), ("rationale", pa.string()),
])

GENERATIONS_SCHEMA = pa.schema([
    ("model", pa.string()), ("seed_of_model", pa.int64()), ("form", pa.string()),
    ("decoding", pa.string()), ("seed", pa.int64()), ("id", pa.string()),
    ("prompt", pa.string()), ("reference", pa.string()), ("generation", pa.string()),
    ("prediction", pa.string()), ("rougeL", pa.float64()), ("exact_match", pa.float64()),
])

RATIONALES_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("rationale", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),        # the gold answer
    pa.field("prediction", pa.string(), nullable=False),    # parsed from the rationale; may be ""
    pa.field("kept", pa.bool_(), nullable=False),
    pa.field("filter_reason", pa.string(), nullable=True),
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("temperature", pa.float32(), nullable=False),
    pa.field("top_p", pa.float32(), nullable=False),
    pa.field("max_tokens", pa.int32(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
])

_TOKENIZED_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("form", pa.string(), nullable=False),              # "standard" | "cot"
    pa.field("text", pa.string(), nullable=False),              # full prompt + response text
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("response_mask", pa.list_(pa.int8()), nullable=False),
    pa.field("offsets_start", pa.list_(pa.int32()), nullable=False),  # char offsets into text
    pa.field("offsets_end", pa.list_(pa.int32()), nullable=False),
    pa.field("prompt_tokens", pa.int32(), nullable=False),
]
TOKENIZED_SCHEMAS = {
    "teacher": pa.schema(_TOKENIZED_FIELDS),
    # mined_alignment: per student response prediction position, the index into the
    # teacher's cached positions (or -1); null when no alignment was mined.
    "student": pa.schema(_TOKENIZED_FIELDS + [
        pa.field("mined_alignment", pa.list_(pa.int32()), nullable=True)]),
}

TEACHER_CACHE_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("form", pa.string(), nullable=False),
    pa.field("n_tokens", pa.int32(), nullable=False),           # cached positions
    pa.field("layers", pa.list_(pa.int16()), nullable=False),   # HF hidden_states indices
    pa.field("width", pa.int32(), nullable=False),
    pa.field("dtype", pa.string(), nullable=False),             # float16 | bfloat16 | float32
    pa.field("hidden", pa.large_binary(), nullable=False),      # [n_layers, n_tokens, width]
    pa.field("input_ids", pa.list_(pa.int32()), nullable=False),   # the whole teacher sequence
    pa.field("positions", pa.list_(pa.int32()), nullable=False),   # cached positions in input_ids
    pa.field("target_ids", pa.list_(pa.int32()), nullable=False),  # next token at each position
    pa.field("topk", pa.int32(), nullable=False),               # 0 when no top-k logits
    pa.field("topk_ids", pa.large_binary(), nullable=True),     # int32 [n_tokens, topk]
    pa.field("topk_logits", pa.large_binary(), nullable=True),  # [n_tokens, topk]
    pa.field("topk_dtype", pa.string(), nullable=True),         # float16 | float32
])

_ZSTD = "zstd"


def _leaf(field: pa.Field) -> str:
    # Parquet names a list's values "<name>.list.element" (compliant nested types).
    return f"{field.name}.list.element" if pa.types.is_list(field.type) else field.name


def _options(schema: pa.Schema, uncompressed: Sequence[str] = ()) -> dict[str, Any]:
    leaves = {_leaf(f): f.name not in uncompressed for f in schema}
    return {"compression": {leaf: (_ZSTD if z else "none") for leaf, z in leaves.items()},
            "compression_level": {leaf: 3 for leaf, z in leaves.items() if z}}


# Parquet options per table kind, passed to ``ArtifactWriter.write_shard / open_shard``.
# Tensor blobs are not compressed: float mantissas barely compress, and the bytes then go
# from the page into Arrow's buffer in one copy.
PARQUET_OPTIONS: dict[str, dict[str, Any]] = {
    "rationales": _options(RATIONALES_SCHEMA),
    "tokenized": _options(TOKENIZED_SCHEMAS["student"]),
    "teacher_cache": _options(TEACHER_CACHE_SCHEMA, uncompressed=("hidden", "topk_logits")),
}


def detect_kind(schema: pa.Schema) -> str | None:
    """Which of this module's tables a schema is: "rationales", "tokenized",
    "teacher_cache" or None."""
    names = set(schema.names)
    if {"hidden", "n_tokens", "layers"} <= names:
        return "teacher_cache"
    if {"input_ids", "response_mask", "form"} <= names:
        return "tokenized"
    if {"rationale", "prompt", "kept"} <= names:
        return "rationales"
    return None


# ---------------------------------------------------------------------------------------
# Building tables from python rows


_NUMPY_OF = {pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32,
             pa.int64(): np.int64, pa.float32(): np.float32, pa.float64(): np.float64}


def _to_numpy(seq: Any, dtype: np.dtype) -> np.ndarray:
    if hasattr(seq, "detach"):                     # a torch tensor
        seq = seq.detach().cpu().numpy()
    return np.asarray(seq, dtype=dtype).reshape(-1)


def list_array(seqs: Sequence[Any], value_type: pa.DataType) -> pa.ListArray:
    """A ``list<value_type>`` array from sequences (lists, numpy arrays or tensors); None -> null."""
    np_dtype = _NUMPY_OF[value_type]
    parts, lengths, valid = [], [], []
    for seq in seqs:
        if seq is None:
            parts.append(np.empty(0, np_dtype))
            valid.append(False)
        else:
            parts.append(_to_numpy(seq, np_dtype))
            valid.append(True)
        lengths.append(len(parts[-1]))
    offsets = np.zeros(len(parts) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = pa.array(np.concatenate(parts) if parts else np.empty(0, np_dtype), type=value_type)
    mask = None if all(valid) else pa.array([not v for v in valid], type=pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask)


def _require(rows: Sequence[Mapping[str, Any]], schema: pa.Schema, what: str) -> None:
    required = [f.name for f in schema if not f.nullable]
    for i, row in enumerate(rows):
        missing = [k for k in required if row.get(k) is None]
        if missing:
            raise StoreError(f"{what} row {i} (id {row.get('id')!r}) lacks {missing}")
        unknown = set(row) - set(schema.names)
        if unknown:
            raise StoreError(f"{what} row {i} (id {row.get('id')!r}) has unknown fields "
                             f"{sorted(unknown)}; the schema has {schema.names}")
        if "form" in row and row["form"] not in FORMS:
            raise StoreError(f"{what} row {i} (id {row.get('id')!r}): form {row['form']!r} is "
                             f"not one of {FORMS}")


def _build(rows: Iterable[Mapping[str, Any]], schema: pa.Schema, what: str) -> pa.Table:
    rows = list(rows)
    _require(rows, schema, what)
    columns = []
    for f in schema:
        values = [row.get(f.name) for row in rows]
        if pa.types.is_list(f.type):
            columns.append(list_array(values, f.type.value_type))
        else:
            columns.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def rows_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """The task's examples (``id, instruction, input, output, rationale``) as a table."""
    return pa.Table.from_pylist([{k: r.get(k) for k in ROWS_SCHEMA.names} for r in rows],
                                schema=ROWS_SCHEMA)


def read_rows(artifact, split: str) -> list[dict[str, Any]]:
    """The rows of ``split`` (one of :data:`SPLITS`) of a prepare artifact; [] when the
    artifact has no such split."""
    if split not in SPLITS:
        raise StoreError(f"unknown split {split!r}: expected one of {SPLITS}")
    if split not in {s.name for s in artifact.shards}:
        return []
    return artifact.read_table(split).to_pylist()


def generations_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=GENERATIONS_SCHEMA)


def rationales_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """A rationales table from dicts with the fields of :data:`RATIONALES_SCHEMA`."""
    return _build(rows, RATIONALES_SCHEMA, "rationale")


def tokenized_table(rows: Iterable[Mapping[str, Any]], side: str) -> pa.Table:
    """A tokenized table for ``side`` ("teacher" | "student"); sequences may be lists,
    numpy arrays or tensors."""
    if side not in TOKENIZED_SCHEMAS:
        raise StoreError(f"tokenizer side {side!r} is not one of {SIDES}")
    table = _build(rows, TOKENIZED_SCHEMAS[side], f"tokenized ({side})")
    lengths = [pc_len(table, c) for c in ("input_ids", "response_mask", "offsets_start",
                                          "offsets_end")]
    bad = np.nonzero((lengths[0] != lengths[1]) | (lengths[0] != lengths[2])
                     | (lengths[0] != lengths[3]))[0]
    if len(bad):
        i = int(bad[0])
        raise StoreError(f"tokenized ({side}) row {i} (id {table['id'][i].as_py()!r}): "
                         "input_ids, response_mask and offsets must have the same length")
    return table


def pc_len(table: pa.Table, column: str) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.list_value_length(table[column]).to_numpy(zero_copy_only=False)


# ---------------------------------------------------------------------------------------
# Reading back


def read_rationales(table: pa.Table) -> list[dict[str, Any]]:
    """Rationale rows as python dicts."""
    return table.to_pylist()


class ListColumn:
    """Zero-copy per-row access to a ``list<primitive>`` column: ``col[i]`` is a numpy view
    (read-only) of row i's values, or None for a null row."""

    def __init__(self, column: pa.ChunkedArray | pa.Array) -> None:
        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        self.offsets = np.asarray(arr.offsets)
        self.values = arr.values.to_numpy(zero_copy_only=False)
        self.valid = None if arr.null_count == 0 else np.asarray(arr.is_valid())

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray | None:
        if self.valid is not None and not self.valid[i]:
            return None
        return self.values[self.offsets[i]:self.offsets[i + 1]]


def read_tokenized(table: pa.Table, as_torch: bool = True) -> list[dict[str, Any]]:
    """Tokenized rows as dicts; list columns as torch tensors (``input_ids`` and
    ``mined_alignment`` int64, ``response_mask`` bool, offsets int64), or numpy arrays."""
    lists = {c: ListColumn(table[c]) for c in table.column_names
             if pa.types.is_list(table.schema.field(c).type)}
    scalars = {c: table[c].to_pylist() for c in table.column_names if c not in lists}
    rows = []
    for i in range(table.num_rows):
        row = {c: v[i] for c, v in scalars.items()}
        for c, col in lists.items():
            row[c] = col[i]
        if as_torch:
            row = tokenized_row_to_torch(row)
        rows.append(row)
    return rows


def tokenized_row_to_torch(row: dict[str, Any]) -> dict[str, Any]:
    import torch

    out = dict(row)
    for c in ("input_ids", "offsets_start", "offsets_end", "mined_alignment"):
        if out.get(c) is not None:
            out[c] = torch.from_numpy(np.asarray(out[c], dtype=np.int64))
    if out.get("response_mask") is not None:
        out["response_mask"] = torch.from_numpy(np.asarray(out["response_mask"]) != 0)
    return out
