"""`qcompiler export --format gguf`: stories260K quantized by the GGUF presets (fp16 scales in blocks of
32), written by the CLI, read back block by block: the file holds the integers, scales and offsets that
qcompiler's rounding chose; recipes and models the format can not hold are refused before any work."""

import json
import os
from pathlib import Path

import gguf
import pytest
import torch

from qcompiler.tools import cli, models
from qcompiler.tools.export import build
from qcompiler.tools.export import gguf as gw
from qcompiler.tools.export import gguf_read as gr

CASES = {  # recipe -> (GGUF type, calibration arguments)
    "w8a16-q8_0": ("Q8_0", []),
    "w4a16-q4_0-gptq": ("Q4_0", ["--samples", "8", "--seq-len", "128"]),
    "w4a16-q4_0-awq": ("Q4_0", ["--samples", "8", "--seq-len", "128"]),  # o_proj/down_proj's 1/s in v/up rows
    "w4a16-q4_1-hqq": ("Q4_1", []),
}


DATA = Path(os.environ.get("QCOMPILER_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data")
STORIES_HF = DATA / "models" / "stories260K-hf"


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_the_gguf_file_holds_the_recipes_integers_and_scales(recipe, tmp_path, capsys):
    kind, calib = CASES[recipe]
    stats_dir = tmp_path / "stats"
    extra = []
    if calib:
        assert cli.main(["calibrate", "--model", "stories260k", "--recipe", recipe, "--out", str(stats_dir),
                         *calib]) == 0
        extra = ["--stats", str(stats_dir)]
    out = tmp_path / "gguf"
    assert cli.main(["export", "--model", "stories260k", "--recipe", recipe, "--format", "gguf", "--gguf-type",
                     kind, "--out", str(out), *extra]) == 0
    assert f"(GGUF {kind})" in capsys.readouterr().out
    path = out / f"model-{kind}.gguf"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", path.name]
    assert f"as `{kind}`" in (out / "README.md").read_text()

    from qcompiler.calibration.stats import resolve_stats
    from qcompiler.tools import evaluate

    loaded = models.load_model("stories260k")
    ids = evaluate.read_tokens(models.default_text(), loaded.tokenizer, 64).unsqueeze(0)
    stats = resolve_stats(str(stats_dir)) if calib else None
    model = build.export_model(loaded, recipe, {"input_ids": ids, "use_cache": False}, stats)
    reader = gguf.GGUFReader(path)
    cfg = model.config
    assert len(model.linears) == 30  # down_proj (172 inputs) has no block of 32: F16
    for name, lin in model.linears.items():
        gname = gw.gguf_name(name + ".weight")
        q, d, m = gr.read_gguf_linear(reader, gname)
        heads = gw.qk_heads(name + ".", cfg)
        if heads is not None:  # q/k rows are in llama.cpp's rotary order: undo it
            q, d = gw.permute_qk(q, heads, inverse=True), gw.permute_qk(d, heads, inverse=True)
            m = None if m is None else gw.permute_qk(m, heads, inverse=True)
        n, k = lin.q.shape
        blocks = lambda t: t.reshape(n, -1).repeat_interleave((lin.group_size or k) // 32, dim=1)  # noqa: E731
        assert torch.equal(d, blocks(lin.scale)), name
        if kind == "Q4_1":
            assert torch.equal(q, lin.q.to(torch.int64)), name
            assert torch.equal(m, blocks(-lin.zero_point * lin.scale).half().float()), name
        else:
            assert torch.equal(q, lin.q.to(torch.int64)), name
        if kind != "Q4_1":  # d * q: the very values qcompiler computes with
            values = gr.dequantize_gguf_tensor(reader, gname)
            if heads is not None:
                values = gw.permute_qk(values, heads, inverse=True)
            assert torch.equal(values, lin.dequantized()), name
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


@pytest.mark.skipif(not STORIES_HF.is_dir(), reason="stories260K-hf not found")
def test_a_model_from_a_hugging_face_folder_exports(tmp_path, capsys):
    """(The SmolLM2 alias is a GGUF file: tests/test_export_engines_slow.py exports it.)"""
    out = tmp_path / "from-folder"
    assert cli.main(["export", "--model", str(STORIES_HF), "--recipe", "w8a16-q8_0", "--format", "gguf",
                     "--gguf-type", "Q8_0", "--gguf-embeddings", "F16", "--out", str(out)]) == 0
    assert "30 quantized linear layers" in capsys.readouterr().out
    tensors = {t.name: t for t in gguf.GGUFReader(out / "model-Q8_0.gguf").tensors}
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


def _tiny_gpt2(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=512, n_positions=128)).save_pretrained(folder)
    models.load_model("stories260k").tokenizer.save_pretrained(folder)
    return folder


BAD = {
    "no type": (["--recipe", "w8a16-q8_0", "--format", "gguf"], "--format gguf needs --gguf-type"),
    "fp32 scales": (["--recipe", "w8a8-dynamic", "--format", "gguf", "--gguf-type", "Q8_0"],
                    "float32 scales.*use --recipe w8a16-q8_0"),
    "asymmetric Q4_0": (["--recipe", "w4a16-q4_1-hqq", "--format", "gguf", "--gguf-type", "Q4_0"],
                        "asymmetric, and Q4_0 holds d \\* q only"),
    "8 bits in Q4_1": (["--recipe", "w8a16-q8_0", "--format", "gguf", "--gguf-type", "Q4_1"],
                       "8-bit, more than Q4_1 holds"),
    "type without gguf": (["--recipe", "w8a8-dynamic", "--format", "compressed-tensors", "--gguf-type", "Q8_0"],
                          "--gguf-type applies to --format gguf only"),
    "transform": (["--recipe", "w8a8-ocs", "--format", "gguf", "--gguf-type", "Q8_0"],
                  "outlier channel splitting"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_what_gguf_can_not_hold_is_refused_before_any_work(case, tmp_path, capsys):
    import re

    args, message = BAD[case]
    out = tmp_path / "out"
    assert cli.main(["export", "--model", "stories260k", "--out", str(out), *args]) == 2
    assert re.search(message, capsys.readouterr().err), case
    assert not out.exists()


def test_a_model_llama_cpps_llama_loader_does_not_run_is_refused(tmp_path, capsys):
    folder = _tiny_gpt2(tmp_path / "gpt2")
    out = tmp_path / "out"
    assert cli.main(["export", "--model", str(folder), "--recipe", "w8a16-q8_0", "--format", "gguf", "--gguf-type",
                     "Q8_0", "--out", str(out)]) == 2
    assert "GGUF export supports model_type 'llama'" in capsys.readouterr().err
    assert not out.exists()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "gpt2"  # left as it was
