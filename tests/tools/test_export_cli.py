"""`qcompiler export`: stories260K quantized by the backend, written as compressed-tensors, loaded back
by Hugging Face transformers (with the compressed-tensors package) and compared with qcompiler's own
reference (quantize/dequantize) model on real text."""

import json

import torch

import qcompiler
from qcompiler.tools import cli, models


def _ids(loaded, n=64):
    from qcompiler.tools import evaluate

    ids = evaluate.read_tokens(models.default_text(), loaded.tokenizer, n)
    return torch.cat([torch.tensor([loaded.tokenizer.bos_token_id]), ids]).unsqueeze(0)


def test_w8a8_dynamic_export_loads_in_transformers_and_gives_qcompilers_logits(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "stories-w8a8"
    assert cli.main(["export", "--model", "stories260k", "--recipe", "w8a8-dynamic", "--format",
                     "compressed-tensors", "--out", str(out)]) == 0
    assert "35 quantized linear layers" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "int-quantized"
    assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()

    loaded = models.load_model("stories260k")
    ids = _ids(loaded)
    exported = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    torch._dynamo.reset()
    reference = torch.compile(loaded.model, backend="qcompiler", options={"recipe": "w8a8-dynamic",
                                                                          "kernels": "reference"})
    with torch.inference_mode():
        ours = reference(input_ids=ids, use_cache=False).logits.float()
        theirs = exported(input_ids=ids, use_cache=False).logits.float()
        float_logits = loaded.model(input_ids=ids, use_cache=False).logits.float()
    def kl(a, b):
        return float(torch.nn.functional.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True,
                                                reduction="batchmean")) / ids.shape[1]

    # the weights are the same integers times the same scales, bit for bit
    from qcompiler.tools.export import build

    model = build.export_model(loaded, "w8a8-dynamic", {"input_ids": ids, "use_cache": False})
    for name, lin in model.linears.items():
        assert torch.equal(exported.get_submodule(name).weight.float(), lin.dequantized()), name
    # compressed-tensors fake-quantizes each token's activations with its own rounding of the scale, so
    # the logits are compared by their distance to float: as close as qcompiler's own, and not float
    ours_kl, theirs_kl = kl(ours, float_logits), kl(theirs, float_logits)
    assert 0 < theirs_kl < 1.5 * ours_kl, (theirs_kl, ours_kl)
    assert (theirs.argmax(-1) == float_logits.argmax(-1)).float().mean() > 0.9


def test_recipes_the_formats_can_not_hold_are_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "x"
    assert cli.main(["export", "--model", "stories260k", "--recipe", "w8a8-smoothquant", "--format",
                     "compressed-tensors", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "uses SmoothQuant" in err and "can not be exported yet" in err
    assert cli.main(["export", "--model", "stories260k", "--recipe", "w8a8-ocs-llm-int8", "--format",
                     "compressed-tensors", "--out", str(out)]) == 2
    assert "outlier channel splitting" in capsys.readouterr().err
    assert not out.exists()
    # float zero points (round-to-nearest) have no exact place in compressed-tensors: a clear error, no folder
    assert cli.main(["export", "--model", "stories260k", "--recipe", "w4a16-rtn", "--format",
                     "compressed-tensors", "--out", str(out)]) == 2
    assert "fractional (float) zero points" in capsys.readouterr().err
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
