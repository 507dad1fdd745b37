"""The stored form of a quantized weight (``qcompiler.core.storage``): packing is lossless at every width, the
encoded tensors take exactly the bytes the count gives, and decode gives the held tensors back bit for bit."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompiler.config import WeightScheme
from qcompiler.core import storage
from qcompiler.passes.weight_rounding import round_to_nearest


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), numel=st.integers(0, 700), signed=st.booleans(), seed=st.integers(0, 2**16))
def test_packing_is_lossless_and_takes_bits_per_value(bits, numel, signed, seed):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    q = torch.randint(lo, hi, (numel,), generator=gen).to(torch.int8 if signed else torch.uint8)
    data = storage.pack(q, bits)
    assert data.dtype == torch.uint8 and data.numel() == (numel * bits + 7) // 8 == storage.packed_bytes(numel, bits)
    assert torch.equal(storage.unpack(data, bits, q.shape, q.dtype, signed), q)


def test_values_that_do_not_fit_and_wrong_sizes_are_errors():
    with pytest.raises(ValueError, match="do not fit 3 bits"):
        storage.pack(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match="take 2 bytes"):
        storage.unpack(torch.zeros(3, dtype=torch.uint8), 4, (4,), torch.uint8, False)


SCHEMES = {
    "int4-g32-asym-float-zero": WeightScheme(bits=4, granularity="per_group", group_size=32, symmetric=False),
    "int4-g32-asym-fp16": WeightScheme(bits=4, granularity="per_group", group_size=32, symmetric=False,
                                       fp16_scales=True),
    "int3-g16-sym": WeightScheme(bits=3, granularity="per_group", group_size=16, symmetric=True),
    "int8-channel-sym": WeightScheme(bits=8),
    "int2-g32-sym-fp16": WeightScheme(bits=2, granularity="per_group", group_size=32, symmetric=True, fp16_scales=True),
}


@pytest.mark.parametrize("name", SCHEMES)
def test_encoded_bytes_are_the_count_and_decode_exactly(name):
    scheme = SCHEMES[name]
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    qw = round_to_nearest(w, scheme)
    encoded = storage.encode_weight(qw.q, qw.scale, qw.zero_point, qw.bits)
    assert sum(t.numel() * t.element_size() for _, t, _ in encoded) == qw.nbytes
    decoded = {}
    for role, data, entry in sorted(encoded, key=lambda e: e[0] == "zero"):  # the scale before an fp16 offset
        decoded[role] = storage.decode(data, entry, scale=decoded.get("scale"))
    for role, held in (("q", qw.q), ("scale", qw.scale), ("zero", qw.zero_point)):
        if held is not None:
            assert decoded[role].dtype == held.dtype and torch.equal(decoded[role], held), role
    groups = 64 // (scheme.group_size or 64) * 24
    scale_bytes = 2 if scheme.fp16_scales else 4
    zero_bytes = 0 if scheme.symmetric else scale_bytes  # fp16 offsets (GGUF's m) or float32 zero points
    assert qw.nbytes == storage.packed_bytes(w.numel(), scheme.bits) + groups * (scale_bytes + zero_bytes)


def test_integer_zero_points_are_packed_at_the_weights_bits():
    q = torch.randint(0, 16, (8, 32), dtype=torch.uint8)
    scale, zero = torch.rand(8, 1) + 0.1, torch.randint(0, 16, (8, 1)).to(torch.float32)
    encoded = {role: (data, entry) for role, data, entry in storage.encode_weight(q, scale, zero, 4)}
    assert encoded["zero"][1]["form"] == "codes" and encoded["zero"][0].numel() == 4
    assert torch.equal(storage.decode(*encoded["zero"]), zero)
    assert storage.weight_bytes(q, scale, zero, 4) == 8 * 32 // 2 + 8 * 4 + 4
