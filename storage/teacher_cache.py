"""The teacher cache: the teacher's hidden states that the losses need, computed once.

What one row holds (schema :data:`storage.schemas.TEACHER_CACHE_SCHEMA`), for one example id
and form:

- ``hidden``: ``[n_layers, n_tokens, width]`` in float16 / bfloat16 / float32, C order, as one
  ``large_binary`` blob. Only the *response prediction positions* (positions p whose next
  token is a response token; listed in ``positions``, their next tokens in ``target_ids``)
  and only the configured layers (``layers``: indices into HF ``hidden_states``, default the
  last). Prompt positions are never used by the losses, and the embedding layer is not
  stored at all: it is ``embed[input_ids[positions]]``, recomputed from ``input_ids`` and the
  embedding matrix saved once per artifact (:mod:`storage.teacher_embeddings`). For a 7B
  teacher (width 4096) that is 8 KiB per token and layer in 16-bit, instead of
  ``(n_layers + 1) x 8 KiB`` for every prompt and response token.
- ``topk_ids`` / ``topk_logits`` (optional): the teacher's top-k next-token logits at the
  same positions, for logit-based KD losses.

Writing (:class:`TeacherCacheWriter`) buffers rows and writes a row group whenever the
buffer reaches ``row_group_bytes``. The default, 16 MiB, is measured
(``benchmarks/cache_io.py``, 2 MiB rows): streaming reads and writes run as fast as with
64 MiB groups, while a random read of one row, which must decode its whole row group, costs
4x less (random reads with a cache a quarter of the data: ~12-18 MiB/s with 64 MiB groups,
~400-560 MiB/s with 16 MiB groups). The reader keeps recent row groups (``cache_bytes``);
for caches much larger than memory, shuffle in blocks of a row group's rows (the training
loop's ``shuffle_block_size``). The shard is a temporary
file until :meth:`TeacherCacheWriter.close`, then renamed whole.

Reading (:class:`TeacherCacheReader`) streams row groups, or gives random access by
``(id, form)`` through an index built on open; tensors come from ``torch.frombuffer`` on the
Arrow buffers, without copying the bytes.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from storage.errors import StoreError
from storage.schemas import (FORMS, HIDDEN_DTYPES, PARQUET_OPTIONS, TEACHER_CACHE_SCHEMA,
                             TOPK_LOGIT_DTYPES, ListColumn, list_array)
from storage.shards import ShardRecord, ShardWriter
from storage.tensor_blobs import TORCH_DTYPES, BlobColumn, blob_array, dtype_name, tensor_bytes

DEFAULT_ROW_GROUP_BYTES = 16 << 20
DEFAULT_CACHE_BYTES = 256 << 20
SHARD_KIND = "cache"


class MissingTeacherRowError(StoreError, KeyError):
    """The teacher cache has no row for an (id, form) that was asked for."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass
class TeacherRow:
    """One cached row. ``hidden`` is ``[n_layers, n_tokens, width]``; id tensors are int32."""

    id: str
    form: str
    layers: tuple[int, ...]
    hidden: torch.Tensor
    input_ids: torch.Tensor
    positions: torch.Tensor
    target_ids: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logits: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return self.hidden.shape[1]

    @property
    def width(self) -> int:
        return self.hidden.shape[2]

    def layer(self, layer_id: int) -> torch.Tensor:
        """``[n_tokens, width]`` hidden states of one cached layer (by its HF index)."""
        try:
            return self.hidden[self.layers.index(layer_id)]
        except ValueError:
            raise StoreError(f"layer {layer_id} is not cached for {self.id!r}/{self.form}; "
                             f"cached layers: {list(self.layers)}") from None


# ---------------------------------------------------------------------------------------
# Writing


