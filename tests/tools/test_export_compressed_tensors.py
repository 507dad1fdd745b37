"""The compressed-tensors writer: a tiny random Llama exported, then loaded back by transformers.

transformers + compressed-tensors (a dev dependency: missing, these tests fail, they do not skip) must
give back every linear's weight bit for bit equal to ``ExportLinear.dequantized()``, and, on the default
route (weights kept compressed, activations fake-quantized in the forward), the logits of a float model
with those weights and the same activation quantization.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qcompiler.core.errors import ExportError
from qcompiler.tools.export import compressed_tensors as ct
from qcompiler.tools.export.model import ExportActivation, ExportLinear, ExportModel

try:
    import compressed_tensors  # noqa: F401
except ImportError:  # a dev dependency: fail loudly rather than skip
    compressed_tensors = None

LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
DYNAMIC = ExportActivation(bits=8, symmetric=True, dynamic=True)


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                         max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def need_ct():
    if compressed_tensors is None:
        pytest.fail("compressed-tensors is not installed: it is in qcompiler's dev extra "
                    f"(pip install compressed-tensors=={ct.CT_VERSION})")


def int8_per_channel(w, activation):
    s = w.abs().amax(1, keepdim=True) / 127
    q = torch.round(w / s).clamp(-127, 127).to(torch.int8)
    return ExportLinear(q=q, scale=s, zero_point=None, bits=8, symmetric=True, group_size=None,
                        activation=activation)


def grouped(w, bits, group, symmetric):
    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = wg.abs().amax(-1) / qmax
        q = torch.round(wg / s[..., None]).clamp(-qmax, qmax)
        return ExportLinear(q=q.reshape(n, k).to(torch.int8), scale=s, zero_point=None, bits=bits,
                            symmetric=True, group_size=group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    s = (hi - lo) / (2**bits - 1)
    z = torch.round(-lo / s).clamp(0, 2**bits - 1)
    q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, 2**bits - 1)
    return ExportLinear(q=q.reshape(n, k).to(torch.uint8), scale=s, zero_point=z, bits=bits,
                        symmetric=False, group_size=group)


def export_model(llama, make) -> ExportModel:
    """``make(name, weight) -> ExportLinear`` for every decoder linear; the rest stays float."""
    sd = llama.state_dict()
    names = [f"model.layers.{i}.{s}" for i in range(2) for s in LINEAR]
    linears = {n: make(n, sd[n + ".weight"]) for n in names}
    tensors = {k: v for k, v in sd.items() if k.removesuffix(".weight") not in linears}
    config = {**llama.config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    return ExportModel(config=config, tensors=tensors, linears=linears, notes=["test export"])


def input_ranges(llama, ids):
    """max |x| and min/max of every decoder linear's input on ``ids``: a calibration pass."""
    ranges, hooks = {}, []
    for name, mod in llama.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            def hook(mod, args, name=name):
                ranges[name] = (float(args[0].min()), float(args[0].max()))
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        llama(ids)
    for h in hooks:
        h.remove()
    return ranges


IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))

SCHEMES = {
    "w8a8_dynamic": lambda n, w, r: int8_per_channel(w, DYNAMIC),
    "w8a8_static": lambda n, w, r: int8_per_channel(w, ExportActivation(
        8, True, False, scale=max(-r[n][0], r[n][1]) / 127)),
    "w8a8_static_asym": lambda n, w, r: int8_per_channel(w, ExportActivation(
        8, False, False, scale=(r[n][1] - r[n][0]) / 255, zero_point=round(-r[n][0] / ((r[n][1] - r[n][0]) / 255)))),
    "w4a16_asym_g32": lambda n, w, r: grouped(w, 4, 32, symmetric=False),
    "w4a16_sym_g32": lambda n, w, r: grouped(w, 4, 32, symmetric=True),
    "w4a16_asym_channel": lambda n, w, r: grouped(w, 4, w.shape[1], symmetric=False),
    "w8a16_sym_g64": lambda n, w, r: grouped(w, 8, 64, symmetric=True),
    "w2a16_asym_g32": lambda n, w, r: grouped(w, 2, 32, symmetric=False),
}


