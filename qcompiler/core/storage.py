"""The stored form of a quantized weight: what an artifact holds for it (``qcompiler/artifact.py``) and what its
bits per weight count (``QuantizedWeight.nbytes``, the embedding tables, ``qcompiler.tools.model_bits``).

One rule, exact (the stored form decodes to the same tensors, bit for bit) and read from the tensors themselves:

- the integers: ``bits`` bits each, packed into bytes in order (the first value in the lowest bits of the
  first byte; 8-bit integers one per byte);
- a zero point that holds integers in ``[0, 2^bits - 1]``: packed the same way;
- an asymmetric zero point on fp16's grid (``WeightScheme(fp16_scales=True)``: the scale is an fp16 number
  and ``zero`` is :func:`zero_from_offset` of the fp16 offset ``m = -zero * scale``): that fp16 offset, two
  bytes, as GGUF stores ``d`` and ``m``;
- scales, and other float zero points: two bytes where every value is an fp16 number, otherwise as held
  (float32 scales: four bytes).

The kernels may hold a weight in another layout in memory (ATen's CPU int4 tiles with bf16 scale and offset,
float32 scales for the decode GEMV): that is ``LayerDecision.kernel_bytes``, not bits per weight.
"""

from __future__ import annotations

import torch

FP16_TINY = 2.0**-24  # the smallest positive fp16 (subnormal)
FP16_MAX = 65504.0
_CHUNK = 1 << 22  # values packed at a time (bounds the bit-plane temporaries)


def packed_bytes(numel: int, bits: int) -> int:
    """Bytes of ``numel`` integers of ``bits`` bits packed in order."""
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"integers are packed at 1..8 bits, got {bits}")


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """``q``'s values (each in ``[-2^(bits-1), 2^bits - 1]``: two's complement when negative) as a flat
    uint8 tensor of :func:`packed_bytes` bytes. :func:`unpack` with the same dtype and sign gives ``q`` back."""
    _check_bits(bits)
    flat = q.detach().reshape(-1).to(torch.int16)
    if flat.numel() and (int(flat.min()) < -(1 << (bits - 1)) or int(flat.max()) >= (1 << bits)):
        raise ValueError(f"values in [{int(flat.min())}, {int(flat.max())}] do not fit {bits} bits")
    codes = (flat & ((1 << bits) - 1)).to(torch.uint8)
    if bits == 8:
        return codes.clone()
    out = torch.zeros(packed_bytes(codes.numel(), bits), dtype=torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8)
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    step = _CHUNK - _CHUNK % 8  # whole bytes per chunk: every chunk starts at a byte boundary
    for start in range(0, codes.numel(), step):
        part = codes[start:start + step]
        planes = ((part[:, None] >> shifts) & 1).reshape(-1)  # the bits in order, lowest first
        planes = torch.nn.functional.pad(planes, (0, (-planes.numel()) % 8)).reshape(-1, 8)
        first = start * bits // 8
        out[first:first + planes.shape[0]] = (planes * weights).sum(1, dtype=torch.int32).to(torch.uint8)
    return out


def unpack(data: torch.Tensor, bits: int, shape, dtype: torch.dtype, signed: bool) -> torch.Tensor:
    """The ``shape`` integers :func:`pack` stored in ``data``, as ``dtype`` (``signed``: two's complement)."""
    _check_bits(bits)
    numel = 1
    for d in shape:
        numel *= int(d)
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != packed_bytes(numel, bits):
        raise ValueError(f"{numel} values of {bits} bits take {packed_bytes(numel, bits)} bytes, "
                         f"got a {data.dtype} tensor of shape {tuple(data.shape)}")
    if bits == 8:
        codes = data.to(torch.int16)
    else:
        shifts = torch.arange(8, dtype=torch.uint8)
        planes = ((data[:, None] >> shifts) & 1).reshape(-1)[:numel * bits].reshape(numel, bits).to(torch.int16)
        codes = (planes << torch.arange(bits, dtype=torch.int16)).sum(1, dtype=torch.int16)
    if signed:
        codes = torch.where(codes >= (1 << (bits - 1)), codes - (1 << bits), codes)
    return codes.to(dtype).reshape(tuple(shape))


def is_fp16(t: torch.Tensor) -> bool:
    """Is every value of the float tensor ``t`` an fp16 number (finite, exactly)?"""
    if not t.is_floating_point():
        return False
    half = t.detach().to(torch.float16)
    return bool(torch.isfinite(half).all()) and torch.equal(half.to(t.dtype), t.detach())


def integer_codes(t: torch.Tensor, bits: int) -> bool:
    """Does ``t`` hold only integers in ``[0, 2^bits - 1]`` (a zero point packable at ``bits`` bits)?"""
    x = t.detach()
    if x.is_floating_point():
        if not bool(torch.isfinite(x).all()) or not torch.equal(x, x.round()):
            return False
    return x.numel() == 0 or (int(x.min()) >= 0 and int(x.max()) < (1 << bits))


