"""Tokenizer metadata (``tokenizer.*`` keys) for a GGUF export.

Two sources:

* ``copy_from_gguf``: every ``tokenizer.ggml.*`` key and ``tokenizer.chat_template*`` of the GGUF the
  model was loaded from, with its exact GGUF value type (strings copied as raw bytes).
* ``build_from_dir``: built from a Hugging Face ``tokenizer.json`` the way llama.cpp's
  ``convert_hf_to_gguf.py`` does for Llama models (checked against its source,
  ``conversion/base.py`` and ``conversion/llama.py`` of the llama.cpp vendored by llama-cpp-python 0.3.36):

  - a SentencePiece model converted to a byte-fallback BPE ``tokenizer.json`` (the Llama 1/2 form,
    stories260K) becomes the ``"llama"`` vocab: tokens, scores and token types. llama.cpp's own
    ``LlamaHfVocab`` gives every token the score -1000, which makes llama.cpp's SPM tokenizer merge
    left to right instead of by merge priority; we write SentencePiece's scores instead: a BPE
    SentencePiece model gives its i-th normal piece the score -i, and transformers keeps SentencePiece's
    ids, so score = -(rank among normal tokens); control, unknown and byte tokens score 0. This
    reproduces stories260K.gguf's tokens, scores and types exactly.
  - a byte-level BPE (GPT-2 form, SmolLM2) becomes the ``"gpt2"`` vocab: tokens, token types, merges
    and ``tokenizer.ggml.pre``. llama.cpp picks ``pre`` by hashing the tokenization of a test string;
    without running the tokenizer we read it off ``tokenizer.json``'s pre-tokenizer (a few known
    forms), or take the caller's ``pre``.
  - special token ids, ``add_bos_token``/``add_eos_token`` and the chat template come from
    ``gguf.SpecialVocab`` (the gguf package's reader of tokenizer_config.json / tokenizer.json), as in
    llama.cpp's converter.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf

from qcompiler.core.errors import ExportError

_T = gguf.GGUFValueType
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def copy_from_gguf(writer: gguf.GGUFWriter, source: str | Path) -> int:
    """Copy the tokenizer keys of ``source`` into ``writer``; returns the number of tokens."""
    reader = gguf.GGUFReader(source)
    n_tokens = None
    for key, field in reader.fields.items():
        if not (key.startswith("tokenizer.ggml.") or key.startswith("tokenizer.chat_template")):
            continue
        main = _T(field.types[0])
        if main == _T.ARRAY:
            sub = _T(field.types[-1])
            if len(field.types) != 2:
                raise ExportError(f"{source}: {key} is a nested array, which this writer cannot copy")
            if sub == _T.STRING:
                value = [bytes(field.parts[i]) for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_key_value(key, value, main, sub_type=sub)
            if key == gguf.Keys.Tokenizer.LIST:
                n_tokens = len(value)
        elif main == _T.STRING:
            writer.add_key_value(key, bytes(field.parts[field.data[0]]), main)
        else:
            writer.add_key_value(key, field.contents(), main)
    if n_tokens is None:
        raise ExportError(f"{source} has no tokenizer.ggml.tokens: cannot copy its tokenizer")
    return n_tokens


def build_from_dir(writer: gguf.GGUFWriter, folder: str | Path, vocab_size: int, pre: str | None = None) -> int:
    """Write the tokenizer keys built from ``folder/tokenizer.json``; returns the number of tokens."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"{folder} has no tokenizer.json: the GGUF writer builds its vocabulary from it")
    tok = json.loads(path.read_text(encoding="utf-8"))
    bpe = tok["model"]
    if bpe.get("type") != "BPE":
        raise ExportError(f"{path}: tokenizer model {bpe.get('type')!r} is not supported; supported: BPE "
                         "(SentencePiece byte-fallback -> 'llama', byte-level -> 'gpt2')")
    spm = bool(bpe.get("byte_fallback")) and (tok.get("decoder") or {}).get("type") == "Sequence"
    tokens, types = _vocab(tok, vocab_size, spm)
    w = writer
    if spm:
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(_spm_scores(types))
        w.add_token_types(types)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre or _infer_pre(tok, path))
        w.add_token_list(tokens)
        w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=not spm, n_vocab=len(tokens))
    special.add_to_gguf(w, quiet=True)
    return len(tokens)


def _vocab(tok: dict, vocab_size: int, spm: bool) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp token types (ids the tokenizer lacks become ``[PADi]``, unused)."""
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        by_id.setdefault(i, a["content"])
    size = max(vocab_size, max(by_id) + 1)
    unk = tok["model"].get("unk_token")
    tokens, types = [], []
    for i in range(size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(text)
        types.append(_token_type(text, added.get(i), text in tok["model"]["vocab"], spm, unk))
    return tokens, [int(t) for t in types]


def _token_type(text: str, added: dict | None, in_base: bool, spm: bool, unk: str | None) -> int:
    special = added is not None and (added.get("special") or _looks_special(text))
    if spm:  # llama.cpp's LlamaHfVocab, with SentencePiece's UNKNOWN type for the unk piece
        if text == unk:
            return gguf.TokenType.UNKNOWN
        if _BYTE_TOKEN.fullmatch(text):
            return gguf.TokenType.BYTE
        if special:
            return gguf.TokenType.CONTROL
        return gguf.TokenType.NORMAL if in_base else gguf.TokenType.USER_DEFINED
    if added is not None:  # llama.cpp's get_vocab_base
        return gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
    return gguf.TokenType.NORMAL


def _looks_special(text: str) -> bool:
    # llama.cpp's does_token_look_special, the common cases
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


def _spm_scores(types: list[int]) -> list[float]:
    scores, rank = [], 0
    for t in types:
        if t == gguf.TokenType.NORMAL:
            scores.append(-float(rank))
            rank += 1
        else:
            scores.append(0.0)
    return scores


def _infer_pre(tok: dict, path: Path) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for the byte-level pre-tokenizers we recognise."""
    pt = tok.get("pre_tokenizer") or {}
    parts = pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else [pt]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's regex, no digit splitting
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # SmolLM / StarCoder: single digits, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and (parts[0].get("pattern") or {}).get("Regex") == _LLAMA3_REGEX:
        return "llama-bpe"  # Llama 3
    raise ExportError(f"{path}: cannot tell llama.cpp's pre-tokenizer for pre_tokenizer {json.dumps(pt)[:200]}; "
                     "pass tokenizer_pre= (a tokenizer.ggml.pre name, e.g. 'llama-bpe', 'qwen2', 'gpt-2') "
                     "or set model.source_gguf to copy the tokenizer of an existing GGUF")
