"""The engine-neutral form of a quantized model that the export writers take.

The backend's plan and its quantize/dequantize graph are turned into an :class:`ExportModel` (Hugging
Face names and orientations, every transform folded into float tensors); each writer maps it to one
format. Nothing here knows a file format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class ExportActivation:
    """How a layer's input is quantized at run time."""

    bits: int
    symmetric: bool
    dynamic: bool  # True: per token, range taken at run time; False: one calibrated per-tensor range
    scale: float | None = None  # static only
    zero_point: int | None = None  # static asymmetric only (uint8 activations)


@dataclass(frozen=True)
class ExportLinear:
    """One quantized linear layer, weight ``[out, in]`` as the Hugging Face module stores it.

    ``q`` holds the integers the rounding chose, in the scheme's range (symmetric ``[-(2^(b-1)-1),
    2^(b-1)-1]``, asymmetric ``[0, 2^b-1]``); the weight the model computes with is
    ``(q - zero_point) * scale`` per block of ``group_size`` input channels (per output channel when
    ``group_size`` is None). ``zero_point`` is None for symmetric weights; otherwise float (it may
    be fractional: HQQ, RTN; the compressed-tensors writer rounds those and says so) or integral (GPTQ, AWQ).
    """

    q: torch.Tensor  # [N, K] integers
    scale: torch.Tensor  # float32 [N, K // group_size] ([N, 1] per channel)
    zero_point: torch.Tensor | None  # [N, K // group_size] or None
    bits: int
    symmetric: bool
    group_size: int | None
    bias: torch.Tensor | None = None
    activation: ExportActivation | None = None  # None: weight-only (float activations)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.q.shape
        group = k if self.group_size is None else self.group_size
        q = self.q.to(torch.float32).reshape(n, k // group, group)
        if self.zero_point is not None:
            q = q - self.zero_point.to(torch.float32).reshape(n, k // group, 1)
        return (q * self.scale.to(torch.float32).reshape(n, k // group, 1)).reshape(n, k).to(dtype)


@dataclass
class ExportModel:
    """A quantized model ready for a writer.

    ``tensors``: every float tensor by Hugging Face state-dict name (embeddings, norms with any
    SmoothQuant/rotation scales folded in, a float LM head, biases of float layers); the quantized
    linears' weights are not in it. ``linears``: by module name (``model.layers.0.self_attn.q_proj``;
    its weight is ``<name>.weight``). ``config``: the model's Hugging Face ``config.json`` as a dict.
    ``tokenizer_dir``: a folder holding the tokenizer files to ship. ``source_gguf``: the GGUF file the
    model was loaded from, if any (its tokenizer metadata can be copied into a GGUF export).
    """

    config: dict
    tensors: dict[str, torch.Tensor]
    linears: dict[str, ExportLinear]
    tokenizer_dir: Path | None = None
    source_gguf: Path | None = None
    tied_embeddings: bool = False
    notes: list[str] = field(default_factory=list)  # how it was made, for the export's README
