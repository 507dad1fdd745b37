import json

import pytest
import torch

from qcompiler import bench, cli
from qcompiler.lowering.kernels import cpu


def test_kernel_bench_times_every_op_and_checks_it_against_its_reference():
    # the Triton rows run on CPU tensors under the interpreter here (conftest): numbers, not speed
    result = bench.bench_kernels("cpu", [(1, 32, 128), (3, 32, 256)], repeats=2, triton=True)
    rows = result["rows"]
    ops = [r["op"] for r in rows]
    assert ops.count("w8a8") == 2 and ops.count("int8 GEMM") == 2 and ops.count("quant/token") == 2
    assert ops.count("w4a16 g128") == 2
    for r in rows:
        assert r["kernel_us"] > 0 and r["baseline_us"] > 0
        assert r["ratio"] == pytest.approx(r["baseline_us"] / r["kernel_us"])
        if r["op"] in ("int8 GEMM", "quant/token"):
            assert r["max_abs_error"] == 0  # integer results: exact
        else:
            assert r["max_abs_error"] < 1e-3
    table = bench.format_table(result)
    assert "torch._int_mm" in table and "Triton int4_gemm" in table


@pytest.mark.skipif(not cpu.int4_available(), reason="no ATen CPU int4 kernel")
def test_cli_bench_writes_json_with_cpu_kernels(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "kernels", "--shapes", "2x32x128", "--repeats", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {r["op"] for r in result["rows"]} == {"w8a8", "w4a16 g128"}
    assert all(r["max_abs_error"] < 0.05 for r in result["rows"])  # bf16 activations in the int4 kernel
    assert "ratio" in capsys.readouterr().out


def test_cli_bench_rejects_bad_shapes_and_missing_devices(capsys):
    assert cli.main(["bench", "kernels", "--shapes", "1x64"]) == 2
    assert "MxNxK" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["bench", "kernels", "--device", "cuda", "--shapes", "1x32x32"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
