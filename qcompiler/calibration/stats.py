"""Calibration statistics: immutable, keyed by module name, saved as safetensors + JSON (no pickle).

A saved folder holds ``calibration.safetensors`` (one set of tensors per layer input) and
``calibration.json`` (the format version, the layer names, how the data was gathered, a readable copy
of each layer's min/max, the SHA-256 of the tensors file and of the JSON itself; loading checks both,
so a flipped byte or an edited value is an error, not a silently different range). ``info`` holds the
fingerprints of the float weights the statistics were gathered on (``qcompiler.core.integrity``): the
backend refuses them for a model with other weights unless ``other_weights=True``. A folder is written
atomically (built beside, then renamed): a killed run leaves the old folder or none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType

from qcompiler.calibration.observers import ActivationRanges
from qcompiler.core import files, integrity
from qcompiler.core.errors import ConfigTypeError, StatsError
from qcompiler.core.ir import QuantizedWeight, RoundedLayer

FORMAT = "qcompiler-calibration"
VERSION = 2  # 2: checksums of the tensors and of the JSON
TENSORS_FILE = "calibration.safetensors"
JSON_FILE = "calibration.json"
# fields that may be None (saved only when present): every field whose default is None
_OPTIONAL_FIELDS = [f.name for f in fields(ActivationRanges) if f.default is None]
_TENSOR_FIELDS = [f.name for f in fields(ActivationRanges) if f.name != "batches" and f.name not in _OPTIONAL_FIELDS]


def _pack(prefix: str, ranges_by_module: Mapping[str, ActivationRanges], tensors: dict) -> dict:
    layers = {}
    for i, (module, ranges) in enumerate(sorted(ranges_by_module.items())):
        for name in _TENSOR_FIELDS:
            tensors[f"{prefix}{i}.{name}"] = getattr(ranges, name).detach().cpu().contiguous()
        optional = [name for name in _OPTIONAL_FIELDS if getattr(ranges, name) is not None]
        for name in optional:
            tensors[f"{prefix}{i}.{name}"] = getattr(ranges, name).detach().cpu().contiguous()
        layers[module] = {"index": i, "batches": ranges.batches, "samples": ranges.samples is not None,
                          "optional": optional,
                          "min": float(ranges.min), "max": float(ranges.max)}
    return layers


def _unpack(prefix: str, layers: dict, tensors: dict) -> dict[str, ActivationRanges]:
    out = {}
    for module, entry in layers.items():
        i = entry["index"]
        values = {name: tensors[f"{prefix}{i}.{name}"] for name in _TENSOR_FIELDS}
        optional = set(entry.get("optional", ["samples"] if entry.get("samples") else []))
        values.update({name: tensors[f"{prefix}{i}.{name}"] for name in _OPTIONAL_FIELDS if name in optional})
        out[module] = ActivationRanges(**values, batches=int(entry["batches"]))
    return out


def _pack_weights(weights: Mapping, tensors: dict) -> dict:
    layers = {}
    for i, (module, r) in enumerate(sorted(weights.items())):
        qw = r.weight
        tensors[f"w{i}.q"] = qw.q.contiguous()
        tensors[f"w{i}.scale"] = qw.scale.contiguous()
        if qw.zero_point is not None:
            tensors[f"w{i}.zero_point"] = qw.zero_point.contiguous()
        if r.input_scale is not None:
            tensors[f"w{i}.input_scale"] = r.input_scale.clone()  # layers of one AWQ group share one s
        layers[module] = {"index": i, "method": r.method, "checksum": r.checksum, "note": r.note,
                          "bits": qw.bits, "symmetric": qw.symmetric, "block_size": list(qw.block_size),
                          "zero_point": qw.zero_point is not None, "input_scale": r.input_scale is not None}
    return layers


def _unpack_weights(layers: dict, tensors: dict) -> dict:
    out = {}
    for module, e in layers.items():
        i = e["index"]
        qw = QuantizedWeight(
            q=tensors[f"w{i}.q"], scale=tensors[f"w{i}.scale"],
            zero_point=tensors[f"w{i}.zero_point"] if e["zero_point"] else None,
            block_size=tuple(int(b) for b in e["block_size"]), bits=int(e["bits"]), symmetric=bool(e["symmetric"]),
        )
        out[module] = RoundedLayer(qw, str(e["method"]), float(e["checksum"]),
                                   tensors[f"w{i}.input_scale"] if e["input_scale"] else None, str(e.get("note", "")))
    return out


@dataclass(frozen=True, eq=False)
class CalibrationStats:
    """Per-layer input statistics from :func:`qcompiler.calibrate`, keyed by the linear's module name.

    Equal only to itself: Dynamo compares the options of compiled graphs, and comparing statistics by
    value would compare tensors (an error) or cost a pass over every histogram.

    ``activations`` are the linear inputs as the quantized graph computes them (after the recipe's
    transforms: SmoothQuant, outlier splitting, LLM.int8() decomposition); static ranges come from
    them. ``raw`` are the inputs of the float model, which the transforms are computed from; without
    transforms they are the same statistics. ``weights`` are the layers' weights as GPTQ/AWQ rounded
    them on the calibration data (``RoundedLayer``), for recipes with data-driven rounding.
    """

    activations: Mapping[str, ActivationRanges]
    info: Mapping[str, object] = field(default_factory=dict)
    raw: Mapping[str, ActivationRanges] | None = None
    weights: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "activations", MappingProxyType(dict(self.activations)))
        object.__setattr__(self, "info", MappingProxyType(dict(self.info)))
        raw = self.activations if self.raw is None else MappingProxyType(dict(self.raw))
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "weights", MappingProxyType(dict(self.weights)))

    def check_weights(self, named_tensors) -> None:
        """Raise unless the float weights are the ones the statistics were gathered on (statistics
        without fingerprints, built by hand, are not checked)."""
        if "_weight_check" not in self.__dict__:
            object.__setattr__(self, "_weight_check", integrity.WeightCheck(self.info.get("weight_fingerprints")))
        bad = self._weight_check.differing(named_tensors)
        if bad:
            raise StatsError(f"these statistics were gathered on other weights: {', '.join(bad[:5])} "
                             f"{'differ' if len(bad) > 1 else 'differs'} from the model given (another checkpoint, "
                             "dtype or fine-tune with the same shapes); calibrate this model, or pass the backend "
                             "option other_weights=True (--other-weights on the command line) to use them anyway")

    def __contains__(self, module: str) -> bool:
        return module in self.activations

    def __getitem__(self, module: str) -> ActivationRanges:
        return self.activations[module]

    @staticmethod
    def check_output(path: str | Path) -> Path:
        """Check, before calibrating, that :meth:`save` can write ``path``: absent, an empty folder, or an
        older calibration folder (replaced whole)."""
        return files.check_output(path, "statistics folder", folder=True, replaceable=is_stats_folder)

    def save(self, path: str | Path) -> Path:
        """Write the statistics to the folder ``path`` atomically (see :meth:`check_output`): a run that
        fails or is killed leaves the old folder, or none."""
        folder = self.check_output(path)
        from safetensors.torch import save_file

        tensors: dict = {}
        doc = {"format": FORMAT, "version": VERSION, "info": dict(self.info),
               "layers": _pack("", self.activations, tensors)}
        if self.raw is not self.activations:
            doc["raw_layers"] = _pack("raw.", self.raw, tensors)
        if self.weights:
            doc["rounded_weights"] = _pack_weights(self.weights, tensors)
        with files.atomic_folder(folder) as tmp:
            save_file(tensors, str(tmp / TENSORS_FILE))
            doc["tensors_sha256"] = integrity.file_sha256(tmp / TENSORS_FILE)
            (tmp / JSON_FILE).write_text(json.dumps(integrity.seal(doc), indent=1))
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
        if not integrity.is_sealed(doc):
            raise StatsError(f"{json_path} was changed after it was written (its sha256 does not match its "
                             f"contents); {hint}")
        if integrity.file_sha256(tensor_path) != doc.get("tensors_sha256"):
            raise StatsError(f"{tensor_path} does not match the checksum in {JSON_FILE}: it was changed or "
                             f"corrupted after it was written; {hint}")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(tensor_path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise StatsError(f"{tensor_path} is corrupted ({exc}); {hint}") from exc
        try:
            activations = _unpack("", doc["layers"], tensors)
            raw = _unpack("raw.", doc["raw_layers"], tensors) if "raw_layers" in doc else None
            weights = _unpack_weights(doc.get("rounded_weights", {}), tensors)
        except (KeyError, TypeError, ValueError) as exc:
            raise StatsError(f"{folder}: the JSON and the tensors do not match (missing {exc}); {hint}") from exc
        return cls(activations, doc.get("info", {}), raw, weights)


def is_stats_folder(path: str | Path) -> bool:
    """True if ``path`` is a folder holding only a qcompiler calibration (what :meth:`CalibrationStats.save`
    writes), so a new calibration may replace it."""
    path = Path(path)
    try:
        names = {p.name for p in path.iterdir()}
        doc = json.loads((path / JSON_FILE).read_text())
    except (OSError, ValueError):
        return False
    return names <= {JSON_FILE, TENSORS_FILE} and isinstance(doc, dict) and doc.get("format") == FORMAT


def resolve_stats(stats) -> CalibrationStats | None:
    """The backend's ``stats`` option: None, a :class:`CalibrationStats`, or a folder to load."""
    if stats is None or isinstance(stats, CalibrationStats):
        return stats
    if isinstance(stats, (str, os.PathLike)):
        return CalibrationStats.load(stats)
    raise ConfigTypeError(f"option 'stats' must be CalibrationStats or a folder path, got {type(stats).__name__}")

