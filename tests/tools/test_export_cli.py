"""`qcompiler export`: stories260K quantized by the backend, written as compressed-tensors, loaded back
by Hugging Face transformers (with the compressed-tensors package) and compared with qcompiler's own
reference (quantize/dequantize) model on real text."""

import dataclasses
import json

import pytest
import torch

import qcompiler
from qcompiler.tools import cli, models


def _ids(loaded, n=64):
    from qcompiler.tools import evaluate

    ids = evaluate.read_tokens(models.default_text(), loaded.tokenizer, n)
    return torch.cat([torch.tensor([loaded.tokenizer.bos_token_id]), ids]).unsqueeze(0)


EXPORTED = {  # recipe -> (the graph's linears, extra CLI arguments)
    "w8a8-dynamic": (35, []),
    "w8a8-smoothquant": (35, ["--samples", "16", "--seq-len", "128"]),  # static, SmoothQuant folded
    "w8a8-smoothquant-gptq": (35, ["--samples", "16", "--seq-len", "128"]),  # and GPTQ on the smoothed weights
    "w4a16-q4_0-gptq": (30, ["--samples", "16", "--seq-len", "128"]),  # symmetric int4, groups of 32
    "w4a16-q4_0-awq": (30, ["--samples", "16", "--seq-len", "128"]),  # AWQ's scales folded into the model
}


def _kl(a, b, tokens):
    return float(torch.nn.functional.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True,
                                            reduction="batchmean")) / tokens


