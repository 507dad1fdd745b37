"""The artifact format: ``qcompiler quantize`` (``qcompiler/tools/quantize.py``) writes one,
``qcompiler.load`` rebuilds a model from it.

An artifact folder holds:

- ``weights.safetensors``: every tensor the quantized graph reads, so its bytes are the model's size: the
  quantized weights in their stored form (``qcompiler.core.storage``: integers packed at their bits, scales
  and zero points in fp16 where that is exact; the bits per weight the report and the search count), the
  model's float parameters the graph reads (norms, biases, layers left float; once per tensor), and what the
  transforms computed (static activation ranges, transformed norm weights, AWQ input scales, Hadamard
  factors), by buffer or parameter name;
- ``stats/`` (when the recipe was calibrated): the calibration statistics, GPTQ/AWQ results included;
- ``manifest.json``: format and version, the recipe (as JSON), the model's parameter names and
  shapes, per layer the scheme, bits per weight, notes (alpha, GPTQ/AWQ settings, outlier columns)
  and SQNR of its output on the example batch, the transforms' notes, library versions, the
  SHA-256 of every file, a fingerprint of each float parameter the artifact was made from, how each stored
  tensor decodes, ``size`` (the tensors' bytes and bits per weight beside the count's, and ``extra_bytes``: what
  the transforms add beyond it), and the SHA-256 of the manifest itself (``qcompiler.core.integrity``).

Loading runs the same passes with the saved recipe and statistics (nothing is recalibrated) and then
replaces each computed tensor the graph reads by the saved one (decoded), checking names, shapes and dtypes; an edited manifest,
a file whose checksum differs from the manifest, a file name outside the folder, a model whose
parameters have other shapes or other values (another checkpoint; the backend option
``other_weights=True`` allows it on purpose), or a buffer the artifact lacks is an :class:`ArtifactError`. Only JSON and safetensors are
read: nothing is unpickled. The folder is written atomically (built beside, then renamed): a run that
fails or is killed leaves no folder, never a half-written one.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
import torch.fx as fx

from qcompiler.calibration.stats import CalibrationStats
from qcompiler.config import recipe_from_json, recipe_to_json
from qcompiler.core import __version__, integrity, storage
from qcompiler.core.errors import ArtifactError
from qcompiler.core.files import atomic_folder
from qcompiler.core.files import check_output as check_output_path
from qcompiler.core.ir import PARAM_META, QEMBEDDING, QLINEAR, PassResult

FORMAT = "qcompiler-artifact"
VERSION = 3  # 2: the manifest's own checksum and the weights' fingerprints; 3: the stored form, the parameters
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
STATS = "stats"


def _versions() -> dict:
    out = {"qcompiler": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "transformers", "safetensors"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def parameter_fingerprint(named_tensors) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in named_tensors}


def save(folder: Path, gm: fx.GraphModule, recipe, stats, report, comparison, params: dict,
         fingerprints: dict[str, str], counted: dict | None = None) -> Path:
    """Write an artifact for the graph ``gm`` in QDQ form (after ``insert_qdq``); ``params`` are the
    model's parameter shapes, ``fingerprints`` its :func:`~qcompiler.core.integrity.weight_fingerprints`,
    ``counted`` the model's bits as counted (``{"bits", "weights"}``, recorded beside the artifact's own)."""
    from safetensors.torch import save_file

    out = check_output(folder)
    with atomic_folder(out) as folder:
        _write(folder, gm, recipe, stats, report, comparison, params, fingerprints, save_file, counted)
    return out


def check_output(folder) -> Path:
    """Check, before any work, that an artifact can be written to ``folder``: absent or an empty folder
    (an older artifact's files would otherwise be left beside the new ones), in a writable place."""
    return check_output_path(folder, "artifact folder", folder=True)


def _read_buffers(gm: fx.GraphModule) -> set[str]:
    """The buffers some node of the graph reads."""
    return {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.users}


def _stored_weights(gm: fx.GraphModule) -> dict[str, tuple[str, str | None, int]]:
    """``w_q`` buffer -> (scale buffer, zero point buffer or None, bits) of every quantized linear and table."""
    out = {}
    for node in gm.graph.nodes:
        spec = node.meta.get(QLINEAR) or node.meta.get(QEMBEDDING)
        if spec is not None:
            out[spec.w_q] = (spec.w_scale, spec.w_zero_point, spec.weight_bits)
    return out


def graph_tensors(gm: fx.GraphModule) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, list[str]]]:
    """What the artifact stores for the QDQ graph ``gm``: every buffer the graph reads (the quantized weights
    in their stored form, ``qcompiler.core.storage``; the others as held) and every model parameter it reads
    (as held, once per tensor). Returns the tensors by name, their decoding entries (the stored form's), and
    per saved parameter the other names of the same tensor (tied weights)."""
    read = _read_buffers(gm)
    tensors, entries = {}, {}
    for w_q, (w_scale, w_zero, bits) in _stored_weights(gm).items():
        if w_q not in read:
            continue
        zero = gm.get_buffer(w_zero) if w_zero else None
        encoded = storage.encode_weight(gm.get_buffer(w_q), gm.get_buffer(w_scale), zero, bits)
        for role, data, entry in encoded:
            name = {"q": w_q, "scale": w_scale, "zero": w_zero}[role]
            tensors[name], entries[name] = data, entry | ({"scale": w_scale} if entry["form"] == "offset" else {})
    for name, buf in gm.named_buffers():
        if name in read and name not in tensors:
            tensors[name] = buf.detach().contiguous().clone()
    aliases: dict[str, list[str]] = {}
    first: dict[int, str] = {}
    for node in gm.graph.nodes:
        info = node.meta.get(PARAM_META) if node.op == "placeholder" and node.users else None
        if info is None or not info.is_parameter:
            continue
        key = id(info.tensor)
        if key in first:
            aliases[first[key]].append(info.name)
            continue
        first[key] = info.name
        aliases[info.name] = []
        tensors[info.name] = info.tensor.detach().contiguous().clone()
    return tensors, entries, aliases


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _write(folder: Path, gm, recipe, stats, report, comparison, params, fingerprints, save_file,
           counted: dict | None) -> None:
    tensors, entries, aliases = graph_tensors(gm)
    save_file(tensors, str(folder / WEIGHTS))
    files = {WEIGHTS: integrity.file_sha256(folder / WEIGHTS)}
    if stats is not None:
        stats.save(folder / STATS)
        for path in sorted((folder / STATS).iterdir()):
            files[f"{STATS}/{path.name}"] = integrity.file_sha256(path)
    sqnr = {e.module: e.sqnr_db for e in comparison.layers} if comparison is not None else {}
    layers = []
    for d in report.layers:
        layers.append({
            "module": d.module, "quantized": d.quantized, "scheme": d.scheme, "bits_per_weight": d.bits_per_weight,
            "weight_bytes": d.weight_bytes, "shared_with": d.shared_with, "notes": d.reason,
            "sqnr_db": None if d.module not in sqnr or sqnr[d.module] == float("inf") else round(sqnr[d.module], 3),
        })
    manifest = {
        "format": FORMAT, "version": VERSION, "recipe": recipe_to_json(recipe),
        "parameters": params, "weight_fingerprints": fingerprints,
        "buffers": {n: {"shape": list(t.shape), "dtype": str(t.dtype)} for n, t in gm.named_buffers() if n in tensors},
        "stored": entries, "saved_parameters": aliases, "size": _size(tensors, params, counted),
        "layers": layers, "transforms": report.transforms,
        "logits_kl_on_example": comparison.kl if comparison is not None else None,
        "versions": _versions(), "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(integrity.seal(manifest), indent=1))


def _size(tensors: dict, params: dict, counted: dict | None) -> dict:
    """The artifact's tensor bytes against the model's float weights, and the count (``counted``:
    ``{"bits": ..., "weights": ...}`` as ``qcompiler.tools.model_bits`` gives them) beside it."""
    nbytes = tensor_bytes(tensors)
    out = {"tensor_bytes": nbytes}
    if counted:
        out.update(weights=counted["weights"], bits_per_weight=8 * nbytes / counted["weights"],
                   counted_bits=counted["bits"], counted_bits_per_weight=counted["bits"] / counted["weights"],
                   extra_bytes=nbytes - counted["bits"] // 8)
    return out


class Artifact:
    """A verified artifact folder: its recipe, statistics and saved tensors."""

    def __init__(self, folder) -> None:
        self.folder = Path(folder)
        hint = "write it again with `qcompiler quantize`"
        manifest_path = self.folder / MANIFEST
        if not manifest_path.is_file():
            raise ArtifactError(f"{self.folder} is not a qcompiler artifact: {MANIFEST} is missing; {hint}")
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{manifest_path} is not valid JSON ({exc}); {hint}") from exc
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise ArtifactError(f"{manifest_path} is not a qcompiler artifact manifest; {hint}")
        if self.manifest.get("version") != VERSION:
            raise ArtifactError(f"{manifest_path} has version {self.manifest.get('version')}, this qcompiler "
                                f"reads {VERSION}; {hint}")
        if not integrity.is_sealed(self.manifest):
            raise ArtifactError(f"{manifest_path} was changed after it was written (its sha256 does not match "
                                f"its contents): the recipe, schemes or files it lists can not be trusted; {hint}")
        for name, digest in self.manifest.get("files", {}).items():
            path = integrity.plain_member(self.folder, name)
            if path is None or not (name == WEIGHTS or name.startswith(f"{STATS}/")):
                raise ArtifactError(f"{MANIFEST} lists {name!r}: an artifact holds only {WEIGHTS} and {STATS}/ "
                                    f"files inside its folder; {hint}")
            if not path.is_file():
                raise ArtifactError(f"{path} is missing from the artifact; {hint}")
            if integrity.file_sha256(path) != digest:
                raise ArtifactError(f"{path} does not match the checksum in {MANIFEST}: the file was changed or "
                                    f"corrupted after it was written; {hint}")
        if WEIGHTS not in self.manifest.get("files", {}):
            raise ArtifactError(f"{MANIFEST} lists no {WEIGHTS}; {hint}")
        try:
            self.recipe = recipe_from_json(self.manifest["recipe"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{MANIFEST} has no valid recipe ({exc}); {hint}") from exc
        from safetensors.torch import load_file

        self.tensors, self.parameters = self._decode(load_file(str(self.folder / WEIGHTS)), hint)
        self._weights = integrity.WeightCheck(self.manifest.get("weight_fingerprints"))
        self.stats = None
        if (self.folder / STATS).is_dir():
            self.stats = CalibrationStats.load(self.folder / STATS)

    def _decode(self, raw: dict, hint: str) -> tuple[dict, dict]:
        """The saved buffers in the form the graph holds them (the stored form decoded), and the saved parameters."""
        entries = self.manifest.get("stored", {})
        saved = self.manifest.get("saved_parameters", {})
        if not isinstance(entries, dict) or not isinstance(saved, dict):
            raise ArtifactError(f"{MANIFEST} has no valid stored-form entries; {hint}")
        params = {name: raw.pop(name) for name in saved if name in raw}
        offsets = [name for name, entry in entries.items() if isinstance(entry, dict) and entry.get("form") == "offset"]
        tensors = {}
        try:
            for name, t in raw.items():
                if name not in offsets:
                    tensors[name] = storage.decode(t, entries[name]) if name in entries else t
            for name in offsets:
                tensors[name] = storage.decode(raw[name], entries[name], scale=tensors[entries[name]["scale"]])
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{self.folder / WEIGHTS} does not decode as {MANIFEST} describes it ({exc}); "
                                f"{hint}") from exc
        return tensors, params

    def check_parameters(self, named_tensors) -> None:
        """Raise unless the model's parameters have the names and shapes the artifact was made for."""
        expected = self.manifest.get("parameters", {})
        have = parameter_fingerprint(named_tensors)
        wrong = [n for n, shape in expected.items() if n in have and have[n] != shape]
        missing = [n for n in expected if n not in have]
        if wrong or missing:
            shown = ", ".join((wrong + missing)[:5])
            raise ArtifactError(f"the artifact {self.folder} was made for another model: parameters {shown} "
                                "differ or are missing; quantize this model")

    def check_weights(self, named_tensors) -> None:
        """Raise unless the float weights are the ones the artifact was made from."""
        bad = self._weights.differing(named_tensors)
        if bad:
            raise ArtifactError(f"the artifact {self.folder} was made from other weights: {', '.join(bad[:5])} "
                                f"{'differ' if len(bad) > 1 else 'differs'} from the model given (another checkpoint, "
                                "dtype or fine-tune with the same shapes); quantize this model, or pass "
                                "other_weights=True to apply it anyway")

    def apply(self, gm: fx.GraphModule) -> PassResult:
        """Replace the tensors the passes computed by the saved ones (names, shapes and dtypes checked)."""
        params = [(n.meta[PARAM_META].name, n.meta[PARAM_META].tensor) for n in gm.graph.nodes
                  if n.op == "placeholder" and PARAM_META in n.meta]
        expected = self.manifest.get("parameters", {})
        wrong = [name for name, t in params if name in expected and expected[name] != list(t.shape)]
        if wrong:
            raise ArtifactError(f"the artifact {self.folder} was made for another model: parameters {wrong[:5]} "
                                "have other shapes; quantize this model")
        replaced = 0
        read = _read_buffers(gm)
        for name, buf in list(gm.named_buffers()):
            saved = self.tensors.get(name)
            if saved is None and name not in read:
                continue  # computed and not read (a transform's float weight the quantized one replaced)
            if saved is None:
                raise ArtifactError(f"the artifact {self.folder} has no tensor {name!r} for this graph: it was made "
                                    "for another model or recipe; quantize this model")
            if saved.shape != buf.shape or saved.dtype != buf.dtype:
                raise ArtifactError(f"tensor {name!r} of the artifact is {saved.dtype} {tuple(saved.shape)}, this graph "
                                    f"needs {buf.dtype} {tuple(buf.shape)}: the artifact was made for another model")
            gm.register_buffer(name, saved.to(buf.device))
            replaced += 1
        return PassResult(gm, modified=replaced > 0, counts={"tensors_loaded": replaced})
