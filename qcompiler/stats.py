"""Calibration statistics: immutable, keyed by module name, saved as safetensors + JSON (no pickle).

A saved folder holds ``calibration.safetensors`` (one set of tensors per layer input) and
``calibration.json`` (the format version, the layer names, how the data was gathered, and a
readable copy of each layer's min/max).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType

import torch

from qcompiler.errors import StatsError
from qcompiler.observers import ActivationRanges

FORMAT = "qcompiler-calibration"
VERSION = 1
TENSORS_FILE = "calibration.safetensors"
JSON_FILE = "calibration.json"
_TENSOR_FIELDS = [f.name for f in fields(ActivationRanges) if f.name != "batches"]


@dataclass(frozen=True)
class CalibrationStats:
    """Per-layer input statistics from :func:`qcompiler.calibrate`, keyed by the linear's module name."""

    activations: Mapping[str, ActivationRanges]
    info: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "activations", MappingProxyType(dict(self.activations)))
        object.__setattr__(self, "info", MappingProxyType(dict(self.info)))

    def __contains__(self, module: str) -> bool:
        return module in self.activations

    def __getitem__(self, module: str) -> ActivationRanges:
        return self.activations[module]

    def missing(self, modules: Iterable[str]) -> list[str]:
        return sorted(m for m in set(modules) if m not in self.activations)

    def save(self, path: str | Path) -> Path:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        tensors = {}
        layers = {}
        for i, (module, ranges) in enumerate(sorted(self.activations.items())):
            for name in _TENSOR_FIELDS:
                tensors[f"{i}.{name}"] = getattr(ranges, name).detach().cpu().contiguous()
            layers[module] = {"index": i, "batches": ranges.batches,
                              "min": float(ranges.min), "max": float(ranges.max)}
        save_file(tensors, str(folder / TENSORS_FILE))
        doc = {"format": FORMAT, "version": VERSION, "info": dict(self.info), "layers": layers}
        (folder / JSON_FILE).write_text(json.dumps(doc, indent=1))
        return folder

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        folder = Path(path)
        hint = "re-run `qcompiler calibrate` (or qcompiler.calibrate) to write it again"
        json_path, tensor_path = folder / JSON_FILE, folder / TENSORS_FILE
        if not json_path.is_file() or not tensor_path.is_file():
            raise StatsError(f"{folder} is not a calibration folder: it needs {JSON_FILE} and {TENSORS_FILE}; {hint}")
        try:
            doc = json.loads(json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StatsError(f"{json_path} is not valid JSON ({exc}); {hint}") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise StatsError(f"{json_path} is not a qcompiler calibration file; {hint}")
        if doc.get("version") != VERSION:
            raise StatsError(f"{json_path} has format version {doc.get('version')}, this qcompiler reads {VERSION}; {hint}")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise StatsError(f"{tensor_path} is corrupted ({exc}); {hint}") from exc
        activations = {}
        try:
            for module, entry in doc["layers"].items():
                i = entry["index"]
                values = {name: tensors[f"{i}.{name}"] for name in _TENSOR_FIELDS}
                activations[module] = ActivationRanges(**values, batches=int(entry["batches"]))
        except (KeyError, TypeError) as exc:
            raise StatsError(f"{folder}: the JSON and the tensors do not match (missing {exc}); {hint}") from exc
        return cls(activations, doc.get("info", {}))


def resolve(stats) -> CalibrationStats | None:
    """The backend's ``stats`` option: None, a :class:`CalibrationStats`, or a folder to load."""
    if stats is None or isinstance(stats, CalibrationStats):
        return stats
    if isinstance(stats, (str, Path)):
        return CalibrationStats.load(stats)
    raise TypeError(f"option 'stats' must be CalibrationStats or a folder path, got {type(stats).__name__}")

