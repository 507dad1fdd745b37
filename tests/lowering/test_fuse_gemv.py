"""fuse_gemv: decode-step GEMVs that read the same input become one call on stacked weights (exactly)."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from graphs import decode_step, tiny_llama

from qcompiler.lowering.fuse_gemv import fuse_gemv
from qcompiler.lowering.kernels import native, reference

pytestmark = pytest.mark.skipif(native.unavailable_reason() is not None,
                                reason=f"no C++ toolchain here: {native.unavailable_reason()}")


def _quantize(x):
    scale = x.abs().amax(-1, keepdim=True) / 127.0
    return (torch.round(x / scale) + 128).clamp(1, 255).to(torch.uint8), scale


class _Int8Layers(torch.nn.Module):
    """Three int8 layers, each quantizing the input itself (as the lowered graph does), a fourth on another
    input, and a fifth whose input the graph updates in place between the reads."""

    def __init__(self, widths=(48, 16, 16, 24, 8), k=32) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        for i, n in enumerate(widths):
            w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int32).to(torch.int8)
            self.register_buffer(f"w{i}", w)
            self.register_buffer(f"r{i}", w.sum(1, dtype=torch.int32))
            self.register_buffer(f"s{i}", torch.rand(n, generator=gen) * 0.01)

    def _layer(self, i, x):
        xq, scale = _quantize(x)
        return torch.ops.qcompiler.int8_gemv(xq, 128, getattr(self, f"w{i}"), getattr(self, f"r{i}"),
                                             getattr(self, f"s{i}")) * scale

    def forward(self, x, y):
        a, b, c = self._layer(0, x), self._layer(1, x), self._layer(2, x)
        d = self._layer(3, y)
        e = self._layer(4, y)  # reads y after ...
        y.mul_(2.0)  # ... an in-place update: the two reads of y are not the same value
        f = self._layer(4, y)
        return a, b, c, d, e, f


def _calls(gm, name):
    return [n for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target)]


def test_layers_reading_one_input_share_one_call_and_give_the_same_bits():
    module = _Int8Layers()
    gm = fx.symbolic_trace(module)
    x, y = torch.randn(1, 32), torch.randn(1, 32)
    expected = gm(x, y.clone())
    result = fuse_gemv(gm)
    got = gm(x, y.clone())
    assert result.counts == {"stacked_gemv_calls": 1, "gemv_calls_stacked": 3}  # a, b, c; not d, e, f
    assert len(_calls(gm, "int8_gemv")) == 4
    stacked = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("qc_stacked_")]
    assert gm.get_buffer(stacked[0].target).shape == (48 + 16 + 16, 32)
    assert not hasattr(gm, "w1") and hasattr(gm, "w3")  # the stacked layers' own buffers are gone
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)


def test_several_rows_are_split_into_contiguous_outputs():
    gm = fx.symbolic_trace(_Int8Layers())
    x, y = torch.randn(3, 2, 32), torch.randn(3, 2, 32)
    expected = gm(x, y.clone())
    fuse_gemv(gm)
    got = gm(x, y.clone())
    assert all(torch.equal(g, e) and g.is_contiguous() for g, e in zip(got, expected, strict=True))


class _Int4Layers(torch.nn.Module):
    def __init__(self, widths=(16, 8), k=64, group=32) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.group = group
        for i, n in enumerate(widths):
            packed = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.int32).to(torch.uint8)
            self.register_buffer(f"p{i}", packed)
            self.register_buffer(f"s{i}", torch.rand(n, k // group, generator=gen) * 0.1)
            self.register_buffer(f"z{i}", torch.full((n, k // group), 8.0))

    def forward(self, x):
        return tuple(torch.ops.qcompiler.int4_gemv(x, getattr(self, f"p{i}"), getattr(self, f"s{i}"),
                                                   getattr(self, f"z{i}"), self.group) for i in range(2))


def test_int4_layers_are_stacked_too():
    gm = fx.symbolic_trace(_Int4Layers())
    x = torch.randn(1, 64)
    expected = gm(x)
    result = fuse_gemv(gm)
    assert result.counts == {"stacked_gemv_calls": 1, "gemv_calls_stacked": 2}
    assert all(torch.equal(g, e) for g, e in zip(gm(x), expected, strict=True))


class _TiledInt4Layers(torch.nn.Module):
    def __init__(self, widths=(64, 32), k=64, group=32) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.group = group
        for i, n in enumerate(widths):
            q = torch.randint(0, 16, (n, k), generator=gen)
            tiled, scale, zero = reference.pack_int4_tiled(q, torch.rand(n, k // group, generator=gen) * 0.1,
                                                           torch.randint(0, 16, (n, k // group), generator=gen).float())
            for name, t in (("p", tiled), ("s", scale), ("z", zero)):
                self.register_buffer(f"{name}{i}", t)

    def forward(self, x):
        return tuple(torch.ops.qcompiler.int4_gemv_tiled(x, getattr(self, f"p{i}"), getattr(self, f"s{i}"),
                                                         getattr(self, f"z{i}"), self.group) for i in range(2))


def test_tiled_int4_layers_are_stacked_by_whole_tiles():
    # a buffer's first dimension counts tiles of 32 output channels: each layer's slice of the stacked
    # output is 32 x its tiles wide
    gm = fx.symbolic_trace(_TiledInt4Layers())
    x = torch.randn(1, 64)
    expected = gm(x)
    assert [e.shape[-1] for e in expected] == [64, 32]
    result = fuse_gemv(gm)
    assert result.counts == {"stacked_gemv_calls": 1, "gemv_calls_stacked": 2}
    assert all(torch.equal(g, e) for g, e in zip(gm(x), expected, strict=True))


@pytest.mark.inductor
def test_a_decode_step_calls_four_gemvs_per_block_and_keeps_its_logits():
    model = tiny_llama()
    fast, rep = decode_step(model, kernels="fast")
    reference, _ = decode_step(model, kernels="reference")
    passes = {p.name: p for p in rep.passes}
    # per block: q/k/v in one call, gate/up in one call (o and down alone): 2 stacked calls of 5 layers
    assert passes["fuse_gemv"].counts == {"stacked_gemv_calls": 4, "gemv_calls_stacked": 10}
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)
