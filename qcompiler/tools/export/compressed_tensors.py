"""Write an :class:`ExportModel` as a compressed-tensors checkpoint: the folder llm-compressor saves.

Hugging Face transformers (with the ``compressed-tensors`` package) and vLLM load it. The writer itself
needs neither: it writes plain safetensors and JSON. Format facts, read in the compressed-tensors sources
(0.17.0, which vLLM 0.32 pins, and 0.20.1) and vLLM 0.32's ``compressed_tensors`` quantization method:

* ``config.json`` gains ``quantization_config``: ``quant_method: "compressed-tensors"``,
  ``quantization_status: "compressed"``, ``format`` (the groups' one format, else ``"mixed-precision"``),
  ``config_groups`` {``group_i``: {``targets``, ``weights``, ``input_activations``,
  ``output_activations``, ``format``}}, ``ignore``, ``kv_cache_scheme``, ``sparsity_config`` and
  ``transform_config``. ``QuantizationScheme`` and ``QuantizationArgs`` forbid unknown keys.
  Targets: a class name (``"Linear"``), an exact module name, or ``re:`` + a regex (``re.match``).
* The integer grid is always signed, ``[-2^(b-1), 2^(b-1)-1]`` (``calculate_range`` ignores
  ``symmetric``), and the weight is ``(q - z) * s`` with an int8 zero point ``z`` on the same grid.
  Our asymmetric grid ``[0, 2^b-1]`` maps exactly by ``q' = q - 2^(b-1)``, ``z' = z - 2^(b-1)``; a uint8
  static activation zero point ``z`` in ``[0, 255]`` becomes the int8 ``input_zero_point`` ``z - 128``.
* ``int-quantized`` (W8A8): ``weight`` int8 ``[N, K]``, ``weight_scale`` ``[N, 1]``; static activations
  add ``input_scale`` ``[1]`` and, when asymmetric, ``input_zero_point`` int8 ``[1]``. vLLM's
  ``CompressedTensorsW8A8Int8`` takes symmetric tensor/channel weights only; dynamic per-token inputs
  need no tensor.
* ``pack-quantized`` (weight-only WNA16): ``weight_packed`` int32 ``[N, K*b/32]`` holds ``q' + 2^(b-1)``
  as unsigned b-bit fields, element ``j`` of each run of ``32/b`` at bit ``j*b``; ``weight_shape``
  int64 ``[2]`` = ``(N, K)``; ``weight_scale`` ``[N, K/g]`` (``[N, 1]`` per channel); asymmetric adds
  ``weight_zero_point`` packed the same way along the output dimension: int32 ``[ceil(N*b/32), K/g]``.
  For b in {2, 4, 8} the padded packing of 0.17 and the dense one of 0.18+ are bit-identical; for 3, 5,
  6, 7 they differ, so those widths are refused. int8 weight-only is 8-bit pack-quantized (what
  llm-compressor's W8A16 writes; vLLM reads it as ``CompressedTensorsWNA16`` ``uint8b128``).
* vLLM 0.32 on CPU (checked by loading SmolLM2-135M, /work/notes/compressed_tensors.md): W8A8 runs on
  ``CPUInt8ScaledMMLinearKernel`` (dynamic per-token scale ``absmax / 127``, as ours; transformers'
  compressed-tensors fake quant uses ``absmax / 127.5``); W4A16 on ``CPUWNA16LinearKernel``, which takes
  4-bit only (``uint4b8``/``uint4``), an even group size and K, N multiples of 32; W8A16 and 2-bit have
  no CPU kernel there (they load on GPU kernels and in transformers).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from qcompiler.core.errors import ExportError
from qcompiler.core.files import atomic_folder, occupied
from qcompiler.tools.export.model import ExportActivation, ExportLinear, ExportModel

CT_VERSION = "0.20.1"  # the compressed-tensors release whose output this mirrors
PACKED_BITS = (2, 4, 8)
MAX_SHARD_BYTES = 2 * 1024**3
_EMBEDDINGS = re.compile(r"(embed_tokens|embed_positions|wte|wpe|word_embeddings|position_embeddings)$")
_QPARAMS = ("weight_scale", "weight_zero_point", "weight_packed", "weight_shape", "input_scale",
            "input_zero_point", "weight_global_scale", "input_global_scale")
_HINT = ("exportable: W8A8 (int8 symmetric per-channel weights, int8 activations dynamic per token "
         "symmetric or static per tensor) or weight-only 2/4/8-bit per channel or group with integer "
         "zero points")


def _args(bits: int, symmetric: bool, strategy: str, group_size: int | None, dynamic: bool) -> dict:
    """``QuantizationArgs`` as compressed-tensors 0.20.1 dumps them (its None/empty fields left out)."""
    args = {"num_bits": bits, "type": "int", "symmetric": symmetric, "group_size": group_size,
            "strategy": strategy, "dynamic": dynamic}
    return args if dynamic else {**args, "observer": "minmax"}


def _activation_args(name: str, act: ExportActivation) -> dict:
    if act.bits != 8:
        raise ExportError(f"{name}: {act.bits}-bit activations; {_HINT}")
    if act.dynamic:
        if not act.symmetric:
            raise ExportError(f"{name}: dynamic asymmetric activations are not exported; {_HINT}")
        return _args(8, True, "token", None, True)
    if act.scale is None or (not act.symmetric and act.zero_point is None):
        raise ExportError(f"{name}: static activations without a calibrated scale/zero point")
    if not act.symmetric and not 0 <= act.zero_point <= 255:
        raise ExportError(f"{name}: activation zero point {act.zero_point} outside the uint8 range")
    return _args(8, act.symmetric, "tensor", None, False)


def _integral(t: torch.Tensor) -> bool:
    return not t.is_floating_point() or bool(torch.equal(t, t.round()))


def _check_integers(name: str, lin: ExportLinear) -> None:
    b = lin.bits
    lo, hi = (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if lin.symmetric else (0, 2**b - 1)
    if not _integral(lin.q) or int(lin.q.min()) < lo or int(lin.q.max()) > hi:
        raise ExportError(f"{name}: q is not integers in [{lo}, {hi}] for {b}-bit weights")
    zp = lin.zero_point
    if lin.symmetric:
        if zp is not None and bool(zp.ne(0).any()):
            raise ExportError(f"{name}: symmetric weights with a non-zero zero point")
        return
    if zp is None:
        raise ExportError(f"{name}: asymmetric weights without a zero point")
    if not _integral(zp):
        raise ExportError(f"{name}: fractional (float) zero points cannot be stored exactly in "
                         "compressed-tensors (int8 zero points); re-quantize with integer zero points "
                         "or export symmetric weights")
    if int(zp.min()) < 0 or int(zp.max()) > 2**b - 1:
        raise ExportError(f"{name}: zero points outside [0, {2**b - 1}] for {b}-bit weights")


def round_zero_points(model: ExportModel) -> tuple[ExportModel, str | None]:
    """``model`` with fractional (float) weight zero points rounded to the nearest integer (RTN and HQQ keep
    float ones; compressed-tensors stores integers), and a sentence stating what moved: each group's
    weights shift by ``(z - round(z)) * scale``, at most half a quantization step. ``None``: nothing to round
    (the model is returned as it is)."""
    linears, moved, mean_w, n = dict(model.linears), [], 0.0, 0
    for name, lin in model.linears.items():
        if lin.symmetric or lin.zero_point is None or _integral(lin.zero_point):
            continue
        zero = lin.zero_point.to(torch.float32).round().clamp(0, 2**lin.bits - 1)
        rounded = replace(lin, zero_point=zero)
        delta = (rounded.dequantized() - lin.dequantized()).abs()
        moved.append(delta)
        mean_w += float(lin.dequantized().abs().sum())
        n += delta.numel()
        linears[name] = rounded
    if not moved:
        return model, None
    flat = torch.cat([d.reshape(-1) for d in moved])
    note = (f"fractional weight zero points of {len(moved)} layers rounded to integers (compressed-tensors stores "
            f"integer zero points): each group's weights moved by (z - round(z)) * scale, at most half a step; "
            f"max |dw| {float(flat.max()):.3g}, mean |dw| {float(flat.mean()):.3g} (mean |w| {mean_w / n:.3g})")
    return replace(model, linears=linears, notes=[*model.notes, note]), note


def scheme_of(name: str, lin: ExportLinear) -> dict:
    """The compressed-tensors scheme (a config group without targets) of one linear; ValueError if none."""
    _check_integers(name, lin)
    have = (f"{lin.bits}-bit {'symmetric' if lin.symmetric else 'asymmetric'} weights, group "
            f"{lin.group_size or 'per channel'}")
    strategy = "group" if lin.group_size else "channel"
    if lin.activation is None:
        if lin.bits not in PACKED_BITS:
            raise ExportError(f"{name}: {have}, weight-only; pack-quantized is exported for "
                             f"{PACKED_BITS} bits only (3/5/6/7-bit packing differs between "
                             f"compressed-tensors versions); {_HINT}")
        weights = _args(lin.bits, lin.symmetric, strategy, lin.group_size, False)
        return {"weights": weights, "input_activations": None, "output_activations": None,
                "format": "pack-quantized"}
    if lin.bits != 8 or not lin.symmetric or lin.group_size is not None:
        raise ExportError(f"{name}: {have}, with {lin.activation.bits}-bit activations; vLLM's "
                         f"W8A8 int8 takes symmetric per-channel/tensor 8-bit weights; {_HINT}")
    return {"weights": _args(8, True, "channel", None, False),
            "input_activations": _activation_args(name, lin.activation),
            "output_activations": None, "format": "int-quantized"}


def float_linear_names(model: ExportModel) -> list[str]:
    """Modules left float that a ``Linear`` target could match: every 2-D ``.weight`` but embeddings."""
    names = [n.removesuffix(".weight") for n, t in model.tensors.items()
             if n.endswith(".weight") and t.ndim == 2]
    names = [n for n in names if n not in model.linears and not _EMBEDDINGS.search(n)]
    tied = model.tied_embeddings or model.config.get("tie_word_embeddings", False)
    if tied and "lm_head" not in names and "lm_head" not in model.linears:
        names.append("lm_head")
    return names


def schemes_of(model: ExportModel) -> dict[str, dict]:
    """Every quantized linear's scheme, by module name; ValueError for the first it cannot hold."""
    return {name: scheme_of(name, lin) for name, lin in model.linears.items()}


