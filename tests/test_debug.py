import json

import pytest
import torch
from graphs import tiny_llama

import qcompiler
from qcompiler import pipeline


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    qcompiler.clear_reports()


def _passes(folder):
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def test_debug_option_dumps_every_pass_with_code_diff_counts_and_errors(tmp_path):
    model = tiny_llama()
    with torch.inference_mode():
        torch.compile(model, backend="qcompiler", options={"debug": str(tmp_path)})(torch.randint(0, 128, (1, 16)))
    graph = tmp_path / "graph_0"
    assert "def forward" in (graph / "float.py").read_text()
    steps = _passes(graph)
    assert steps == ["01_canonicalize", "02_plan", "03_insert_qdq", "04_lower", "05_fuse_gemv", "06_gqa_attention",
                     "07_decode_attention"]
    for step in steps:
        files = {p.name for p in (graph / step).iterdir()}
        assert files == {"before.py", "after.py", "diff.txt", "summary.json", "errors.tsv"}
    summary = json.loads((graph / "03_insert_qdq" / "summary.json").read_text())
    assert summary["pass"] == "insert_qdq" and summary["counts"]["quantized"] == 14
    assert summary["after"] == ["canonicalize", "plan"]
    assert "qcompiler.quantize" in (graph / "03_insert_qdq" / "diff.txt").read_text()
    assert "int8_gemm" in (graph / "04_lower" / "after.py").read_text()
    rows = [line.split("\t") for line in (graph / "04_lower" / "errors.tsv").read_text().splitlines()[1:]]
    sqnr = {r[0]: float(r[1]) for r in rows if r[1]}
    assert sqnr, "no node compared"
    # canonicalize preserves values exactly; quantized nodes are finite but not exact
    canon = [line.split("\t") for line in (graph / "01_canonicalize" / "errors.tsv").read_text().splitlines()[1:]]
    assert all(r[1] == "inf" for r in canon if r[1])
    assert 5 < min(sqnr.values()) < float("inf")


def test_dumps_of_a_graph_with_dynamic_sizes_run_on_the_real_sizes(tmp_path):
    # the second sequence length makes Dynamo recompile with symbolic sizes: the per-node error table
    # runs the graph eagerly, on the sizes of that call
    model = tiny_llama()
    with torch.inference_mode():
        compiled = torch.compile(model, backend="qcompiler", options={"debug": str(tmp_path)})
        for length in (8, 13):
            compiled(torch.randint(0, 128, (1, length)))
    reports = qcompiler.reports()
    assert len(reports) == 2 and not any(r.error for r in reports)
    graph = tmp_path / f"graph_{reports[-1].graph_index}"
    assert "s" in (graph / "float.py").read_text().split("def forward", 1)[1].split(")", 1)[0]  # a size input
    rows = (graph / "04_lower" / "errors.tsv").read_text().splitlines()[1:]
    assert any(line.split("\t")[1] not in ("", "inf") for line in rows)


def test_environment_variable_turns_dumps_on_and_a_failing_pass_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILER_DUMP", str(tmp_path))

    def broken(gm):
        raise RuntimeError("deliberately broken")

    real_build = pipeline.build
    monkeypatch.setattr(pipeline, "build", lambda *a, **k: real_build(*a, **k)[:3] + [pipeline.Step("broken", broken)])
    model = tiny_llama()
    with pytest.warns(UserWarning, match="broken"), torch.inference_mode():
        torch.compile(model, backend="qcompiler")(torch.randint(0, 128, (1, 8)))
    failed = tmp_path / "graph_0" / "04_broken" / "FAILED.txt"
    text = failed.read_text()
    assert "deliberately broken" in text and "['canonicalize', 'plan', 'insert_qdq']" in text


def test_debug_option_must_be_a_path():
    with pytest.raises(TypeError, match="debug"):
        qcompiler.BackendOptions(debug=3)


def test_compare_reports_passes_layers_and_attribution_on_a_tiny_llama():
    model = tiny_llama()
    batch = torch.randint(0, 128, (1, 24))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = qcompiler.compare(model, "w8a8-dynamic", batch, top=3)
    assert [p.name for p in result.passes] == ["canonicalize", "plan", "insert_qdq", "lower", "fuse_gemv", "gqa_attention",
                                              "decode_attention"]
    assert result.passes[0].sqnr_db == float("inf") and result.passes[0].kl == 0
    assert 10 < result.passes[-1].sqnr_db < float("inf") and result.kl > 0
    assert len(result.layers) == 14
    assert [e.sqnr_db for e in result.layers] == sorted(e.sqnr_db for e in result.layers)
    assert len(result.attribution) == 3 and all(a.kl_with_layer_in_float >= 0 for a in result.attribution)
    assert result.attribution[0].kl_gain >= result.attribution[-1].kl_gain
    assert "per layer" in str(result) and "keep one layer in float" in str(result)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_compare_pinpoints_a_deliberately_broken_pass():
    from qcompiler.config import BackendOptions
    from qcompiler.core.ir import LINEAR, PassResult
    from qcompiler.passes.graph_utils import same_tensor_info

    def broken(gm):  # scales one layer's output: a wrong rewrite
        node = next(n for n in gm.graph.nodes if LINEAR in n.meta)
        with gm.graph.inserting_after(node):
            scaled = gm.graph.call_function(torch.mul, (node, 1.5))
        node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
        same_tensor_info(scaled, node)
        gm.recompile()
        return PassResult(gm, True, {"broken": 1})

    model = tiny_llama()
    steps = pipeline.build(BackendOptions().recipe, torch.device("cpu"))
    steps.insert(2, pipeline.Step("broken", broken))
    result = qcompiler.compare(model, "w8a8-dynamic", torch.randint(0, 128, (1, 24)), top=0, steps=steps)
    names = [p.name for p in result.passes]
    sqnr = [p.sqnr_db for p in result.passes]  # inf until a pass changes the function (inf - inf: no drop)
    drops = {names[i]: 0.0 if sqnr[i - 1] == sqnr[i] else sqnr[i - 1] - sqnr[i] for i in range(1, len(names))}
    assert max(drops, key=drops.get) == "broken"


def test_explain_cli_prints_the_plan_and_the_error_table(capsys):
    from qcompiler.tools import cli

    assert cli.main(["explain", "--model", "stories260k", "--recipe", "w8a8-dynamic", "--tokens", "32", "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "recipe w8a8-dynamic: 35 linear layers quantized, 1 kept in float" in out
    assert "model.layers.0.mlp.down_proj" in out and "FBGEMM" in out and "lm_head" in out
    assert "per pass (logits vs float)" in out and "keep one layer in float" in out