def build(llama, scheme) -> ExportModel:
    ranges = input_ranges(llama, IDS)
    em = export_model(llama, lambda n, w: SCHEMES[scheme](n, w, ranges))
    if scheme == "w4a16_asym_channel":  # per channel is group_size None
        em.linears = {n: ExportLinear(lin.q, lin.scale, lin.zero_point, 4, False, None)
                      for n, lin in em.linears.items()}
    return em


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_weights_decompress_exactly(llama, scheme, tmp_path, need_ct):
    em = build(llama, scheme)
    out = ct.write_compressed_tensors(em, tmp_path / "ckpt")
    got = ct.load_decompressed(out)
    for name, lin in em.linears.items():
        assert torch.equal(got[name + ".weight"], lin.dequantized()), name
    for name, t in em.tensors.items():
        assert torch.equal(got[name], t), name
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt"]  # no temporary sibling left


def float_reference(llama, em, act_quant):
    """``llama`` with every exported linear's dequantized weight and ``act_quant`` on its input."""
    import copy

    ref = copy.deepcopy(llama)
    for name, lin in em.linears.items():
        mod = ref.get_submodule(name)
        mod.weight.data = lin.dequantized()
        mod.register_forward_pre_hook(lambda mod, args, lin=lin: (act_quant(args[0], lin.activation),))
    return ref


def per_token(x, divisor):
    s = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / divisor
    return torch.clamp(torch.round(x / s), -128, 127) * s


def static(x, act):
    z = 0 if act.symmetric else act.zero_point
    lo, hi = (-128, 127) if act.symmetric else (0, 255)
    return (torch.clamp(torch.round(x / act.scale) + z, lo, hi) - z) * act.scale


