"""Tensors as ``large_binary`` blobs: C-order bytes in, zero-copy torch views out.

Writing takes any contiguous CPU tensor (float16, bfloat16, float32, int32) as a uint8 view
of its bytes. Reading wraps the Arrow column's data buffer once with ``torch.frombuffer``
(no copy) and gives each row a slice of it viewed as its dtype and shape; the tensors keep the
Arrow buffer alive through that view. They are read-only in spirit: clone before writing
into them. A row whose bytes are not aligned to its element size (only possible when dtypes
are mixed within one column) is copied instead.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "int32": torch.int32, "int64": torch.int64}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(f"tensor dtype {dtype} cannot be stored; use one of "
                        f"{sorted(TORCH_DTYPES)}") from None


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes in C order as a uint8 numpy array (no copy if already contiguous
    on the CPU)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return t.reshape(-1).view(torch.uint8).numpy()


def blob_array(blobs: Sequence[np.ndarray | None]) -> pa.LargeBinaryArray:
    """A ``large_binary`` array from uint8 numpy arrays (None -> null), with one copy."""
    lengths = [0 if b is None else len(b) for b in blobs]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    present = [b for b in blobs if b is not None and len(b)]
    data = np.concatenate(present) if present else np.empty(0, dtype=np.uint8)
    validity = None
    if any(b is None for b in blobs):
        validity = pa.array([b is not None for b in blobs], type=pa.bool_()).buffers()[1]
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(blobs),
                                            [validity, pa.py_buffer(offsets), pa.py_buffer(data)],
                                            null_count=sum(b is None for b in blobs))


class BlobColumn:
    """Row access to a ``large_binary`` column as torch tensors sharing its memory."""

    def __init__(self, arr: pa.Array) -> None:
        if isinstance(arr, pa.ChunkedArray):
            if arr.num_chunks != 1:
                arr = arr.combine_chunks()
            else:
                arr = arr.chunk(0)
        self.arr = arr
        _, offsets_buf, data_buf = arr.buffers()
        self.offsets = np.frombuffer(offsets_buf, dtype=np.int64)[
            arr.offset: arr.offset + len(arr) + 1]
        self.data_buf = data_buf
        self.valid = (None if arr.null_count == 0
                      else arr.is_valid().to_numpy(zero_copy_only=False))
        if data_buf is None or data_buf.size == 0:
            self.data = torch.empty(0, dtype=torch.uint8)
        else:
            source = data_buf if data_buf.is_mutable else memoryview(data_buf)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*not writable.*")
                self.data = torch.frombuffer(source, dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.arr)

    def tensor(self, i: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor | None:
        """Row ``i`` as a tensor of ``dtype`` and ``shape`` (a view when aligned)."""
        if self.valid is not None and not self.valid[i]:
            return None
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        itemsize = torch.empty(0, dtype=dtype).element_size()
        expected = itemsize * int(np.prod(shape, dtype=np.int64))
        if end - start != expected:
            raise ValueError(f"blob of row {i} has {end - start} bytes; shape {tuple(shape)} "
                             f"of {dtype} needs {expected}")
        if expected == 0:
            return torch.empty(tuple(shape), dtype=dtype)
        raw = self.data[start:end]
        if (self.data.data_ptr() + start) % itemsize:
            raw = raw.clone()
        return raw.view(dtype).view(tuple(shape))
