"""What passes and lowering stand on: the quantization math, the IR contract, capture, errors.

Nothing in ``qcompiler.core`` imports another part of qcompiler.
"""

__version__ = "0.1.0"
