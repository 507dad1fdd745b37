"""Weight rounding methods: map a float weight to integers plus scales."""

from qcompiler.passes.weight_rounding.rtn import QuantizedWeight, round_to_nearest

__all__ = ["QuantizedWeight", "round_to_nearest"]
