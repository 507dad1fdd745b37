"""Lowering: QDQ patterns left by the passes -> ``qcompiler::`` kernels."""
