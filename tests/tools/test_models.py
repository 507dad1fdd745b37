"""Loading models: BOS follows each model's own convention (issue 14, item 6), and a GGUF file that can
not be read is an error naming the file (item 9)."""

import gguf
import pytest
import torch

from qcompiler.core.errors import InputFileError
from qcompiler.tools import cli, models


def _metadata_only_gguf(path, **fields):
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        else:
            writer.add_string(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_bos_follows_its_metadata_then_llama_cpps_default(tmp_path):
    cases = [
        ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.add_bos_token": True}, True),
        ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.add_bos_token": False}, False),
        ({"tokenizer.ggml.model": "llama"}, True),  # SentencePiece vocabulary, key absent: llama.cpp adds BOS
        ({"tokenizer.ggml.model": "gpt2"}, False),  # BPE, key absent: it does not
    ]
    for i, (fields, adds) in enumerate(cases):
        assert models.gguf_adds_bos(_metadata_only_gguf(tmp_path / f"{i}.gguf", **fields)) is adds, fields
    assert models.gguf_adds_bos(models.data_dir() / "models" / "stories260K.gguf") is True
    assert models.gguf_adds_bos(models.gguf_path("smollm2-135m")) is False  # its add_bos_token is false


def test_a_folder_whose_tokenizer_adds_bos_is_scored_with_bos(capsys, tmp_path):
    folder = models.data_dir() / "models" / "stories260K-hf"
    loaded = models.load_model(str(folder))  # by path, not by alias: the tokenizer decides
    assert loaded.add_bos and models.tokenizer_adds_bos(loaded.tokenizer)
    assert not models.tokenizer_adds_bos(type("NoBos", (), {"bos_token_id": None})())
    assert cli.main(["eval", "--model", str(folder), "--recipe", "w8a8-dynamic", "--tokens", "128", "--window", "64",
                     "--no-speed"]) == 0
    assert "each with BOS prepended" in capsys.readouterr().out


def _whole_gguf(path):
    """stories260K's float weights with a small byte-level BPE vocabulary (which transformers' converter
    reads), written by our GGUF writer: a file that loads when whole."""
    import json

    from safetensors.torch import load_file

    from qcompiler.tools.export import gguf as gguf_writer
    from qcompiler.tools.export.model import ExportModel

    folder = models.data_dir() / "models" / "stories260K-hf"
    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "Ġ": 3, "ab": 4, "Ġa": 5}
    tok = path.parent / "tokenizer"
    tok.mkdir()
    (tok / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": vocab, "merges": [["a", "b"], ["Ġ", "a"]], "byte_fallback": False},
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "special": True}],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        "decoder": {"type": "ByteLevel"}}))
    (tok / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "add_bos_token": False}))
    model = ExportModel(json.loads((folder / "config.json").read_text()), load_file(folder / "model.safetensors"),
                        {}, tokenizer_dir=tok, tied_embeddings=True)
    return gguf_writer.write_gguf(model, path, "Q8_0", embedding_type="F32", float_type="F32")


def test_gguf_files_that_can_not_be_read_are_named(tmp_path, capsys):
    whole = _whole_gguf(tmp_path / "whole.gguf")
    loaded = models.load_model(str(whole))  # whole, it loads
    assert loaded.model.config.vocab_size == 512 and not loaded.add_bos
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # the header whole, tensors cut
    header_cut = tmp_path / "header-cut.gguf"
    header_cut.write_bytes(whole.read_bytes()[:200])
    unreadable_vocab = models.data_dir() / "models" / "stories260K.gguf"  # transformers' converter fails on it
    for path, words in [(fake, "is not a GGUF file"), (truncated, "can not be read as a GGUF file"),
                        (header_cut, "can not be read as a GGUF file"),
                        (unreadable_vocab, "its tokenizer can not be read")]:
        with pytest.raises(InputFileError, match=words) as info:
            models.load_model(str(path))
        assert str(path) in str(info.value)
        assert cli.main(["eval", "--model", str(path), "--no-speed"]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers' own log lines come first)
        assert last.startswith(f"qcompiler: {path}") and words in last, last
        if path in (truncated, header_cut):
            assert "truncated or damaged" in last


def test_a_gguf_load_parses_the_file_once_and_loads_what_separate_parses_load(tmp_path, monkeypatch):
    # transformers' tokenizer, config and weights each construct a GGUFReader, and gguf_adds_bos a fourth; the
    # load shares one (and one tensor-name map per architecture), then puts gguf's own functions back
    whole = _whole_gguf(tmp_path / "whole.gguf")
    original_reader, original_map = gguf.GGUFReader, gguf.get_tensor_name_map
    parsed = []

    def counting_reader(path, mode="r"):
        parsed.append(path)
        return original_reader(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", counting_reader)
    shared = models.load_model(str(whole))
    assert len(parsed) == 1 and gguf.GGUFReader is counting_reader and gguf.get_tensor_name_map is original_map
    separate = models._load_gguf_parts(whole, "whole", torch.float32)  # each part parses for itself
    assert len(parsed) >= 4
    assert shared.add_bos == separate.add_bos
    assert shared.tokenizer("ab a")["input_ids"] == separate.tokenizer("ab a")["input_ids"]
    mine, theirs = shared.model.state_dict(), separate.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(InputFileError):
        models.load_model(str(truncated))
    assert gguf.GGUFReader is counting_reader and gguf.get_tensor_name_map is original_map
    monkeypatch.undo()
    assert gguf.GGUFReader is original_reader