@pytest.mark.parametrize("scheme", ["w8a8_dynamic", "w8a8_static", "w8a8_static_asym", "w4a16_sym_g32"])
def test_quantized_forward_logits(llama, scheme, tmp_path, need_ct):
    """Default route: transformers keeps the checkpoint compressed, decompresses at the first forward and
    fake-quantizes the activations (compressed-tensors: dynamic per-token scale = absmax / 127.5 on the
    grid [-128, 127]; static: round(x / s + z) on [-128, 127] with our z - 128)."""
    from transformers import AutoModelForCausalLM

    em = build(llama, scheme)
    out = ct.write_compressed_tensors(em, tmp_path / "ckpt")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        got = hf(IDS).logits
    if scheme == "w8a8_dynamic":
        ours = float_reference(llama, em, lambda x, act: per_token(x, 127.0))  # qcompiler's absmax/127
        with torch.no_grad():
            ref = ours(IDS).logits
        # the per-token scales differ by 127.5/127: within 2% of the logit range, not exact
        assert (got - ref).abs().max() < 0.02 * ref.abs().max()
        ct_ref = float_reference(llama, em, lambda x, act: per_token(x, 127.5))
    elif scheme.startswith("w8a8"):
        ct_ref = float_reference(llama, em, static)
    else:
        ct_ref = float_reference(llama, em, lambda x, act: x)
    with torch.no_grad():
        ref = ct_ref(IDS).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_config_and_tensors(llama, tmp_path):
    em = build(llama, "w8a8_static_asym")
    out = ct.write_compressed_tensors(em, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["format"] == "int-quantized" and qc["quantization_status"] == "compressed"
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    assert group["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": False,
                                          "group_size": None, "strategy": "tensor", "dynamic": False,
                                          "observer": "minmax"}
    sd = load_file(out / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj"
    lin = em.linears[name]
    assert sd[name + ".weight"].dtype == torch.int8 and sd[name + ".weight_scale"].shape == (256 // 4, 1)
    assert sd[name + ".input_zero_point"].dtype == torch.int8
    assert int(sd[name + ".input_zero_point"]) == lin.activation.zero_point - 128
    assert "lm_head" in (out / "README.md").read_text() and "test export" in (out / "README.md").read_text()


@pytest.mark.parametrize("bits", ct.PACKED_BITS)
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_matches_compressed_tensors(bits, dim, need_ct):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    values = torch.randint(lo, hi + 1, (20, 48), generator=torch.Generator().manual_seed(bits))
    ours = ct.pack_int32(values, bits, dim=dim)
    assert torch.equal(ours, pack_to_int32(values.to(torch.int8), bits, packed_dim=dim))
    assert torch.equal(unpack_from_int32(ours, bits, values.shape, packed_dim=dim), values.to(torch.int8))


def test_mixed_groups_and_tied_head(llama, tmp_path, need_ct):
    em = export_model(llama, lambda n, w: int8_per_channel(w, DYNAMIC) if "self_attn" in n
                      else grouped(w, 4, 32, symmetric=True))
    em.tensors.pop("lm_head.weight")
    em.config["tie_word_embeddings"] = True
    em.tied_embeddings = True
    qc = ct.config_groups_for(em)
    assert qc["format"] == "mixed-precision" and qc["ignore"] == ["lm_head"]
    assert [g["format"] for g in qc["config_groups"].values()] == ["int-quantized", "pack-quantized"]
    assert all(g["targets"][0].startswith("re:^(") for g in qc["config_groups"].values())
    got = ct.load_decompressed(ct.write_compressed_tensors(em, tmp_path / "ckpt"))
    for name, lin in em.linears.items():
        assert torch.equal(got[name + ".weight"], lin.dequantized()), name
    assert torch.equal(got["lm_head.weight"], em.tensors["model.embed_tokens.weight"])


def replace(em, name, **changes):
    lin = em.linears[name]
    fields = {f: getattr(lin, f) for f in ("q", "scale", "zero_point", "bits", "symmetric", "group_size",
                                           "bias", "activation")}
    em.linears[name] = ExportLinear(**{**fields, **changes})
    return em


NAME = "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize("change, message", [
    (lambda lin: {"zero_point": lin.zero_point + 20}, r"zero points outside \[0, 15\]"),
    (lambda lin: {"bits": 3, "q": lin.q.clamp(0, 7), "zero_point": lin.zero_point.clamp(0, 7)},
     "3-bit .* pack-quantized is exported for"),
    (lambda lin: {"activation": DYNAMIC}, "4-bit asymmetric weights.*vLLM's W8A8"),
    (lambda lin: {"bits": 8, "symmetric": True, "zero_point": None, "activation": DYNAMIC},
     "8-bit symmetric weights, group 32"),
])
def test_refused_before_writing(llama, tmp_path, change, message):
    em = export_model(llama, lambda n, w: grouped(w, 4, 32, symmetric=False))
    replace(em, NAME, **change(em.linears[NAME]))
    with pytest.raises(ExportError, match=message) as err:
        ct.write_compressed_tensors(em, tmp_path / "ckpt")
    assert NAME in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_refused_activation_schemes(llama, tmp_path):
    em = export_model(llama, lambda n, w: int8_per_channel(w, ExportActivation(8, False, True)))
    with pytest.raises(ExportError, match="dynamic asymmetric activations.*exportable: W8A8"):
        ct.write_compressed_tensors(em, tmp_path / "ckpt")
    em = export_model(llama, lambda n, w: int8_per_channel(w, ExportActivation(8, True, False)))
    with pytest.raises(ExportError, match="without a calibrated scale"):
        ct.write_compressed_tensors(em, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_out_dir_must_be_absent_or_empty(llama, tmp_path):
    em = export_model(llama, lambda n, w: grouped(w, 4, 32, symmetric=True))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not an empty folder"):
        ct.write_compressed_tensors(em, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    (tmp_path / "ckpt" / "keep.txt").unlink()
    ct.write_compressed_tensors(em, tmp_path / "ckpt")  # an empty folder is replaced
    assert (tmp_path / "ckpt" / "model.safetensors").exists()


def test_refused_without_architectures(llama, tmp_path):
    em = export_model(llama, lambda n, w: grouped(w, 4, 32, symmetric=True))
    em.config["architectures"] = None  # as a GGUF-loaded config has it: vLLM could not pick a class
    with pytest.raises(ExportError, match="architectures"):
        ct.write_compressed_tensors(em, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_sharded_checkpoint_loads(llama, tmp_path, monkeypatch, need_ct):
    monkeypatch.setattr(ct, "MAX_SHARD_BYTES", 200_000)  # > 2 GB in real use
    em = build(llama, "w4a16_asym_g32")
    out = ct.write_compressed_tensors(em, tmp_path / "ckpt")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    got = ct.load_decompressed(out)
    for name, lin in em.linears.items():
        assert torch.equal(got[name + ".weight"], lin.dequantized()), name
