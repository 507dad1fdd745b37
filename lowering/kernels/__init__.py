"""Kernels per device: Triton kernels for CUDA (``triton_int8``, ``triton_int4``, ``triton_quant``, tuned by
``autotune``, compiled without a GPU by ``compile_check``), fast CPU kernels (``cpu``) and the pure-torch
reference (``reference``)."""
