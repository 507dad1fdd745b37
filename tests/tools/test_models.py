"""Loading models: BOS follows each model's own convention (issue 14, item 6), and a GGUF file that can
not be read is an error naming the file (item 9)."""

import gguf
import pytest

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


def test_gguf_files_that_can_not_be_read_are_named(tmp_path, capsys):
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes((models.data_dir() / "models" / "stories260K.gguf").read_bytes()[:60_000])
    unreadable_vocab = models.data_dir() / "models" / "stories260K.gguf"  # transformers' converter fails on it
    for path, words in [(fake, "is not a GGUF file"), (truncated, "can not be read"),
                        (unreadable_vocab, "its tokenizer can not be read")]:
        with pytest.raises(InputFileError, match=words) as info:
            models.load_model(str(path))
        assert str(path) in str(info.value)
        assert cli.main(["eval", "--model", str(path), "--no-speed"]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers' own log lines come first)
        assert last.startswith("qcompiler: ") and str(path) in last
