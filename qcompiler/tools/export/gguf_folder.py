"""An export folder for llama.cpp: one GGUF file (``gguf.write_gguf``) and a README of how it was made."""

from __future__ import annotations

from pathlib import Path

from qcompiler.core.errors import ExportError
from qcompiler.core.files import atomic_folder, occupied
from qcompiler.tools.export.gguf import write_gguf
from qcompiler.tools.export.model import ExportModel


def write_gguf_folder(model: ExportModel, out_dir: str | Path, gguf_type: str, *, embedding_type: str = "Q8_0") -> Path:
    """``out_dir`` (absent or empty) holding ``model-<gguf_type>.gguf`` and a README of how it was made,
    written atomically (built as a sibling folder, then renamed)."""
    out = Path(out_dir)
    if occupied(out):
        raise ExportError(f"{out} exists and is not an empty folder")
    with atomic_folder(out) as tmp:
        path = write_gguf(model, tmp / f"model-{gguf_type}.gguf", gguf_type, embedding_type=embedding_type)
        (tmp / "README.md").write_text(_readme(model, path.name, gguf_type, embedding_type))
    return out / path.name


def _readme(model: ExportModel, file: str, gguf_type: str, embedding_type: str) -> str:
    groups = sorted({lin.group_size or lin.q.shape[1] for lin in model.linears.values()})
    acts = sorted({"float" if lin.activation is None else "int8" for lin in model.linears.values()})
    lines = ["# GGUF export", "", f"`{file}`: made by qcompiler for llama.cpp (`llama-cli -m {file}`, "
             f"`llama-perplexity`, `llama-server`).", "",
             f"- {len(model.linears)} linear layers as `{gguf_type}`: the integers and fp16 scales qcompiler's "
             f"rounding chose (groups of {', '.join(map(str, groups))} input channels, written as blocks of 32), "
             "not re-quantized.",
             f"- token embedding (and a float LM head) as `{embedding_type}`; norms F32; layers the recipe kept "
             "in float as F16.",
             "- q_proj / k_proj rows permuted to llama.cpp's rotary layout, as its HF converter does."]
    if "int8" in acts:
        lines.append("- the recipe quantized activations too: llama.cpp quantizes them its own way at run time "
                     "(blocks of 32), so its activations are not qcompiler's.")
    if model.notes:
        lines += ["", "## How it was made", ""] + [f"- {note}" for note in model.notes]
    return "\n".join(lines) + "\n"
