import json

import pytest
import torch
from graphs import tiny_llama, token_batches

import qcompiler
from qcompiler import artifact
from qcompiler.core import integrity
from qcompiler.core.errors import ArtifactError
from qcompiler.tools import cli, quantize


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    qcompiler.clear_reports()


@pytest.mark.parametrize("recipe", ["w8a8-dynamic", "w8a8-smoothquant", "w4a16-gptq-g32"])
def test_save_and_load_give_bit_identical_logits(tmp_path, recipe):
    model = tiny_llama()
    if recipe == "w4a16-gptq-g32":
        recipe = qcompiler.Recipe(name="w4a16-gptq-g32", activation=None, rounding=qcompiler.GPTQ(),
                                  weight=qcompiler.WeightScheme(bits=4, granularity="per_group", group_size=32,
                                                                symmetric=False))
    resolved = qcompiler.config.resolve_recipe(recipe)
    batches = token_batches(4, 32)
    stats = qcompiler.calibrate(model, batches, resolved, progress=False) if resolved.needs_calibration else None
    ids = torch.randint(0, 128, (2, 24))
    folder = quantize.quantize(model, resolved, ids[:1], tmp_path / "art", stats)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == resolved.name and "torch" in manifest["versions"]
    assert len([entry for entry in manifest["layers"] if entry["quantized"]]) == 14
    assert all(entry["sqnr_db"] is None or entry["sqnr_db"] > 0 for entry in manifest["layers"])
    torch._dynamo.reset()
    with torch.inference_mode():
        direct = torch.compile(model, backend="qcompiler", options={"recipe": resolved, "stats": stats})(ids).logits
        torch._dynamo.reset()
        loaded = qcompiler.load(folder, model)(ids).logits
    assert torch.equal(direct, loaded)
    rep = qcompiler.last_report()
    assert {p.name: p.counts for p in rep.passes}["load_artifact"]["tensors_loaded"] > 0


def test_saved_tensors_are_the_ones_used(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 16))
    folder = quantize.quantize(model, "w8a8-dynamic", ids, tmp_path / "art", errors=False)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "weights.safetensors"))
    name = next(n for n in tensors if n.endswith("_w_scale"))
    tensors[name] = tensors[name] * 2  # a different (but well-formed) artifact
    save_file(tensors, str(folder / "weights.safetensors"))
    with pytest.raises(ArtifactError, match="checksum"):
        artifact.Artifact(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["weights.safetensors"] = integrity.file_sha256(folder / "weights.safetensors")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="changed after it was written"):  # the manifest's own checksum
        artifact.Artifact(folder)
    (folder / "manifest.json").write_text(json.dumps(integrity.seal(manifest)))  # a consistent folder
    with torch.inference_mode():
        reference = torch.compile(model, backend="qcompiler")(ids).logits
        torch._dynamo.reset()
        changed = qcompiler.load(folder, model)(ids).logits
    assert not torch.equal(reference, changed)


def test_corrupted_tampered_and_mismatched_artifacts_are_clear_errors(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 16))
    folder = quantize.quantize(model, "w8a8-dynamic", ids, tmp_path / "art", errors=False)
    with pytest.raises(ArtifactError, match="missing"):
        artifact.Artifact(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match="another model"):
        qcompiler.load(folder, tiny_llama_other())
    blob = bytearray((folder / "weights.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (folder / "weights.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="changed or corrupted"):
        qcompiler.load(folder, model)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        artifact.Artifact(folder)
    with pytest.raises(ValueError, match="brings its own recipe"):
        qcompiler.BackendOptions.from_user({"artifact": str(folder), "recipe": "w8a8-dynamic"})


def tiny_llama_other():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_quantize_cli_writes_an_artifact(tmp_path, capsys):
    out = tmp_path / "stories"
    assert cli.main(["quantize", "--model", "stories260k", "--recipe", "w8a8-dynamic", "--out", str(out),
                     "--tokens", "32"]) == 0
    assert "35 quantized layers" in capsys.readouterr().out
    assert artifact.Artifact(out).recipe.name == "w8a8-dynamic"


def test_edited_manifests_names_outside_the_folder_and_other_weights_are_refused(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 16))
    folder = quantize.quantize(model, "w8a8-dynamic", ids, tmp_path / "art", errors=False)
    path = folder / "manifest.json"
    original = path.read_text()
    manifest = json.loads(original)
    manifest["recipe"]["weight"]["bits"] = 4  # an edit that would change what runs
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="changed after it was written"):
        artifact.Artifact(folder)
    (tmp_path / "outside.txt").write_text("not ours")
    for name in ("../outside.txt", str(tmp_path / "outside.txt")):
        manifest = json.loads(original)
        manifest["files"][name] = integrity.file_sha256(tmp_path / "outside.txt")
        path.write_text(json.dumps(integrity.seal(manifest)))  # even a consistent manifest
        with pytest.raises(ArtifactError, match="holds only weights.safetensors and stats/ files inside"):
            artifact.Artifact(folder)
    path.write_text(original)
    other = tiny_llama(seed=1)  # the same names and shapes, other weights
    with pytest.raises(ArtifactError, match="made from other weights"):
        qcompiler.load(folder, other)
    with torch.inference_mode():
        torch._dynamo.reset()
        with pytest.raises(Exception, match="made from other weights"):  # the backend option checks too
            torch.compile(other, backend="qcompiler", options={"artifact": str(folder)})(ids)
        torch._dynamo.reset()
        assert qcompiler.load(folder, other, other_weights=True)(ids).logits.isfinite().all()  # on purpose
        torch._dynamo.reset()
        assert qcompiler.load(folder, model)(ids).logits.isfinite().all()


@pytest.mark.parametrize("recipe, extra", [("w4a16-rtn", False), ("w8a8-dynamic", False), ("w8a8-smoothquant", True)])
def test_the_artifact_is_the_counted_bits_plus_what_transforms_add(tmp_path, recipe, extra):
    from safetensors.torch import load_file

    model = tiny_llama()
    resolved = qcompiler.config.resolve_recipe(recipe)
    batches = token_batches(4, 32)
    stats = qcompiler.calibrate(model, batches, resolved, progress=False) if resolved.needs_calibration else None
    folder = quantize.quantize(model, resolved, batches[0], tmp_path / "art", stats, errors=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    size, tensors = manifest["size"], load_file(str(folder / "weights.safetensors"))
    assert size["tensor_bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert size["counted_bits"] == 8 * sum(d["weight_bytes"] for d in manifest["layers"] if d["quantized"]) + sum(
        8 * p.numel() * 4 for name, p in model.named_parameters() if "proj" not in name)  # the float rest
    # the static ranges and SmoothQuant's inverse scales are the only tensors beyond the count
    assert (size["extra_bytes"] > 0) == extra and size["extra_bytes"] < 0.01 * size["tensor_bytes"]
    bits = 4 if recipe == "w4a16-rtn" else 8
    packed = [t for n, t in tensors.items() if n.endswith("_w_q")]
    assert len(packed) == 14 and all(t.dtype == torch.uint8 and t.dim() == 1 for t in packed)
    assert sum(t.numel() for t in packed) == sum(p.numel() for n, p in model.named_parameters() if "proj" in n) * bits // 8
    float_params = {n for n, _ in model.named_parameters() if "proj" not in n}
    saved = set(manifest["saved_parameters"])  # SmoothQuant: the norms it scaled are saved as buffers instead
    assert saved == float_params if not extra else saved == {n for n in float_params if "layernorm" not in n}
