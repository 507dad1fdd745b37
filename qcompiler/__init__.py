"""qcompiler: post-training quantization as a ``torch.compile`` backend.

    compiled = torch.compile(model, backend="qcompiler", options={"recipe": "w8a8-dynamic"})
    with torch.inference_mode():
        logits = compiled(input_ids).logits
    print(qcompiler.last_report())

    # generation: Hugging Face's generate() on the quantized graphs (a static KV cache)
    quantized = qcompiler.compile(model, "w8a8-dynamic")
    out = quantized.generate(input_ids, max_new_tokens=64)

Layout (imports point down only): ``qcompiler.tools`` (CLI, evaluation, benchmarks, reports, export)
-> the composition root (``backend``, ``pipeline``, ``plan``, ``report``, ``dump``, ``artifact``,
``calibration``) -> ``qcompiler.passes`` / ``qcompiler.lowering`` -> ``qcompiler.config`` ->
``qcompiler.core``.
"""

from qcompiler.calibration.calibrate import calibrate
from qcompiler.calibration.stats import CalibrationStats
from qcompiler.config import (
    AWQ,
    GPTQ,
    HQQ,
    PRESETS,
    ActivationScheme,
    BackendOptions,
    LayerOverride,
    MixedInt8,
    OutlierSplit,
    Recipe,
    Rotation,
    SmoothQuant,
    WeightScheme,
)
from qcompiler.core import __version__, primitives  # noqa: F401  (primitives registers the qcompiler:: ops)
from qcompiler.report import clear_reports, last_report, reports
from qcompiler.tools.compare import compare
from qcompiler.tools.generate import compile  # noqa: A004  (qcompiler.compile, as torch.compile)
from qcompiler.tools.quantize import load

__all__ = [
    "AWQ",
    "GPTQ",
    "HQQ",
    "PRESETS",
    "ActivationScheme",
    "BackendOptions",
    "CalibrationStats",
    "LayerOverride",
    "MixedInt8",
    "OutlierSplit",
    "Recipe",
    "Rotation",
    "SmoothQuant",
    "WeightScheme",
    "__version__",
    "calibrate",
    "clear_reports",
    "compare",
    "compile",
    "last_report",
    "load",
    "primitives",
    "reports",
]
