"""Kernels per device: fast CPU kernels (``cpu``) and the pure-torch reference (``reference``)."""