def zero_from_offset(s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The float32 zero point whose offset ``-zero * s`` is closest to the fp16 offset ``m`` (``s`` an fp16
    scale): ``-m / s`` or one of its float32 neighbours (products with an fp16 scale can step over ``m``)."""
    s, m = s.to(torch.float32), m.to(torch.float32)
    guess = -m / s
    best, best_err = guess, (-guess * s - m).abs()
    for step in (float("inf"), float("-inf")):
        cand = torch.nextafter(guess, torch.full_like(guess, step))
        err = (-cand * s - m).abs()
        best, best_err = torch.where(err < best_err, cand, best), torch.minimum(err, best_err)
    return best


def fp16_offset(zero: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """The fp16 offsets ``m`` that give ``zero`` back exactly through :func:`zero_from_offset` (None when
    ``scale`` is not on fp16's grid or some zero point is not one of these)."""
    if zero.dtype != torch.float32 or scale.shape != zero.shape or not is_fp16(scale):
        return None
    m = (-zero * scale.to(torch.float32)).clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    if not torch.equal(zero_from_offset(scale, m), zero):
        return None
    return m


def float_bytes(t: torch.Tensor) -> int:
    """Bytes of a float tensor as stored: two per value where all are fp16 numbers, else its own width."""
    return t.numel() * (2 if t.element_size() > 2 and is_fp16(t) else t.element_size())


def zero_point_form(zero: torch.Tensor, scale: torch.Tensor, bits: int) -> str:
    """How a zero point is stored: ``"codes"`` (packed integers), ``"offset"`` (fp16 ``m``) or ``"float"``."""
    if integer_codes(zero, bits):
        return "codes"
    if fp16_offset(zero, scale) is not None:
        return "offset"
    return "float"


def weight_bytes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> int:
    """Bytes of one quantized weight in its stored form (the module docstring)."""
    total = packed_bytes(q.numel(), bits) + float_bytes(scale)
    if zero is not None:
        form = zero_point_form(zero, scale, bits)
        total += (packed_bytes(zero.numel(), bits) if form == "codes" else 2 * zero.numel() if form == "offset"
                  else float_bytes(zero))
    return total


# --- the artifact's encoding: one stored tensor per held tensor, with what decodes it ---------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def encode_weight(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int):
    """The stored form of one quantized weight: ``[(role, stored tensor, entry)]`` for ``q``, ``scale`` and
    ``zero``, each ``entry`` (JSON) what :func:`decode_weight` needs; the stored tensors' bytes sum to
    :func:`weight_bytes`."""
    def held(t: torch.Tensor, entry: dict) -> dict:
        return entry | {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)}

    signed = bool(q.numel() and int(q.min()) < 0)
    scale_data, scale_entry = encode_float(scale)
    out = [("q", pack(q, bits), held(q, {"form": "codes", "bits": bits, "signed": signed})),
           ("scale", scale_data, held(scale, scale_entry))]
    if zero is not None:
        form = zero_point_form(zero, scale, bits)
        if form == "codes":
            data, entry = pack(zero, bits), {"form": "codes", "bits": bits, "signed": False}
        elif form == "offset":
            data, entry = fp16_offset(zero, scale), {"form": "offset"}
        else:
            data, entry = encode_float(zero)
        out.append(("zero", data, held(zero, entry)))
    return out


def encode_float(t: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """A float tensor in two bytes per value where all are fp16 numbers, else as held."""
    if t.element_size() > 2 and is_fp16(t):
        return t.detach().to(torch.float16).contiguous(), {"form": "fp16"}
    return t.detach().contiguous(), {"form": "plain"}


def decode(stored: torch.Tensor, entry: dict, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The held tensor ``stored`` encodes (``entry`` from :func:`encode_weight`); an ``"offset"`` zero point
    needs its decoded ``scale``. Raises ValueError on an entry that does not describe ``stored``."""
    dtype, shape = _dtype(entry["dtype"]), [int(d) for d in entry["shape"]]
    form = entry.get("form")
    if form == "codes":
        return unpack(stored, int(entry["bits"]), shape, dtype, bool(entry["signed"]))
    if form == "offset":
        if scale is None or stored.dtype != torch.float16 or list(stored.shape) != list(scale.shape):
            raise ValueError("an fp16 offset needs its fp16 scale of the same shape")
        return zero_from_offset(scale, stored).to(dtype)
    if form in ("fp16", "plain"):
        if list(stored.shape) != shape or (form == "fp16" and stored.dtype != torch.float16):
            raise ValueError(f"a {form} tensor of shape {shape} was expected, got {stored.dtype} {tuple(stored.shape)}")
        return stored.to(dtype)
    raise ValueError(f"unknown stored form {form!r}")
