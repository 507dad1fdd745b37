"""GGUF writer: an :class:`ExportModel` of a Llama model as a llama.cpp GGUF file, holding exactly the
integers and scales qcompiler chose (no re-quantization of the quantized linears).

Format facts (ggml's ``ggml-common.h``, ``dequantize_row_*`` in ``ggml-quants.c``, llama-cpp-python 0.3.36's
llama.cpp; the gguf package's ``quants.py``): a block is 32 consecutive weights of one row along the input
dimension (the HF ``[out, in]`` weight's last axis); ``ggml_half`` is IEEE fp16, little-endian.
* ``Q8_0`` (34 bytes): ``d`` fp16, ``qs`` 32 x int8; ``w[j] = d * qs[j]``.
* ``Q4_0`` (18 bytes): ``d`` fp16, ``qs`` 16 bytes; byte ``j`` holds element ``j`` in its low nibble
  and element ``j + 16`` in its high nibble; ``w = d * (nibble - 8)``.
* ``Q4_1`` (20 bytes): ``d`` fp16, ``m`` fp16, ``qs`` as Q4_0; ``w = d * nibble + m``.

qcompiler's weight is ``(q - z) * s`` per group; a group of ``g`` channels (``g`` a multiple of 32,
per channel included) is written as ``g / 32`` blocks sharing its ``s``, so symmetric weights map to
``d = s`` and asymmetric ones to Q4_1 with ``d = s, m = -z * s`` (computed in float32). ``s`` must be
exactly fp16 and ``m`` an fp16 number to float32's rounding (``WeightScheme(fp16_scales=True)`` chooses
both so), otherwise the file could not hold what qcompiler computes, and the writer refuses.

llama.cpp's ``llama`` loader (``src/models/llama.cpp``) wants ``token_embd``, ``output_norm``, per
block ``attn_norm, attn_q/k/v/output, ffn_norm, ffn_gate/up/down`` (biases optional); ``output`` is
optional: without it llama.cpp uses ``token_embd`` (tied embeddings). Q and K rows are permuted as
llama.cpp's HF converter does (``LlamaModel.permute``: within each head, the two rotary halves are
interleaved); transformers undoes it when it loads a GGUF (``LlamaTensorProcessor``), so every model we
export holds the HF layout and the permutation is always applied. Whole rows move, scales and zero
points with them, so the integers stay exact.

Checked end to end: with integers rounded as ggml rounds, the files are byte-identical to what
``llama-quantize`` writes (Q8_0, Q4_0: ``tests/tools/test_export_gguf.py``); an all-F32 export of
stories260K gives llama.cpp the perplexity of its original GGUF. Reading back: ``gguf_read.py``.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import torch

from qcompiler.core.errors import ExportError
from qcompiler.passes.weight_rounding.common import offset_is_fp16
from qcompiler.tools.export import gguf_tokenizer
from qcompiler.tools.export.model import ExportLinear, ExportModel

QK = 32  # weights per block in Q8_0 / Q4_0 / Q4_1
GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1")
FILE_TYPES = {"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
              "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}
_SKIPPED = re.compile(r".*rotary_emb\.inv_freq$")


def write_gguf(model: ExportModel, path: str | Path, gguf_type: str, *, embedding_type: str = "Q8_0",
               float_type: str = "F16", name: str | None = None, tokenizer_pre: str | None = None) -> Path:
    """Write ``model`` as a llama.cpp GGUF file; every quantized linear is stored as ``gguf_type``.

    ``embedding_type`` ("Q8_0", "F16", "F32"): float token embedding and LM head (Q8_0 is rounded here,
    per block absmax as ggml does). ``float_type`` ("F16", "F32"): linears the recipe left in float.
    Norms and biases are F32. Everything is checked before the file is created; the file appears
    atomically (temporary file in the same folder, then ``os.replace``).
    """
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"gguf_type {gguf_type!r} is not supported; supported: {', '.join(GGUF_TYPES)}")
    if embedding_type not in ("Q8_0", "F16", "F32") or float_type not in ("F16", "F32"):
        raise ExportError("embedding_type must be Q8_0, F16 or F32; float_type F16 or F32")
    cfg = model.config
    check_architecture(cfg)
    writer = gguf.GGUFWriter(None, "llama")
    _add_hparams(writer, cfg, gguf_type, name, model.notes)
    vocab = _add_tokenizer(writer, model, tokenizer_pre)
    tensors = _gguf_tensors(model, gguf_type, embedding_type, float_type)
    if (freqs := _llama3_rope_factors(cfg)) is not None:
        tensors["rope_freqs.weight"] = (freqs.numpy(), gguf.GGMLQuantizationType.F32)
    _check_tensors(tensors, cfg, vocab, model.tied_embeddings)
    for gname, (data, qtype) in tensors.items():
        writer.add_tensor(gname, data, raw_dtype=qtype)
    return _write_atomically(writer, Path(path))


def check_architecture(cfg: dict) -> None:
    """An :class:`ExportError` unless ``cfg`` (a Hugging Face config dict) is a model llama.cpp's llama
    loader runs."""
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    if cfg.get("model_type") != "llama" or archs != ["LlamaForCausalLM"]:
        raise ExportError(f"GGUF export supports model_type 'llama' (LlamaForCausalLM) only; this model is "
                         f"model_type {cfg.get('model_type')!r}, architectures {cfg.get('architectures')}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ExportError(f"llama.cpp's llama architecture uses SiLU; this model has {cfg['hidden_act']!r}")


def _rope(cfg: dict) -> dict:
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    if rope["rope_type"] not in ("default", "linear", "llama3"):
        raise ExportError(f"RoPE type {rope['rope_type']!r} is not supported by the GGUF writer; "
                         "supported: default, linear, llama3")
    return rope


def _llama3_rope_factors(cfg: dict) -> torch.Tensor | None:
    """Llama 3.1's RoPE frequency factors, as llama.cpp's converter computes its ``rope_freqs`` tensor."""
    rope = _rope(cfg)
    if rope["rope_type"] != "llama3":
        return None
    dim = _head_dim(cfg)
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0)
    high = rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for wavelen in (2 * math.pi / freqs).tolist():
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _add_hparams(w: gguf.GGUFWriter, cfg: dict, gguf_type: str, name: str | None, notes: list[str]) -> None:
    w.add_name(name or cfg.get("_name_or_path") or "qcompiler export")
    if notes:
        w.add_description("\n".join(notes))
    w.add_file_type(FILE_TYPES[gguf_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(_head_dim(cfg))
    if cfg.get("head_dim"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    rope = _rope(cfg)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))


def _add_tokenizer(w: gguf.GGUFWriter, model: ExportModel, pre: str | None) -> int:
    if model.source_gguf is not None:
        return gguf_tokenizer.copy_from_gguf(w, model.source_gguf)
    if model.tokenizer_dir is not None:
        return gguf_tokenizer.build_from_dir(w, model.tokenizer_dir, model.config["vocab_size"], pre)
    raise ExportError("a GGUF file carries its tokenizer: set ExportModel.source_gguf (copied) or "
                     "ExportModel.tokenizer_dir (built from tokenizer.json)")


def gguf_name(hf_name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``."""
    module, _, suffix = hf_name.rpartition(".")
    if suffix in ("weight", "bias"):
        if module in _GLOBAL:
            return f"{_GLOBAL[module]}.{suffix}"
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
        if m and m[2] in _LAYER:
            return f"blk.{m[1]}.{_LAYER[m[2]]}.{suffix}"
    raise ExportError(f"{hf_name}: no tensor of llama.cpp's llama architecture corresponds to this name")


