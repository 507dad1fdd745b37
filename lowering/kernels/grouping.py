"""The grouped ordering of a GEMM's output tiles that both Triton GEMMs use (the Triton matmul
tutorial's "L2 cache optimizations"): programs walk ``GROUP_M`` rows of tiles column by column, so
the tiles running at the same time share rows of A and columns of B in the L2 cache."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_program_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The ``(pid_m, pid_n)`` tile of program ``pid`` in the grouped order."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n
