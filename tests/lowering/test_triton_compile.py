"""The Triton kernels compile for CUDA sm_80 and sm_90 without a GPU, on integer tensor cores, without spills."""

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter patches tl
    proc = subprocess.run([sys.executable, "-m", "qcompiler.lowering.kernels.compile_check", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)  # the registers / shared memory table, in the test log
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_both_targets(compiled):
    names = {(row["name"], row["arch"]) for row in compiled}
    for name in ("int8_gemm[int8]", "int8_gemm[uint8]", "quantize_per_token", "int4_gemm"):
        assert (name, 80) in names and (name, 90) in names


def test_int8_gemm_uses_integer_tensor_cores(compiled):
    for row in compiled:
        if row["name"].startswith("int8_gemm"):
            if row["arch"] == 80:
                assert row["int8_mma_sync"] > 0, row
            else:
                assert row["int8_wgmma"] > 0 or row["int8_mma_sync"] > 0, row
    assert any(row["int8_wgmma"] > 0 for row in compiled if row["arch"] == 90)


def test_int4_gemm_uses_float_tensor_cores(compiled):
    assert all(row["float_mma"] > 0 for row in compiled if row["name"] == "int4_gemm")


def test_default_configs_do_not_spill(compiled):
    for row in compiled:
        assert row["spill_bytes"] == 0, row
        assert row["registers"] is not None and row["registers"] <= 255
