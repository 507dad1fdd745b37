"""Per-layer results of the search, cached as JSON: one file per model (a fingerprint of every float
weight), in it one entry per candidate key (``measure.candidate_key``: schemes, rounding, skip list,
metric, calibration data, device) holding each layer's bits and sensitivity. A rerun with the same model,
data and candidates reads them instead of measuring (written atomically after each candidate)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qcompiler.core import integrity
from qcompiler.core.errors import StatsError
from qcompiler.core.files import check_output, write_text_atomic
from qcompiler.tools.timing import cpu_fingerprint

FORMAT = "qcompiler-autotune-cache"
VERSION = 4  # 2: bits counted on a graph of more rows than a decode step (search._batch_rows); 3: tables
# that read a tied head's weight (``shared``); 4: bits of the stored form (``qcompiler.core.storage``), not the
# kernels' memory. An older file's sensitivities are read; its bits are counted again.
READS = (2, 3, 4)
COUNTED = "stored"  # on each entry whose bits are the stored form's


def model_fingerprint(model) -> str:
    """SHA-256 over the fingerprints (dtype, shape, bytes) of every floating-point parameter and buffer."""
    prints = integrity.weight_fingerprints(list(model.named_parameters()) + list(model.named_buffers()))
    return hashlib.sha256(json.dumps(prints, sort_keys=True).encode()).hexdigest()


class SearchCache:
    """``folder`` None: nothing is read or written."""

    def __init__(self, folder, fingerprint: str) -> None:
        self.path = None if folder is None else Path(folder) / f"autotune-{fingerprint[:16]}.json"
        self.doc = {"format": FORMAT, "version": VERSION, "model": fingerprint, "candidates": {}}
        self.machine = cpu_fingerprint()  # the bits are counted on this CPU's kernels
        if folder is not None:
            check_output(folder, "cache folder", folder=True, replaceable=lambda path: True)
        if self.path is not None and self.path.exists():
            self.doc = self._read(fingerprint)

    def _read(self, fingerprint: str) -> dict:
        hint = f"delete {self.path} to measure again"
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StatsError(f"the search cache {self.path} is not readable JSON ({exc}); {hint}") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") not in READS:
            raise StatsError(f"{self.path} is not a qcompiler search cache of version {' or '.join(map(str, READS))}; "
                             f"{hint}")
        if doc.get("model") != fingerprint or not isinstance(doc.get("candidates"), dict):
            raise StatsError(f"{self.path} holds results of another model (its weight fingerprint differs); {hint}")
        return doc

    def get(self, key: str, modules: list[str]) -> tuple[dict[str, int], dict[str, float]] | None:
        """The cached bits and sensitivities of ``modules`` for ``key``, or None unless all are there."""
        entry = self.doc["candidates"].get(key)
        if not isinstance(entry, dict):
            return None
        bits, sensitivity = entry.get("bits", {}), entry.get("sensitivity", {})
        if not all(isinstance(bits.get(m), int) and isinstance(sensitivity.get(m), float) for m in modules):
            return None
        return {m: bits[m] for m in modules}, {m: sensitivity[m] for m in modules}

    def get_bits(self, key: str, modules: list[str]) -> tuple[dict[str, int], dict[str, int]] | None:
        """The cached bits of ``modules`` for ``key`` and the tables' bits a shared head saves
        (``measure.candidate_bits``), or None (not there, written by a version before 4, which counted the
        kernels' memory, or on another CPU, whose kernels may not share a table: the sensitivities are kept)."""
        entry = self.doc["candidates"].get(key)
        if not isinstance(entry, dict):
            return None
        bits, shared = entry.get("bits", {}), entry.get("shared")
        if entry.get("counted") != COUNTED or not isinstance(shared, dict) or not all(isinstance(bits.get(m), int) for m in modules):
            return None
        if entry.get("machine", self.machine) != self.machine:  # the kernels' layouts are this CPU's
            return None
        return {m: bits[m] for m in modules}, {m: int(v) for m, v in shared.items()}

    def put(self, key: str, what: str, bits: dict[str, int], sensitivity: dict[str, float],
            shared: dict[str, int] | None = None) -> None:
        self.doc["version"] = VERSION
        self.doc["candidates"][key] = {"candidate": what, "bits": bits, "shared": shared or {},
                                       "machine": self.machine, "counted": COUNTED,
                                       "sensitivity": sensitivity}
        if self.path is not None:
            write_text_atomic(self.path, json.dumps(self.doc, indent=1))
