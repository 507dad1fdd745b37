"""qcompiler: post-training quantization as a ``torch.compile`` backend.

    compiled = torch.compile(model, backend="qcompiler", options={"recipe": "w8a8-dynamic"})
    with torch.inference_mode():
        logits = compiled(input_ids).logits
    print(qcompiler.last_report())
"""

__version__ = "0.1.0"

from qcompiler import primitives  # noqa: E402  (registers the qcompiler:: ops)
from qcompiler import debug  # noqa: E402
from qcompiler.artifact import load  # noqa: E402
from qcompiler.calibrate import calibrate  # noqa: E402
from qcompiler.config import (  # noqa: E402
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
    SmoothQuant,
    WeightScheme,
)
from qcompiler.report import clear_reports, last_report, reports  # noqa: E402
from qcompiler.stats import CalibrationStats  # noqa: E402

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
    "SmoothQuant",
    "WeightScheme",
    "calibrate",
    "debug",
    "load",
    "clear_reports",
    "last_report",
    "primitives",
    "reports",
]
