"""The teacher's embedding matrix (and LM head), saved once per teacher-cache artifact.

The cache does not store the embedding layer's hidden states: they are rows of this matrix,
``embed[input_ids[positions]]``. The side file ``teacher_embeddings.safetensors`` holds
``embed`` ``[vocab, width]`` and, when given, ``lm_head`` ``[vocab, width]``; a head tied to
the embedding is stored once (metadata ``tied_lm_head = "true"``) and given back as the same
tensor.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

TEACHER_EMBEDDINGS = "teacher_embeddings.safetensors"


def _tied(embed: torch.Tensor, lm_head: torch.Tensor) -> bool:
    return lm_head is embed or (lm_head.shape == embed.shape
                                and lm_head.data_ptr() == embed.data_ptr()
                                and lm_head.stride() == embed.stride())


def teacher_embeddings_bytes(embed: torch.Tensor, lm_head: torch.Tensor | None = None) -> bytes:
    """The safetensors bytes of the side file."""
    tensors = {"embed": embed.detach().cpu().contiguous()}
    metadata = {"tied_lm_head": "false"}
    if lm_head is not None:
        if _tied(embed, lm_head):
            metadata["tied_lm_head"] = "true"
        else:
            tensors["lm_head"] = lm_head.detach().cpu().contiguous().clone()
    return save_bytes(tensors, metadata=metadata)


def save_teacher_embeddings(writer: Any, embed: torch.Tensor,
                            lm_head: torch.Tensor | None = None,
                            relpath: str = TEACHER_EMBEDDINGS):
    """Write the side file into an open :class:`~storage.store.ArtifactWriter`."""
    return writer.write_file(relpath, teacher_embeddings_bytes(embed, lm_head))


def load_teacher_embeddings(source: Any, relpath: str = TEACHER_EMBEDDINGS
                            ) -> dict[str, torch.Tensor]:
    """``{"embed", "lm_head"?}`` from an :class:`~storage.store.Artifact` or a file path.
    A local file is memory-mapped."""
    if isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
        from safetensors import safe_open

        with safe_open(os.fspath(source), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(os.fspath(source))
    else:
        path = source.file_path(relpath)
        if isinstance(path, os.PathLike):
            return load_teacher_embeddings(path)
        data = source.read_file(relpath)
        tensors = load_bytes(data)
        metadata = _metadata_of(data)
    if metadata.get("tied_lm_head") == "true":
        tensors["lm_head"] = tensors["embed"]
    return tensors


def _metadata_of(data: bytes) -> dict[str, str]:
    import json
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]).get("__metadata__", {}) or {}
