"""qcompiler: post-training quantization as a ``torch.compile`` backend.

    compiled = torch.compile(model, backend="qcompiler", options={"recipe": "w8a8-dynamic"})
    with torch.inference_mode():
        logits = compiled(input_ids).logits
    print(qcompiler.last_report())
"""

from qcompiler import primitives
from qcompiler.config import (
    PRESETS,
    ActivationScheme,
    BackendOptions,
    LayerOverride,
    Recipe,
    WeightScheme,
)
from qcompiler.report import clear_reports, last_report, reports

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "ActivationScheme",
    "BackendOptions",
    "LayerOverride",
    "Recipe",
    "WeightScheme",
    "clear_reports",
    "last_report",
    "primitives",
    "reports",
]
