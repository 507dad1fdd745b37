"""The Triton kernels compile for CUDA sm_80 and sm_90 without a GPU, in every default config and dtype
variant the lowering launches (bf16 included), on integer tensor cores, without spills."""

import json
import os
import subprocess
import sys

import pytest

from qcompiler.lowering.kernels import triton_int4, triton_int8

INT8_VARIANTS = {f"{a} -> {o}" for a in ("int8", "uint8") for o in ("fp16", "bf16", "fp32")}
INT4_VARIANTS = {"fp16 x int4", "bf16 x int4", "fp32 x int4"}
QUANT_VARIANTS = {f"{x} -> int8{s}" for x in ("fp16", "bf16", "fp32") for s in ("", " (smoothed)")}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter patches tl
    proc = subprocess.run([sys.executable, "-m", "qcompiler.tools.compile_check", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)  # the registers / shared memory table, in the test log
    return json.loads(out.read_text())


def _variants(compiled, prefix, arch):
    return {(row["variant"], row["config"]) for row in compiled if row["name"].startswith(prefix) and row["arch"] == arch}


def test_every_kernel_config_and_dtype_variant_compiles_for_both_targets(compiled):
    for arch in (80, 90):
        assert len(_variants(compiled, "int8_gemm", arch)) == len(INT8_VARIANTS) * len(triton_int8.CONFIGS)
        assert {v for v, _ in _variants(compiled, "int8_gemm", arch)} == INT8_VARIANTS
        assert len(_variants(compiled, "int4_gemm", arch)) == len(INT4_VARIANTS) * len(triton_int4.CONFIGS)
        assert {v for v, _ in _variants(compiled, "int4_gemm", arch)} == INT4_VARIANTS
        assert {v for v, _ in _variants(compiled, "quantize_per_token", arch)} == QUANT_VARIANTS


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


def test_quantization_divides_with_correct_rounding(compiled):
    # bit-exact with torch only with IEEE division: no div.full / div.approx
    rows = [row for row in compiled if row["name"] == "quantize_per_token"]
    assert rows and all(row["approx_div"] == 0 for row in rows)


def test_default_configs_do_not_spill(compiled):
    for row in compiled:
        assert row["spill_bytes"] == 0, row
        assert row["registers"] is not None and row["registers"] <= 255