def config_groups_for(model: ExportModel, schemes: dict[str, dict] | None = None) -> dict:
    """The ``quantization_config`` block of ``config.json``; ValueError for a linear it cannot hold."""
    members: dict[str, list[str]] = {}
    for name, scheme in (schemes or schemes_of(model)).items():
        members.setdefault(json.dumps(scheme), []).append(name)
    config_groups = {}
    for i, (key, names) in enumerate(members.items()):
        if len(members) == 1:
            targets = ["Linear"]
        else:  # one anchored regex per group, so vLLM's fused q/k/v shards meet one target
            targets = ["re:^(" + "|".join(re.escape(n) for n in names) + ")$"]
        config_groups[f"group_{i}"] = {"targets": targets, **json.loads(key)}
    formats = {group["format"] for group in config_groups.values()}
    return {
        "config_groups": config_groups,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "global_compression_ratio": None,
        "ignore": float_linear_names(model),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }


def pack_int32(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed ``bits``-bit integers ``[R, C]`` into int32 along ``dim`` (see the module docstring)."""
    if bits not in PACKED_BITS:
        raise ExportError(f"packing {bits}-bit values is not exported (only {PACKED_BITS})")
    v = values.to(torch.int64) + 2 ** (bits - 1)
    if dim == 0:
        v = v.t()
    per_word = 32 // bits
    v = torch.nn.functional.pad(v, (0, -v.shape[1] % per_word))
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (v.reshape(v.shape[0], -1, per_word) << shifts).sum(-1)
    words = (words - ((words >> 31) << 32)).to(torch.int32)  # unsigned 32-bit -> two's complement
    return (words.t() if dim == 0 else words).contiguous()


def linear_tensors(name: str, lin: ExportLinear, fmt: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear in format ``fmt``."""
    offset = 0 if lin.symmetric else 2 ** (lin.bits - 1)
    q = lin.q.to(torch.int64) - offset
    out = {"weight_scale": lin.scale.to(torch.float32).reshape(lin.q.shape[0], -1).contiguous()}
    if fmt == "int-quantized":
        out["weight"] = q.to(torch.int8)
        act = lin.activation
        if not act.dynamic:
            out["input_scale"] = torch.tensor([act.scale], dtype=torch.float32)
            if not act.symmetric:
                out["input_zero_point"] = torch.tensor([act.zero_point - 128], dtype=torch.int8)
    else:
        out["weight_packed"] = pack_int32(q, lin.bits, dim=1)
        out["weight_shape"] = torch.tensor(list(lin.q.shape), dtype=torch.int64)
        if not lin.symmetric:
            zp = lin.zero_point.round().to(torch.int64).reshape(lin.q.shape[0], -1) - offset
            out["weight_zero_point"] = pack_int32(zp, lin.bits, dim=0)
    if lin.bias is not None:
        out["bias"] = lin.bias
    return {f"{name}.{key}": t for key, t in out.items()}


def checkpoint_tensors(model: ExportModel, schemes: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: the float ones as given, the quantized linears' by format."""
    tensors = dict(model.tensors)
    for name, lin in model.linears.items():
        tensors.update(linear_tensors(name, lin, schemes[name]["format"]))
    seen, out = set(), {}
    for name, t in tensors.items():  # safetensors refuses shared storage (tied weights)
        t = t.detach().cpu().contiguous()
        if t.numel() and t.data_ptr() in seen:
            t = t.clone()
        seen.add(t.data_ptr())
        out[name] = t
    return out


def _save_tensors(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def readme_text(model: ExportModel, qconfig: dict) -> str:
    lines = ["# compressed-tensors checkpoint", "",
             f"Made by qcompiler; format `{qconfig['format']}` as llm-compressor writes it "
             f"(compressed-tensors {CT_VERSION}); loads in vLLM and in Hugging Face transformers "
             "with the `compressed-tensors` package.", "", "## Config groups", ""]
    single = len(qconfig["config_groups"]) == 1
    for group, scheme in qconfig["config_groups"].items():
        w, a = scheme["weights"], scheme["input_activations"]
        n = len(model.linears) if single else sum(
            re.match(scheme["targets"][0][3:], name) is not None for name in model.linears)
        gran = f"group {w['group_size']}" if w["group_size"] else "per channel"
        sym = "symmetric" if w["symmetric"] else "asymmetric (integer zero points)"
        act = "float activations" if a is None else (
            "int8 activations " + ("dynamic per token" if a["dynamic"] else "static per tensor")
            + ("" if a["symmetric"] else ", asymmetric"))
        lines.append(f"- `{group}` ({scheme['format']}, {n} linears): int{w['num_bits']} weights "
                     f"{sym}, {gran}; {act}.")
    ignore = ", ".join(f"`{n}`" for n in qconfig["ignore"]) or "none"
    lines += ["", f"Left float (`ignore`): {ignore}."]
    if model.notes:
        lines += ["", "## How it was made", ""] + [f"- {note}" for note in model.notes]
    return "\n".join(lines) + "\n"


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for f in sorted(Path(src).iterdir()):
        if f.is_file() and f.name != "config.json" and f.suffix not in (".safetensors", ".bin", ".gguf"):
            shutil.copy2(f, dst / f.name)


def write_compressed_tensors(model: ExportModel, out_dir: str | os.PathLike) -> Path:
    """Write ``model`` into ``out_dir`` (absent or empty), atomically: built as a sibling, then renamed."""
    out = Path(out_dir)
    if occupied(out):
        raise ExportError(f"{out} exists and is not an empty folder")
    if not model.config.get("architectures"):
        raise ExportError("config has no `architectures`, which vLLM needs to pick the model class (a "
                         "GGUF-loaded or from_config config lacks it): set config['architectures'] = "
                         "[type(hf_model).__name__], e.g. ['LlamaForCausalLM']")
    model, _ = round_zero_points(model)  # stated in the README (the export command prints it too)
    schemes = schemes_of(model)  # validates every linear before anything is written
    qconfig = config_groups_for(model, schemes)
    tensors = checkpoint_tensors(model, schemes)
    with atomic_folder(out) as tmp:
        _save_tensors(tensors, tmp)
        config = {**model.config, "quantization_config": qconfig}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(readme_text(model, qconfig))
        if model.tokenizer_dir is not None:
            _copy_tokenizer(model.tokenizer_dir, tmp)
    return out


def load_decompressed(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load ``folder`` with transformers + compressed-tensors; return its decompressed float tensors.

    For tests. One config group: transformers' ``dequantize=True`` route (float weights at load).
    Several: that route decompresses every dense module with the first group's scheme
    (``get_dense_scheme``, transformers 5.24), so take the default route (weights kept compressed) and
    decompress each module with its own scheme; that route cannot load asymmetric pack-quantized zero
    points (it sizes them unpacked), so such a mix is refused.
    """
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as err:
        raise ImportError("loading a compressed-tensors checkpoint needs the `compressed-tensors` "
                          f"package (qcompiler's dev extra: compressed-tensors=={CT_VERSION})") from err
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    groups = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]["config_groups"]
    if len(groups) == 1:
        with warnings.catch_warnings():  # "quantization_config from the model will be used": intended
            warnings.simplefilter("ignore", UserWarning)
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch.float32,
                quantization_config=CompressedTensorsConfig(dequantize=True))
    else:
        if any(g["format"] == "pack-quantized" and not g["weights"]["symmetric"] for g in groups.values()):
            raise NotImplementedError("transformers cannot load several config groups with asymmetric "
                                      "pack-quantized weights exactly")
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        model.hf_quantizer.compressor.decompress_model(model)
    return {n: t.detach() for n, t in model.state_dict().items() if not n.endswith(_QPARAMS)}
