"""llama.cpp's CPU tools for this machine: where they are built and how.

``python -m qcompiler.tools.llama_cpp`` builds them with ``../shared/tools/build-llama-cpp.sh`` (the source
llama-cpp-python's sdist vendors, about 5 minutes on 2 cores) and prints their bin folder; a finished build is
reused. The build is native (``GGML_NATIVE``): one folder per CPU (:func:`~qcompiler.tools.timing.
cpu_fingerprint`), since a build from another CPU can die of SIGILL.

AMX is left out (``-mno-amx-*``): on the Sapphire Rapids VMs this project runs on (2 vCPUs, KVM), ggml's AMX
matrix multiply dies in its first ``ldtilecfg`` (SIGSEGV in ``llama-perplexity``, SIGILL in CI), so a native
build that includes it cannot run a model at all. Without AMX ggml takes its AVX512-VNNI kernels there; on CPUs
without AMX the flags change nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from qcompiler.core.errors import InputFileError

LLAMA_CPP_VERSION = "0.3.36"  # what ../shared/tools/build-llama-cpp.sh builds
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # with GCC an explicit -mno-* wins over -march=native
SCRIPT = Path(__file__).resolve().parents[3] / "shared" / "tools" / "build-llama-cpp.sh"


def build_dir() -> Path:
    """The folder this CPU's build is kept in (its tools in :func:`bin_dir`)."""
    from qcompiler.tools.timing import cpu_fingerprint

    return Path.home() / ".cache" / f"llama.cpp-{LLAMA_CPP_VERSION}-{cpu_fingerprint()}-noamx"


def bin_dir() -> Path:
    """Where llama.cpp's tools are: ``LLAMA_CPP_BIN`` when set, else this CPU's build folder."""
    given = os.environ.get("LLAMA_CPP_BIN")
    return Path(given) if given else build_dir() / "src" / "vendor" / "llama.cpp" / "build" / "bin"


def build(script: str | Path = SCRIPT) -> Path:
    """Build (or reuse) this CPU's tools with ``script``; return their bin folder."""
    script = Path(script)
    if not script.is_file():
        raise InputFileError(f"no llama.cpp build script at {script}: give the path of shared/tools/"
                             "build-llama-cpp.sh (python -m qcompiler.tools.llama_cpp SCRIPT)")
    # CMake reads CFLAGS/CXXFLAGS when it first configures a build folder; the folder is this build's alone
    env = {**os.environ, "CFLAGS": f"{os.environ.get('CFLAGS', '')} {NO_AMX}".strip(),
           "CXXFLAGS": f"{os.environ.get('CXXFLAGS', '')} {NO_AMX}".strip()}
    done = subprocess.run(["bash", str(script), str(build_dir())], env=env, check=True, stdout=subprocess.PIPE,
                          text=True)
    return Path(done.stdout.strip().splitlines()[-1])


def find_tools(folder: str | Path, names=("llama-bench", "llama-quantize")) -> dict[str, Path]:
    """The named tools in llama.cpp's bin ``folder``; a clear error naming what is missing."""
    folder = Path(folder)
    tools = {name: folder / name for name in names}
    missing = [name for name, path in tools.items() if not (path.is_file() and os.access(path, os.X_OK))]
    if missing:
        raise InputFileError(f"{folder} has no {' or '.join(missing)}: give llama.cpp's bin folder "
                             "(python -m qcompiler.tools.llama_cpp builds it and prints where it is)")
    return tools


if __name__ == "__main__":
    print(build(*sys.argv[1:2]))
