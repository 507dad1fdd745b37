import copy

import pytest
import torch
import torch.nn.functional as F
from graphs import capture_graph, count_calls, tiny_bert, tiny_gpt2, tiny_llama

from qcompiler.core.ir import LINEAR
from qcompiler.passes.canonicalize import LINEAR_TARGET, canonicalize


class MatmulForms(torch.nn.Module):
    """Every linear-like spelling against a parameter."""

    def __init__(self):
        super().__init__()
        self.w_in_out = torch.nn.Parameter(torch.randn(16, 24))  # [in, out]
        self.w_out_in = torch.nn.Parameter(torch.randn(24, 16))  # [out, in]
        self.w_sq = torch.nn.Parameter(torch.randn(24, 24))
        self.bias = torch.nn.Parameter(torch.randn(24))

    def forward(self, x):
        a = x @ self.w_in_out
        b = torch.matmul(x, self.w_out_in.t())
        c = torch.addmm(self.bias, x.reshape(-1, 16), self.w_in_out).reshape(a.shape)
        d = F.linear(x, self.w_out_in, self.bias)
        e = torch.matmul(a + b + c + d, self.w_sq.T)
        f = F.linear(e, self.w_sq.transpose(0, 1))
        return f + torch.mm(x.reshape(-1, 16), self.w_in_out).reshape(a.shape)


def _check_equal_in_float64(model, *inputs, expected_sites):
    model = copy.deepcopy(model).double()
    inputs = [i.double() if i.is_floating_point() else i for i in inputs]
    gm, example_inputs = capture_graph(model, *inputs)
    before = copy.deepcopy(gm)
    with torch.inference_mode():
        expected = before(*example_inputs)
        result = canonicalize(gm)
        gm.graph.lint()
        got = result.graph_module(*example_inputs)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    sites = [n for n in gm.graph.nodes if LINEAR in n.meta]
    assert all(n.target is LINEAR_TARGET for n in sites)
    assert len(sites) == expected_sites
    return result, gm


def test_every_matmul_spelling_becomes_linear_and_the_function_is_unchanged():
    result, gm = _check_equal_in_float64(MatmulForms(), torch.randn(2, 3, 16), expected_sites=7)
    assert result.modified
    assert count_calls(gm, torch.addmm) == count_calls(gm, torch.matmul) == count_calls(gm, torch.mm) == 0
    transposed = sorted((n.meta[LINEAR].weight_param, n.meta[LINEAR].transposed) for n in gm.graph.nodes if LINEAR in n.meta)
    assert transposed == [("w_in_out", True)] * 3 + [("w_out_in", False)] * 2 + [("w_sq", False), ("w_sq", True)]


def test_gpt2_conv1d_addmm_is_canonicalized():
    model = tiny_gpt2()
    ids = torch.randint(0, 128, (1, 12))
    result, gm = _check_equal_in_float64(model, ids, expected_sites=2 * 4 + 1)
    assert result.counts["addmm"] == 8
    modules = sorted(n.meta[LINEAR].module for n in gm.graph.nodes if LINEAR in n.meta)
    assert "transformer.h.0.attn.c_attn" in modules and "lm_head" in modules


@pytest.mark.parametrize("factory,expected", [(tiny_llama, 2 * 7 + 1), (tiny_bert, 2 * 6 + 1)])
def test_linear_models_are_annotated_without_rewrites(factory, expected):
    model = factory()
    ids = torch.randint(0, 128, (1, 10))
    result, gm = _check_equal_in_float64(model, ids, expected_sites=expected)
    assert result.counts["rewritten"] == 0
    assert not result.modified


def test_canonicalize_is_idempotent():
    gm, example_inputs = capture_graph(MatmulForms(), torch.randn(2, 3, 16))
    canonicalize(gm)
    again = canonicalize(gm)
    assert not again.modified


def test_matmul_between_activations_is_left_alone():
    class Attn(torch.nn.Module):
        def forward(self, q, k):
            return q @ k.transpose(-1, -2)

    gm, _ = capture_graph(Attn(), torch.randn(2, 4, 8), torch.randn(2, 4, 8))
    result = canonicalize(gm)
    assert not result.modified and not any(LINEAR in n.meta for n in gm.graph.nodes)
    assert result.details == ()


class ProductsThatAreNotLinears(torch.nn.Module):
    """Products on parameters with no linear form: each stays in float and is reported with why."""

    def __init__(self):
        super().__init__()
        self.left = torch.nn.Parameter(torch.randn(8, 4))  # P @ x
        self.cube = torch.nn.Parameter(torch.randn(2, 8, 8))  # 3-D weight: bmm
        self.scaled = torch.nn.Parameter(torch.randn(8, 8))  # addmm with alpha
        self.bias = torch.nn.Parameter(torch.randn(8))
        self.mix = torch.nn.Parameter(torch.randn(8, 8))  # einsum
        self.conv = torch.nn.Conv1d(4, 4, 1)
        self.viewed = torch.nn.Parameter(torch.randn(64))  # a weight that reaches linear through .view
        self.fc = torch.nn.Linear(8, 8)  # the one real linear

    def forward(self, x):  # x [2, 4, 8]
        a = self.left @ x  # [2, 8, 8]
        b = torch.bmm(a, self.cube)
        c = torch.addmm(self.bias, b.reshape(-1, 8), self.scaled, alpha=0.5).reshape(b.shape)
        d = torch.einsum("bij,jk->bik", c, self.mix)
        e = self.conv(x)  # [2, 4, 8]
        f = F.linear(d, self.viewed.view(8, 8))
        return self.fc(d).sum() + e.sum() + f.sum()


def test_products_on_parameters_that_are_not_linears_are_reported_with_the_reason():
    model = ProductsThatAreNotLinears()
    x = torch.randn(2, 4, 8)
    result, gm = _check_equal_in_float64(model, x, expected_sites=1)
    assert result.counts["kept_float"] == 6
    why = {d.param: d.reason for d in result.details}
    assert set(why) == {"left", "cube", "scaled", "mix", "conv.weight", "viewed"}
    assert "through a view or cast" in why["viewed"]
    assert all(d.bits_per_weight == 64 and d.weight_bytes == d.float_weight_bytes > 0 for d in result.details)
    assert all(not d.quantized for d in result.details)
    assert "left operand" in why["left"]
    assert "bmm on a parameter" in why["cube"]
    assert "alpha/beta" in why["scaled"]
    assert "einsum" in why["mix"]
    assert "conv1d" in why["conv.weight"]
    assert {d.module for d in result.details} >= {"conv [conv1d]"}


def test_the_backend_report_lists_products_it_kept_in_float():
    import qcompiler

    model = ProductsThatAreNotLinears()
    x = torch.randn(2, 4, 8)
    qcompiler.clear_reports()
    compiled = torch.compile(model, backend="qcompiler", fullgraph=True)
    with torch.inference_mode():
        expected, got = model(x), compiled(x)
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.5)
    rep = qcompiler.last_report()
    assert [d.module for d in rep.quantized] == ["fc"]
    kept = {d.param: d.reason for d in rep.kept_float}
    assert set(kept) == {"left", "cube", "scaled", "mix", "conv.weight", "viewed"}
    assert "conv [conv1d]" in str(rep) and "left operand" in str(rep)