def permute_qk(t: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` on the rows of ``t`` (``inverse``: transformers' undoing)."""
    rows = t.shape[0]
    if inverse:
        return t.reshape(n_head, rows // n_head // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def qk_heads(hf_name: str, cfg: dict) -> int | None:
    """The head count a q_proj/k_proj tensor is permuted with; None for every other tensor."""
    if ".self_attn.q_proj." in hf_name:
        return cfg["num_attention_heads"]
    if ".self_attn.k_proj." in hf_name:
        return cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    return None


def _gguf_tensors(model: ExportModel, gguf_type: str, embedding_type: str, float_type: str) -> dict:
    """Every GGUF tensor as ``name -> (numpy data, GGMLQuantizationType)``, in the order written."""
    out, cfg = {}, model.config
    for mod, lin in model.linears.items():
        if (heads := qk_heads(mod + ".", cfg)) is not None:
            lin = _permute_linear(lin, heads)
        out[gguf_name(mod + ".weight")] = pack_linear(mod, lin, gguf_type)
        if lin.bias is not None:
            out[gguf_name(mod + ".bias")] = _float(mod + ".bias", lin.bias, "F32")
    tied = model.tied_embeddings or cfg.get("tie_word_embeddings", False)
    for hf, t in model.tensors.items():
        if _SKIPPED.fullmatch(hf) or (hf == "lm_head.weight" and tied and _same(t, model.tensors.get(
                "model.embed_tokens.weight"))):
            continue  # tied: llama.cpp falls back to token_embd
        gname = gguf_name(hf)
        if gname in out:
            raise ExportError(f"{hf}: given both as a float tensor and in model.linears")
        if (heads := qk_heads(hf, cfg)) is not None:
            t = permute_qk(t, heads)
        if t.ndim == 1:
            out[gname] = _float(hf, t, "F32")
        elif gname.startswith(("token_embd.", "output.")):
            out[gname] = _embedding(hf, t, embedding_type)
        else:
            out[gname] = _float(hf, t, float_type)
    return out


def _same(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    return b is not None and a.shape == b.shape and torch.equal(a, b)


def _check_tensors(tensors: dict, cfg: dict, vocab: int, tied: bool) -> None:
    need = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{p}.weight" for i in range(cfg["num_hidden_layers"])
        for p in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                  "ffn_down")]
    if missing := [n for n in need if n not in tensors]:
        raise ExportError(f"the model lacks tensors llama.cpp's llama loader needs: {missing[:8]}")
    if "output.weight" not in tensors and not (tied or cfg.get("tie_word_embeddings", False)):
        raise ExportError("the model has no lm_head and tie_word_embeddings is false")
    rows = tensors["token_embd.weight"][0].shape[0]
    if rows != vocab:
        raise ExportError(f"the tokenizer has {vocab} tokens but the embedding {rows} rows")


def _permute_linear(lin: ExportLinear, heads: int) -> ExportLinear:
    perm = lambda t: None if t is None else permute_qk(t, heads)  # noqa: E731
    return replace(lin, q=perm(lin.q), scale=perm(lin.scale), zero_point=perm(lin.zero_point), bias=perm(lin.bias))


def _float(name: str, t: torch.Tensor, kind: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    dtype = torch.float16 if kind == "F16" else torch.float32
    data = t.detach().to(torch.float32).to(dtype)
    if not torch.isfinite(data).all():
        raise ExportError(f"{name}: values are not finite in {kind}: write float layers as F32 (float_type='F32')")
    return data.contiguous().numpy(), gguf.GGMLQuantizationType[kind]


def _embedding(hf: str, t: torch.Tensor, kind: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    if kind != "Q8_0":
        return _float(hf, t, kind)
    if t.shape[-1] % QK:
        raise ExportError(f"{hf}: width {t.shape[-1]} is not a multiple of 32: use embedding_type='F16'")
    qtype = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(t.detach().to(torch.float32).numpy(), qtype), qtype


def _blocks(name: str, lin: ExportLinear, gguf_type: str) -> tuple:
    """``q`` as ``[N, K/32, 32]`` int16 with the per-block scale ``[N, K/32]`` and zero point (or None)."""
    n, k = lin.q.shape
    group = k if lin.group_size is None else lin.group_size
    if k % QK or group % QK:
        raise ExportError(f"{name}: GGUF {gguf_type} stores blocks of 32 input channels, but this layer has "
                         f"group_size {lin.group_size} over {k} inputs: quantize it with a group size that is a "
                         "multiple of 32 (32, 64, 128; per channel if the input size is one), or keep it in float")
    per = lambda t: t.to(torch.float32).reshape(n, k // group).repeat_interleave(group // QK, dim=1)  # noqa: E731
    zero = None if lin.zero_point is None else per(lin.zero_point)
    return lin.q.to(torch.int16).reshape(n, k // QK, QK), per(lin.scale), zero


def _fp16(t: torch.Tensor, name: str, what: str, fix: str) -> torch.Tensor:
    half = t.to(torch.float16)
    if not torch.equal(half.to(torch.float32), t):
        bad = int((half.to(torch.float32) != t).sum())
        raise ExportError(f"{name}: {bad} of {t.numel()} {what} are not exactly representable in fp16, and GGUF "
                         f"stores them as fp16: {fix}")
    return half


def _check_range(name: str, q: torch.Tensor, lo: int, hi: int, gguf_type: str) -> None:
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ExportError(f"{name}: integers span [{int(q.min())}, {int(q.max())}], outside {gguf_type}'s "
                         f"[{lo}, {hi}]")


def _need_bits(name: str, lin: ExportLinear, bits: int, gguf_type: str) -> None:
    if lin.bits > bits:
        raise ExportError(f"{name}: {lin.bits}-bit weights do not fit {gguf_type} ({bits} bits): quantize this "
                         f"layer to {bits} bits or fewer, or export as Q8_0")


_FP16_SCALES = ("quantize with WeightScheme(fp16_scales=True), which rounds the scales to fp16 before it chooses "
                "the integers (the w8a16-q8_0 and w4a16-q4_* presets)")


def pack_linear(name: str, lin: ExportLinear, gguf_type: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The GGUF bytes ``[N, K/32 * block bytes]`` of one quantized linear, exact or ValueError."""
    q, s, z = _blocks(name, lin, gguf_type)
    if gguf_type == "Q8_0":
        _need_bits(name, lin, 8, gguf_type)
        if z is not None:  # (q - z) is an exact int8 when the zero points are integers
            if not torch.equal(z, z.round()):
                raise ExportError(f"{name}: fractional zero points cannot be written as Q8_0 (d * q): quantize "
                                 "symmetrically or with integer zero points (or to 4 bits and export as Q4_1)")
            q = q - z.to(torch.int16)[..., None]
        _check_range(name, q, -128, 127, gguf_type)
        return _pack(gguf_type, _fp16(s, name, "scales", _FP16_SCALES), q.to(torch.int8).view(torch.uint8))
    _need_bits(name, lin, 4, gguf_type)
    if gguf_type == "Q4_0":
        if z is not None:
            raise ExportError(f"{name}: Q4_0 holds symmetric weights (d * q) and this layer is asymmetric: "
                             "export as Q4_1 or quantize it symmetrically")
        _check_range(name, q, -8, 7, gguf_type)
        return _pack(gguf_type, _fp16(s, name, "scales", _FP16_SCALES), _nibbles(q + 8))
    if z is None:  # symmetric into Q4_1: nibble q + 8, m = -8 d
        q, z = q + 8, torch.full_like(s, 8.0)
    _check_range(name, q, 0, 15, gguf_type)
    d = _fp16(s, name, "scales", _FP16_SCALES)
    m = _offsets(name, z, s)
    return _pack(gguf_type, d, m, _nibbles(q))


def _offsets(name: str, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Q4_1's ``m = -z * s`` as fp16: exact, or within one float32 step of an fp16 number (what
    ``WeightScheme(fp16_scales=True)`` chooses; float32 can not always hit it)."""
    ok = offset_is_fp16(z, s)
    if not bool(ok.all()):
        raise ExportError(f"{name}: {int((~ok).sum())} of {ok.numel()} minimums m = -zero_point * scale are not "
                         "fp16 numbers, and GGUF stores them as fp16: quantize with WeightScheme(fp16_scales=True) "
                         "(the w4a16-q4_1-* presets)")
    return (-z * s).to(torch.float16)


def _nibbles(u: torch.Tensor) -> torch.Tensor:
    u = u.to(torch.uint8)
    return u[..., : QK // 2] | (u[..., QK // 2 :] << 4)


def _pack(gguf_type: str, *parts: torch.Tensor) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Blocks ``[N, K/32, bytes]`` from fp16 fields ``[N, K/32]`` and the quant bytes ``[N, K/32, L]``."""
    n, nb = parts[0].shape[:2]
    fields = [p.view(torch.uint8).reshape(n, nb, 2) if p.dtype == torch.float16 else p for p in parts]
    data = torch.cat(fields, dim=2).reshape(n, -1).contiguous().numpy()
    qtype = gguf.GGMLQuantizationType[gguf_type]
    assert data.shape[1] == nb * gguf.GGML_QUANT_SIZES[qtype][1]
    return data, qtype


def _write_atomically(writer: gguf.GGUFWriter, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"  # the writer creates it (umask modes)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