@pytest.mark.parametrize("recipe", sorted(EXPORTED))
def test_export_loads_in_transformers_and_gives_qcompilers_logits(recipe, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from qcompiler.calibration.stats import resolve_stats
    from qcompiler.tools.export import build

    linears, extra = EXPORTED[recipe]
    out = tmp_path / "stories"
    stats_dir = tmp_path / "stats"
    if extra:  # calibrate once: the export and the reference model below use the same statistics
        assert cli.main(["calibrate", "--model", "stories260k", "--recipe", recipe, "--out", str(stats_dir),
                         *extra]) == 0
        extra = ["--stats", str(stats_dir)]
    assert cli.main(["export", "--model", "stories260k", "--recipe", recipe, "--format", "compressed-tensors",
                     "--out", str(out), *extra]) == 0
    assert f"{linears} quantized linear layers" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == ("pack-quantized" if "q4" in recipe else "int-quantized")
    assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()

    loaded = models.load_model("stories260k")
    ids = _ids(loaded)
    stats = resolve_stats(str(stats_dir)) if extra else None
    exported = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    torch._dynamo.reset()
    options = {"recipe": recipe, "kernels": "reference", **({"stats": stats} if stats else {})}
    reference = torch.compile(loaded.model, backend="qcompiler", options=options)
    with torch.inference_mode():
        ours = reference(input_ids=ids, use_cache=False).logits.float()
        theirs = exported(input_ids=ids, use_cache=False).logits.float()
        float_logits = loaded.model(input_ids=ids, use_cache=False).logits.float()

    # the weights are the same integers times the same scales, bit for bit (SmoothQuant's 1/s folded into
    # the value projections' scales), and the norms hold the graph's smoothed weights
    model = build.export_model(loaded, recipe, {"input_ids": ids, "use_cache": False}, stats)
    for name, lin in model.linears.items():
        assert torch.equal(exported.get_submodule(name).weight.float(), lin.dequantized()), name
    for name, t in model.tensors.items():
        assert torch.equal(exported.state_dict()[name].float(), t.float()), name
    smoothed = "model.layers.0.input_layernorm.weight"
    folds = "smoothquant" in recipe or "awq" in recipe
    assert torch.equal(model.tensors[smoothed], loaded.model.state_dict()[smoothed]) == (not folds)
    if "a16" in recipe:  # weight-only: the same weights, so the same logits to float rounding
        assert torch.allclose(theirs, ours, atol=1e-4, rtol=1e-4), (theirs - ours).abs().max()
    else:
        # compressed-tensors fake-quantizes activations with its own rounding of the scale, so the logits
        # are compared by their distance to float: as close as qcompiler's own, and not float
        ours_kl, theirs_kl = _kl(ours, float_logits, ids.shape[1]), _kl(theirs, float_logits, ids.shape[1])
        assert 0 < theirs_kl < 1.5 * ours_kl, (theirs_kl, ours_kl)
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > (0.95 if "a16" in recipe else 0.9)
    if "w8" in recipe:  # 8 bits: close to float too (4-bit stories260K agrees with float on about 70%)
        assert (theirs.argmax(-1) == float_logits.argmax(-1)).float().mean() > 0.9


def test_recipes_the_formats_can_not_hold_are_refused_before_any_work(tmp_path, capsys):
    from qcompiler import AWQ
    from qcompiler.core.errors import ExportError
    from qcompiler.tools.export import build

    out = tmp_path / "x"
    loaded = models.load_model("stories260k")
    per_layer = dataclasses.replace(qcompiler.PRESETS["w4a16-awq"], rounding=AWQ(foldable=False))
    with pytest.raises(ExportError, match=r"uses AWQ\(foldable=False\) input scales.*can not be exported"):
        build.export_model(loaded, per_layer, {"input_ids": _ids(loaded, 16)})  # before asking for statistics
    assert cli.main(["export", "--model", "stories260k", "--recipe", "w8a8-ocs-llm-int8", "--format",
                     "compressed-tensors", "--out", str(out)]) == 2
    assert "outlier channel splitting" in capsys.readouterr().err
    assert not out.exists()


def test_an_occupied_output_folder_is_an_error_and_is_left_alone(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert cli.main(["export", "--model", "stories260k", "--format", "compressed-tensors", "--out", str(out)]) == 2
    assert "is not an empty folder" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep me"


def test_an_encoder_is_not_exported(tmp_path, capsys):
    assert cli.main(["export", "--model", "minilm-l6", "--format", "compressed-tensors",
                     "--out", str(tmp_path / "m")]) == 2
    assert "not a causal language model" in capsys.readouterr().err


def test_the_python_api_gives_the_export_model(tmp_path):
    from qcompiler.tools.export import build

    loaded = models.load_model("stories260k")
    model = build.export_model(loaded, "w8a8-dynamic", {"input_ids": _ids(loaded, 16), "use_cache": False})
    assert len(model.linears) == 35 and "model.embed_tokens.weight" in model.tensors
    assert model.tied_embeddings and "lm_head.weight" not in model.tensors  # tied back by the engines
    lin = model.linears["model.layers.0.self_attn.q_proj"]
    assert lin.bits == 8 and lin.symmetric and lin.group_size is None and lin.activation.dynamic
    weight = loaded.model.model.layers[0].self_attn.q_proj.weight
    assert (lin.dequantized() - weight).abs().max() <= lin.scale.max() / 2 + 1e-7
    assert qcompiler.PRESETS["w8a8-dynamic"].skip == ("lm_head", "*embed*")  # nothing the user gave was changed


def test_a_gptq_export_holds_its_integer_zero_points_as_pack_quantized(tmp_path):
    """Not loaded back here: the zero points are packed as compressed-tensors 0.17 (vLLM 0.32's) reads
    them, and transformers with compressed-tensors 0.20 expects them unpacked (README)."""
    from safetensors.torch import load_file

    from qcompiler.calibration.calibrate import text_batches
    from qcompiler.tools.export import build
    from qcompiler.tools.export.compressed_tensors import write_compressed_tensors

    loaded = models.load_model("stories260k")
    batches = text_batches(loaded.tokenizer, models.default_calibration_text(), 4, 64, add_bos=True)
    stats = qcompiler.calibrate(loaded.model, batches, "w4a16-gptq", progress=False)
    model = build.export_model(loaded, "w4a16-gptq", {"input_ids": _ids(loaded, 16), "use_cache": False}, stats)
    lin = next(iter(model.linears.values()))
    # down_proj (172 inputs: no group of 32 or more divides it) stays float and goes into the ignore list
    assert len(model.linears) == 30 and "model.layers.0.mlp.down_proj.weight" in model.tensors
    assert lin.bits == 4 and not lin.symmetric and lin.activation is None
    assert torch.equal(lin.zero_point.float(), lin.zero_point.float().round())
    folder = write_compressed_tensors(model, tmp_path / "gptq")
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{name}.weight_packed"].dtype == torch.int32 and f"{name}.weight_zero_point" in tensors
    assert torch.equal(tensors[f"{name}.weight_shape"], torch.tensor([64, 64]))
    assert "model.layers.0.mlp.down_proj.weight" in tensors  # kept float, listed in the ignore list


def test_float_zero_points_are_rounded_and_the_export_says_by_how_much(tmp_path, capsys):
    """RTN keeps float zero points; compressed-tensors stores integers: the export rounds them, states
    how far the weights moved, and writes exactly the rounded weights."""
    from safetensors.torch import load_file

    from qcompiler.tools.export import build
    from qcompiler.tools.export.compressed_tensors import round_zero_points

    out = tmp_path / "rtn"
    assert cli.main(["export", "--model", "stories260k", "--recipe", "w4a16-rtn", "--format",
                     "compressed-tensors", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "fractional weight zero points of 30 layers rounded to integers" in err
    assert "fractional weight zero points" in (out / "README.md").read_text()

    loaded = models.load_model("stories260k")
    model = build.export_model(loaded, "w4a16-rtn", {"input_ids": _ids(loaded), "use_cache": False})
    rounded, note = round_zero_points(model)
    assert note is not None and round_zero_points(rounded)[1] is None  # integral now: nothing more to round
    tensors = load_file(str(out / "model.safetensors"))
    steps = []
    for name, lin in model.linears.items():
        new = rounded.linears[name]
        assert torch.equal(new.q, lin.q) and torch.equal(new.zero_point, lin.zero_point.round()), name
        moved = (new.dequantized() - lin.dequantized()).abs()
        step = lin.scale.repeat_interleave(lin.group_size, dim=1)
        assert (moved <= 0.5 * step + 1e-7).all(), name  # at most half a step
        steps.append(float(moved.max()))
        # the file holds the rounded zero points, packed along the output dimension (offset 8)
        packed = tensors[f"{name}.weight_zero_point"]
        shifts = torch.arange(8, dtype=torch.int64) * 4
        z = ((packed.to(torch.int64)[:, None, :] >> shifts[None, :, None]) & 15).reshape(-1, packed.shape[1])
        assert torch.equal(z[: lin.q.shape[0]].float(), lin.zero_point.round()), name
    assert f"max |dw| {max(steps):.3g}" in note
