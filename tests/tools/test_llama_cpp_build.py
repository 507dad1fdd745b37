"""Where llama.cpp's tools are built for this CPU, and that the build leaves AMX out."""

from __future__ import annotations

import pytest

from qcompiler.core.errors import InputFileError
from qcompiler.tools import llama_cpp
from qcompiler.tools.timing import cpu_fingerprint


def test_the_build_folder_is_this_cpus_and_says_it_has_no_amx(monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_BIN", raising=False)
    folder = llama_cpp.build_dir()
    assert folder.name == f"llama.cpp-{llama_cpp.LLAMA_CPP_VERSION}-{cpu_fingerprint()}-noamx"
    assert llama_cpp.bin_dir() == folder / "src/vendor/llama.cpp/build/bin"
    monkeypatch.setenv("LLAMA_CPP_BIN", "/opt/llama/bin")
    assert str(llama_cpp.bin_dir()) == "/opt/llama/bin"


def test_build_runs_the_script_on_that_folder_with_amx_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CFLAGS", "-O2")
    monkeypatch.delenv("CXXFLAGS", raising=False)
    seen = tmp_path / "seen"
    script = tmp_path / "build-llama-cpp.sh"  # records what the real script would be given, prints a bin folder
    script.write_text(f'printf "%s\\n%s\\n%s\\n" "$1" "$CFLAGS" "$CXXFLAGS" > {seen}\necho "building" >&2\n'
                      'echo "$1/src/vendor/llama.cpp/build/bin"\n')
    bin_folder = llama_cpp.build(script)
    folder, cflags, cxxflags = seen.read_text().splitlines()
    assert folder == str(llama_cpp.build_dir()) and folder.startswith(str(tmp_path))
    assert bin_folder == llama_cpp.build_dir() / "src/vendor/llama.cpp/build/bin"
    assert cflags == f"-O2 {llama_cpp.NO_AMX}" and cxxflags == llama_cpp.NO_AMX
    assert {"-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"} <= set(cflags.split())


def test_a_missing_script_or_tool_is_named(tmp_path):
    with pytest.raises(InputFileError, match="no llama.cpp build script"):
        llama_cpp.build(tmp_path / "nothing.sh")
    (tmp_path / "llama-bench").write_text("")
    (tmp_path / "llama-bench").chmod(0o755)
    with pytest.raises(InputFileError, match="has no llama-quantize"):
        llama_cpp.find_tools(tmp_path)
