"""Checksums of the folders we write and fingerprints of the weights they were made from.

- :func:`file_sha256`: a file's SHA-256 (artifact and statistics files);
- :func:`document_sha256`: the SHA-256 of a JSON document's canonical form without its own
  ``"sha256"`` key, so a manifest can carry the checksum of itself;
- :func:`weight_fingerprints`: a short SHA-256 per float parameter (name, dtype, shape and bytes), so an
  artifact or statistics folder made from one checkpoint is not silently applied to another model
  with the same names and shapes.

These detect edits and corruption, not a forger: anyone can recompute a SHA-256 (there is no signature).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import torch

SELF_KEY = "sha256"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def document_sha256(doc: dict) -> str:
    body = {k: v for k, v in doc.items() if k != SELF_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(doc: dict) -> dict:
    """``doc`` with its own checksum under ``"sha256"``."""
    return {**doc, SELF_KEY: document_sha256(doc)}


def is_sealed(doc: dict) -> bool:
    return isinstance(doc.get(SELF_KEY), str) and doc[SELF_KEY] == document_sha256(doc)


def tensor_fingerprint(t: torch.Tensor) -> str:
    """``"<shape>:<16 hex digits>"``, e.g. ``"64x32:5f0c..."``: the shape readable (a tensor of another
    shape is left to the checks that say so), the digits over dtype, shape and bytes."""
    t = t.detach()
    digest = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return f"{_shape(t)}:{digest.hexdigest()[:16]}"


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape))


def weight_fingerprints(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """A fingerprint per floating-point tensor (integer buffers such as position ids are left out)."""
    return {name: tensor_fingerprint(t) for name, t in named_tensors if t.is_floating_point()}


class WeightCheck:
    """Compares tensors with the fingerprints a folder recorded; a tensor found equal is not hashed
    again while it is unchanged (same storage, version, shape and dtype): each compiled graph checks."""

    def __init__(self, expected: dict[str, str] | None) -> None:
        self.expected = dict(expected or {})
        self._equal: dict[str, tuple] = {}

    def differing(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Names the folder recorded whose tensor here has other values. Empty when a recorded tensor
        has another shape: that is another architecture, which the layer and parameter checks name
        more precisely (statistics of 64 channels for a layer of 96)."""
        named = [(name, t) for name, t in named_tensors if name in self.expected]
        if any(not self.expected[name].startswith(f"{_shape(t)}:") for name, t in named):
            return []
        bad = []
        for name, t in named:
            key = (t.data_ptr(), _version(t), tuple(t.shape), t.dtype)
            if self._equal.get(name) == key:
                continue
            if tensor_fingerprint(t) == self.expected[name]:
                self._equal[name] = key
            else:
                bad.append(name)
        return bad

def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        return None


def plain_member(folder: Path, name: str) -> Path | None:
    """``folder / name`` if ``name`` is a relative path of plain parts inside ``folder`` (no ``..``,
    not absolute, no backslashes), else None."""
    if not isinstance(name, str) or not name or "\\" in name:
        return None
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or any(p in ("", ".", "..") for p in parts):
        return None
    return folder.joinpath(*parts)
