"""Compile the Triton kernels for CUDA targets without a GPU, and read what the compiler made.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80 | 90, 32))`` builds PTX and a cubin with
Triton's bundled ptxas. :func:`compile_all` does that for every kernel in each of its default configs
and each dtype variant the lowering launches (int8 GEMM: int8 or uint8 activations, fp16/bf16/fp32
out; int4 GEMM: fp16, bf16 or fp32 activations; quantization: fp16/bf16/fp32 input, with and without
the SmoothQuant divisor) and reports, per
kernel, variant and target: the tensor-core instructions in the PTX, approximate divisions,
shared memory, and the registers and spill bytes ``ptxas -v`` prints.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from qcompiler.lowering.kernels import triton_int4, triton_int8, triton_quant


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    variant: str  # the dtypes it was compiled for
    arch: int
    config: str
    ptx: str
    shared_bytes: int
    registers: int | None
    spill_bytes: int | None

    @property
    def int8_mma_sync(self) -> int:
        """``mma.sync ... .s8`` instructions (Ampere integer tensor cores)."""
        return len(re.findall(r"mma\.sync[^\n]*\.s8", self.ptx))

    @property
    def int8_wgmma(self) -> int:
        """``wgmma.mma_async ... .s8`` instructions (Hopper warpgroup integer tensor cores)."""
        return len(re.findall(r"wgmma\.mma_async[^\n]*\.s8", self.ptx))

    @property
    def int8_mma(self) -> int:
        return self.int8_mma_sync + self.int8_wgmma

    @property
    def float_mma(self) -> int:
        return len(re.findall(r"(?:mma\.sync|wgmma\.mma_async)[^\n]*\.(?:f16|bf16|tf32)", self.ptx))

    @property
    def approx_div(self) -> int:
        """fp32 divisions that are not correctly rounded (``div.full`` / ``div.approx``; ``/`` in Triton)."""
        return len(re.findall(r"div\.(?:full|approx)\.f32", self.ptx))


def _ptxas_usage(ptx: str, arch: int) -> tuple[int | None, int | None]:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch)
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas.path, f"-arch=sm_{arch}{suffix}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores", text)
    return (int(regs.group(1)) if regs else None, sum(map(int, spills)) if spills else None)


def compile_kernel(name: str, variant: str, fn, signature: dict, constexprs: dict, arch: int, num_warps: int,
                   num_stages: int, config: str) -> CompiledKernel:
    if not isinstance(fn, JITFunction):
        raise RuntimeError("compiling for a GPU target needs TRITON_INTERPRET unset (the interpreter patches "
                           "triton.language); run `python -m qcompiler.tools.compile_check`")
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    registers, spills = _ptxas_usage(ptx, arch)
    return CompiledKernel(name, variant, arch, config, ptx, compiled.metadata.shared, registers, spills)


def _int8_signature(out: str) -> dict:
    sig = {name: "*i8" for name in ("a_ptr", "w_ptr")}
    sig.update({"out_ptr": f"*{out}", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "w_colsum_ptr": "*i32",
                "bias_ptr": f"*{out}"})
    sig.update({n: "i32" for n in ("M", "N", "K", "stride_am", "stride_ak", "stride_wn", "stride_wk",
                                    "stride_om", "stride_on", "a_zero_point")})
    sig.update({n: "constexpr" for n in ("A_IS_UINT8", "A_SCALE_PER_ROW", "HAS_BIAS", "OUT_DTYPE", "BLOCK_M",
                                          "BLOCK_N", "BLOCK_K", "GROUP_M")})
    return sig


def _int4_signature(act: str) -> dict:
    # scales and zeros are fp32, as the lowering stores them; the bias goes in with the activations' dtype
    sig = {"a_ptr": f"*{act}", "w_ptr": "*u8", "scale_ptr": "*fp32", "zero_ptr": "*fp32", "bias_ptr": f"*{act}",
           "out_ptr": "*fp32"}
    sig.update({n: "i32" for n in ("M", "N", "K", "stride_am", "stride_ak", "stride_wn", "stride_wk",
                                    "stride_sn", "stride_sg", "stride_os", "stride_om", "stride_on")})
    sig.update({n: "constexpr" for n in ("GROUP", "HAS_BIAS", "DOT_DTYPE", "BLOCK_M", "BLOCK_N", "BLOCK_K",
                                          "GROUP_M", "SPLIT_K")})
    return sig


def _quant_signature(x: str) -> dict:
    return {"x_ptr": f"*{x}", "smooth_ptr": f"*{x}", "q_ptr": "*i8", "scale_ptr": "*fp32", "M": "i32", "K": "i32",
            "stride_xm": "i32", "stride_xk": "i32", "stride_qm": "i32", "stride_qk": "i32", "min_scale": "fp32",
            "HAS_SMOOTH": "constexpr", "USE_RINT": "constexpr", "BLOCK_K": "constexpr"}


_TL = {"fp16": tl.float16, "bf16": tl.bfloat16, "fp32": tl.float32}
INT8_VARIANTS = tuple((act, out) for act in ("int8", "uint8") for out in ("fp16", "bf16", "fp32"))  # activations, output
INT4_VARIANTS = ("fp16", "bf16", "fp32")  # activations
QUANT_VARIANTS = tuple((x, smooth) for x in ("fp16", "bf16", "fp32") for smooth in (False, True))  # input, divisor


def compile_all(archs=(80, 90)) -> list[CompiledKernel]:
    """Every kernel in each of its default configs and dtype variants, for each target."""
    out = []
    for arch in archs:
        for cfg in triton_int8.CONFIGS:
            for act, out_dtype in INT8_VARIANTS:
                uint8 = act == "uint8"
                consts = dict(A_IS_UINT8=uint8, A_SCALE_PER_ROW=not uint8, HAS_BIAS=True, OUT_DTYPE=_TL[out_dtype],
                              BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M)
                out.append(compile_kernel(f"int8_gemm[{act}]", f"{act} -> {out_dtype}", triton_int8.int8_gemm_kernel,
                                          _int8_signature(out_dtype), consts, arch, cfg.num_warps, cfg.num_stages,
                                          _describe(cfg)))
        for x_dtype, smooth in QUANT_VARIANTS:
            variant = f"{x_dtype} -> int8" + (" (smoothed)" if smooth else "")
            out.append(compile_kernel("quantize_per_token", variant, triton_quant.quantize_per_token_kernel,
                                      _quant_signature(x_dtype), dict(HAS_SMOOTH=smooth, USE_RINT=True, BLOCK_K=1024),
                                      arch, 4, 1, "BLOCK_K=1024"))
        for cfg in triton_int4.CONFIGS:
            for act in INT4_VARIANTS:
                consts = dict(GROUP=128, HAS_BIAS=False, DOT_DTYPE=_TL[act], BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
                              BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M, SPLIT_K=cfg.SPLIT_K)
                out.append(compile_kernel("int4_gemm", f"{act} x int4", triton_int4.int4_gemm_kernel,
                                          _int4_signature(act), consts, arch, cfg.num_warps, cfg.num_stages,
                                          _describe(cfg)))
    return out


def _describe(cfg) -> str:
    split = f" split_k={cfg.SPLIT_K}" if cfg.SPLIT_K > 1 else ""
    return f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_K} w{cfg.num_warps} s{cfg.num_stages}{split}"


def format_report(kernels: list[CompiledKernel]) -> str:
    lines = [f"{'kernel':<20} {'variant':<14} {'arch':>5} {'config':<28} {'regs':>5} {'spill B':>7} {'smem B':>7} "
             f"{'int8 mma':>8} {'fp mma':>7}"]
    for k in kernels:
        lines.append(f"{k.name:<20} {k.variant:<14} sm_{k.arch:<2} {k.config:<28} {k.registers!s:>5} "
                     f"{k.spill_bytes!s:>7} {k.shared_bytes:>7} {k.int8_mma:>8} {k.float_mma:>7}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="compile qcompiler's Triton kernels for CUDA targets (no GPU needed)")
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 80 (repeatable)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    kernels = compile_all(tuple(args.arch or (80, 90)))
    print(format_report(kernels))
    if args.json:
        rows = [dict(name=k.name, variant=k.variant, arch=k.arch, config=k.config, registers=k.registers,
                     spill_bytes=k.spill_bytes, shared_bytes=k.shared_bytes, int8_mma_sync=k.int8_mma_sync,
                     int8_wgmma=k.int8_wgmma, float_mma=k.float_mma, approx_div=k.approx_div) for k in kernels]
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
