"""Reading a GGUF file's tensors back, independently of the writer (``gguf.py``): the quantized linears'
integers, scales and offsets block by block, and the float values llama.cpp computes with (by the gguf
package's own dequantizer). Used by the tests and to check an export."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from qcompiler.core.errors import ExportError


def _tensor(source: str | Path | gguf.GGUFReader, name: str):
    reader = source if isinstance(source, gguf.GGUFReader) else gguf.GGUFReader(source)
    for t in reader.tensors:
        if t.name == name:
            return t
    raise KeyError(f"no tensor {name!r} in the GGUF file")


def read_gguf_linear(source: str | Path | gguf.GGUFReader,
                     gguf_tensor: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Unpack a Q8_0/Q4_0/Q4_1 tensor: ``q`` ``[N, K]`` (Q4_0: nibble - 8, Q4_1: nibble), ``d`` and ``m``
    ``[N, K/32]`` float32 (``m`` None but for Q4_1). Independent of the gguf package's dequantizer.
    ``source``: a path, or an open ``gguf.GGUFReader`` (reading many tensors of one file)."""
    t = _tensor(source, gguf_tensor)
    kind = t.tensor_type.name
    raw = torch.from_numpy(np.array(t.data, dtype=np.uint8))
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, gguf.GGML_QUANT_SIZES[t.tensor_type][1])
    half = lambda b: b.contiguous().view(torch.float16).reshape(n, -1).to(torch.float32)  # noqa: E731
    d = half(blocks[..., 0:2])
    if kind == "Q8_0":
        return blocks[..., 2:].contiguous().view(torch.int8).reshape(n, -1).to(torch.int64), d, None
    qs = blocks[..., 4:] if kind == "Q4_1" else blocks[..., 2:]
    nib = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, -1).to(torch.int64)
    if kind == "Q4_0":
        return nib - 8, d, None
    if kind == "Q4_1":
        return nib, d, half(blocks[..., 2:4])
    raise ExportError(f"{gguf_tensor} is {kind}, not Q8_0/Q4_0/Q4_1")


def dequantize_gguf_tensor(source: str | Path | gguf.GGUFReader, gguf_tensor: str) -> torch.Tensor:
    """The float32 values llama.cpp computes with, by the gguf package's own dequantizer (HF orientation)."""
    t = _tensor(source, gguf_tensor)
    return torch.from_numpy(np.array(gguf.quants.dequantize(np.array(t.data), t.tensor_type), dtype=np.float32))