class TeacherCacheWriter:
    """Appends teacher-cache rows to one shard of an artifact being written.

    ::

        with store.writer("cache_teacher", fp, params=...) as w:
            for i, chunk in enumerate(chunks):
                name = f"cache-{i:05d}"
                if name in w.done_shards():
                    continue
                with TeacherCacheWriter(w, name) as cache:
                    for ex in chunk:
                        cache.add(ex.id, ex.form, hidden, layers=[-1], input_ids=...,
                                  positions=..., target_ids=...)

    The writer keeps a reference to each added tensor until its row group is written: do not
    modify them in place after :meth:`add`.
    """

    def __init__(self, writer, shard: str, *, row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
                 kind: str = SHARD_KIND) -> None:
        self.row_group_bytes = int(row_group_bytes)
        self._shard: ShardWriter = writer.open_shard(shard, TEACHER_CACHE_SCHEMA, kind=kind,
                                                     **PARQUET_OPTIONS["teacher_cache"])
        self._rows: list[dict[str, Any]] = []
        self._buffered = 0
        self.rows_written = 0
        self.row_groups = 0
        self.record: ShardRecord | None = None

    @property
    def info(self) -> dict[str, Any]:
        """Per-shard info stored in the manifest's shard record."""
        return self._shard.info

    def add(self, id: str, form: str, hidden: torch.Tensor, *, layers: Sequence[int],
            input_ids: Any, positions: Any, target_ids: Any,
            topk_ids: torch.Tensor | None = None, topk_logits: torch.Tensor | None = None) -> None:
        """Buffer one row. ``hidden``: ``[len(layers), n_tokens, width]`` (float16, bfloat16 or
        float32); ``positions`` / ``target_ids``: ``n_tokens`` ints; ``topk_ids`` /
        ``topk_logits``: ``[n_tokens, k]`` (int, float16/float32) or None."""
        if form not in FORMS:
            raise StoreError(f"teacher cache row {id!r}: form {form!r} is not one of {FORMS}")
        if hidden.dim() != 3:
            raise StoreError(f"teacher cache row {id!r}/{form}: hidden must be [n_layers, "
                             f"n_tokens, width], got shape {tuple(hidden.shape)}")
        name = dtype_name(hidden.dtype)
        if name not in HIDDEN_DTYPES:
            raise StoreError(f"teacher cache row {id!r}/{form}: hidden dtype {hidden.dtype} is "
                             f"not one of {HIDDEN_DTYPES}")
        n_layers, n_tokens, width = hidden.shape
        layers = [int(x) for x in layers]
        positions = _ints(positions)
        target_ids = _ints(target_ids)
        if len(layers) != n_layers:
            raise StoreError(f"teacher cache row {id!r}/{form}: {len(layers)} layer ids for "
                             f"{n_layers} cached layers")
        if len(positions) != n_tokens or len(target_ids) != n_tokens:
            raise StoreError(f"teacher cache row {id!r}/{form}: {n_tokens} cached positions but "
                             f"{len(positions)} positions and {len(target_ids)} target ids")
        topk, ids_blob, logits_blob, logits_dtype = 0, None, None, None
        if (topk_ids is None) != (topk_logits is None):
            raise StoreError(f"teacher cache row {id!r}/{form}: give both topk_ids and "
                             "topk_logits, or neither")
        if topk_ids is not None:
            if tuple(topk_ids.shape) != tuple(topk_logits.shape) or topk_ids.dim() != 2 \
                    or topk_ids.shape[0] != n_tokens:
                raise StoreError(f"teacher cache row {id!r}/{form}: topk_ids and topk_logits "
                                 f"must both be [{n_tokens}, k]")
            logits_dtype = dtype_name(topk_logits.dtype)
            if logits_dtype not in TOPK_LOGIT_DTYPES:
                raise StoreError(f"teacher cache row {id!r}/{form}: topk_logits dtype "
                                 f"{topk_logits.dtype} is not one of {TOPK_LOGIT_DTYPES}")
            topk = int(topk_ids.shape[1])
            ids_blob = tensor_bytes(topk_ids.to(torch.int32))
            logits_blob = tensor_bytes(topk_logits)
        blob = tensor_bytes(hidden)
        self._rows.append({
            "id": id, "form": form, "n_tokens": n_tokens, "layers": layers, "width": width,
            "dtype": name, "hidden": blob, "input_ids": _ints(input_ids), "positions": positions,
            "target_ids": target_ids, "topk": topk, "topk_ids": ids_blob,
            "topk_logits": logits_blob, "topk_dtype": logits_dtype,
        })
        self._buffered += blob.nbytes + (0 if ids_blob is None
                                         else ids_blob.nbytes + logits_blob.nbytes)
        if self._buffered >= self.row_group_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one row group."""
        if not self._rows:
            return
        rows, self._rows, self._buffered = self._rows, [], 0
        col = lambda k: [r[k] for r in rows]  # noqa: E731
        arrays = [
            pa.array(col("id"), pa.string()),
            pa.array(col("form"), pa.string()),
            pa.array(col("n_tokens"), pa.int32()),
            list_array(col("layers"), pa.int16()),
            pa.array(col("width"), pa.int32()),
            pa.array(col("dtype"), pa.string()),
            blob_array(col("hidden")),
            list_array(col("input_ids"), pa.int32()),
            list_array(col("positions"), pa.int32()),
            list_array(col("target_ids"), pa.int32()),
            pa.array(col("topk"), pa.int32()),
            blob_array(col("topk_ids")),
            blob_array(col("topk_logits")),
            pa.array(col("topk_dtype"), pa.string()),
        ]
        batch = pa.RecordBatch.from_arrays(arrays, schema=TEACHER_CACHE_SCHEMA)
        self._shard.write(batch, row_group_size=len(rows))
        self.rows_written += len(rows)
        self.row_groups += 1

    def close(self) -> ShardRecord:
        """Flush, then commit the shard (rename into place); returns its record."""
        if self.record is None:
            self.flush()
            self.record = self._shard.commit()
        return self.record

    def abort(self) -> None:
        self._rows = []
        self._shard.abort()

    def __enter__(self) -> "TeacherCacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _ints(seq: Any) -> np.ndarray:
    if hasattr(seq, "detach"):
        seq = seq.detach().cpu().numpy()
    return np.asarray(seq, dtype=np.int32).reshape(-1)


# ---------------------------------------------------------------------------------------
# Reading


def _int_tensor(values: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(values)


def decode_rows(table: pa.Table | pa.RecordBatch) -> list[TeacherRow]:
    """Teacher rows of a table or batch of the cache schema, tensors sharing its memory."""
    batches = table.to_batches() if isinstance(table, pa.Table) else [table]
    out: list[TeacherRow] = []
    for batch in batches:
        if batch.num_rows == 0:
            continue
        hidden = BlobColumn(batch.column("hidden"))
        topk_ids = BlobColumn(batch.column("topk_ids"))
        topk_logits = BlobColumn(batch.column("topk_logits"))
        lists = {c: ListColumn(batch.column(c)) for c in ("input_ids", "positions", "target_ids")}
        values = {c: _int_tensor(col.values) for c, col in lists.items()}
        layers = ListColumn(batch.column("layers"))
        scalars = {c: batch.column(c).to_pylist()
                   for c in ("id", "form", "n_tokens", "width", "dtype", "topk", "topk_dtype")}
        for i in range(batch.num_rows):
            n, width, topk = scalars["n_tokens"][i], scalars["width"][i], scalars["topk"][i]
            row_layers = tuple(int(x) for x in layers[i])
            ints = {c: values[c][int(col.offsets[i]):int(col.offsets[i + 1])]
                    for c, col in lists.items()}
            ids = logits = None
            if topk:
                ids = topk_ids.tensor(i, torch.int32, (n, topk))
                logits = topk_logits.tensor(i, TORCH_DTYPES[scalars["topk_dtype"][i]], (n, topk))
            out.append(TeacherRow(
                id=scalars["id"][i], form=scalars["form"][i], layers=row_layers,
                hidden=hidden.tensor(i, TORCH_DTYPES[scalars["dtype"][i]],
                                     (len(row_layers), n, width)),
                input_ids=ints["input_ids"], positions=ints["positions"],
                target_ids=ints["target_ids"], topk_ids=ids, topk_logits=logits))
    return out


class TeacherCacheReader:
    """Reads the teacher-cache shards of an artifact: streaming and by ``(id, form)``.

    ``kind`` / ``shards`` choose the shards (default: every shard of kind ``"cache"``, or
    all shards if none has that kind). Random access decodes the row group holding the row
    and keeps the most recent ones, up to ``cache_bytes``. Picklable (for DataLoader
    workers): open files and cached row groups are not carried over.
    """

    def __init__(self, artifact, *, kind: str | None = None,
                 shards: Sequence[str] | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.artifact = artifact
        if shards is None:
            kinds = {s.kind for s in artifact.shards}
            wanted = kind or (SHARD_KIND if SHARD_KIND in kinds else None)
            shards = [s.name for s in artifact.shards if wanted is None or s.kind == wanted]
        self.shard_names = list(shards)
        self.cache_bytes = int(cache_bytes)
        self._files: dict[int, Any] = {}
        self._cache: OrderedDict[tuple[int, int], list[TeacherRow]] = OrderedDict()
        self._cache_sizes: dict[tuple[int, int], int] = {}
        self.index: dict[tuple[str, str], tuple[int, int, int]] = {}
        self._build_index()

    def _file(self, shard_i: int):
        if shard_i not in self._files:
            self._files[shard_i] = self.artifact.parquet_file(self.shard_names[shard_i])
        return self._files[shard_i]

    def _build_index(self) -> None:
        for si, _ in enumerate(self.shard_names):
            pf = self._file(si)
            keys = pf.read(columns=["id", "form"])
            ids, forms = keys["id"].to_pylist(), keys["form"].to_pylist()
            pos = 0
            for rg in range(pf.metadata.num_row_groups):
                for r in range(pf.metadata.row_group(rg).num_rows):
                    key = (ids[pos], forms[pos])
                    if key in self.index:
                        raise StoreError(f"teacher cache {self.artifact.url} has two rows for id "
                                         f"{key[0]!r} form {key[1]!r}")
                    self.index[key] = (si, rg, r)
                    pos += 1

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"], state["_cache"], state["_cache_sizes"] = {}, OrderedDict(), {}
        return state

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self.index

    def keys(self) -> list[tuple[str, str]]:
        """``(id, form)`` of every row, in storage order."""
        return list(self.index)

    def location(self, id: str, form: str) -> tuple[int, int, int]:
        """``(shard index, row group, row in group)`` of a row."""
        try:
            return self.index[(id, form)]
        except KeyError:
            raise MissingTeacherRowError(
                f"teacher cache {self.artifact.url} has no row for id {id!r} form {form!r}") \
                from None

    def _row_group(self, si: int, rg: int) -> list[TeacherRow]:
        key = (si, rg)
        rows = self._cache.get(key)
        if rows is not None:
            self._cache.move_to_end(key)
            return rows
        table = self._file(si).read_row_group(rg)
        rows = decode_rows(table)
        self._cache[key] = rows
        self._cache_sizes[key] = table.nbytes
        while len(self._cache) > 1 and sum(self._cache_sizes.values()) > self.cache_bytes:
            old, _ = self._cache.popitem(last=False)
            del self._cache_sizes[old]
        return rows

    def get(self, id: str, form: str) -> TeacherRow:
        si, rg, r = self.location(id, form)
        return self._row_group(si, rg)[r]

    def __iter__(self) -> Iterator[TeacherRow]:
        """Every row in storage order, one row group in memory at a time."""
        for si, _ in enumerate(self.shard_names):
            pf = self._file(si)
            for rg in range(pf.metadata.num_row_groups):
                yield from decode_rows(pf.read_row_group(rg))
