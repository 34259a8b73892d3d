"""Where dpe-gguf's patched llama.cpp lives, and what it was built with."""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent   # dpe_gguf/: the build installs bin/, lib/ and _native there
LIB_DIR = PACKAGE_DIR / "lib"
BIN_DIR = PACKAGE_DIR / "bin"
TOOLS = ("llama-cli", "llama-completion", "llama-server", "llama-bench", "llama-perplexity")


class NativeBuildMissing(RuntimeError):
    """dpe_gguf runs from a source tree without its native build."""


def build_info() -> dict:
    """Facts about the native build: version, upstream commit, patch series, CUDA on or off."""
    try:
        from dpe_gguf import _native
    except ImportError as e:
        raise NativeBuildMissing(
            "dpe_gguf's native build is missing (dpe_gguf._native not found): install the package "
            "with `pip install .` instead of running it from the source tree") from e
    return dict(_native.BUILD_INFO, lib_dir=str(LIB_DIR), bin_dir=str(BIN_DIR))


def libllama_path() -> Path:
    return LIB_DIR / ("libllama.dylib" if sys.platform == "darwin" else "libllama.so")


def tool_path(name: str) -> Path:
    if name not in TOOLS:
        raise ValueError(f"unknown tool {name!r}; dpe-gguf ships {', '.join(TOOLS)}")
    path = BIN_DIR / name
    if not path.exists():
        raise NativeBuildMissing(f"{path} is missing: reinstall dpe-gguf (`pip install .`)")
    return path


def loaded_libllama_paths() -> list[str]:
    """Paths of every libllama mapped into this process (Linux: /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libllama" in line and "/" in line}
    except OSError:
        return []
    return sorted(paths)


def setup_llama_cpp() -> None:
    """Make `import llama_cpp` load the patched libllama; refuse if a stock one is already loaded."""
    if not LIB_DIR.is_dir():
        return  # source tree without a native build: nothing to point at
    ours = os.path.realpath(libllama_path())
    others = [p for p in loaded_libllama_paths() if os.path.realpath(p) != ours]
    if others:
        raise ImportError(
            f"a libllama other than dpe-gguf's is already loaded in this process ({others[0]}); "
            "DPE models need dpe-gguf's patched library. Import dpe_gguf before llama_cpp, "
            f"or start Python with LLAMA_CPP_LIB_PATH={LIB_DIR}")
    current = os.environ.get("LLAMA_CPP_LIB_PATH")
    if current and os.path.realpath(current) != os.path.realpath(LIB_DIR):
        raise ImportError(
            f"LLAMA_CPP_LIB_PATH={current} points at another llama.cpp build; dpe-gguf needs "
            f"{LIB_DIR}. Unset it or set it to that folder.")
    os.environ["LLAMA_CPP_LIB_PATH"] = str(LIB_DIR)
    _preload_libstdcxx()


def _preload_libstdcxx() -> None:
    """Put the system C++ runtime first in the process's global symbol scope (Linux).

    A CUDA build's libggml-cuda.so exports ~1,400 std:: symbols of its own (CUDA 13's static
    libraries bring a copy). llama.cpp's programs need libstdc++ directly, so the dynamic linker
    finds the system copy first; python does not, so when llama_cpp loads the libraries with ctypes
    libllama's std::regex resolves into libggml-cuda's copy and crashes while loading any
    vocabulary (seen on the H100 machine: SIGSEGV after init_tokenizer). Loading libstdc++ with
    RTLD_GLOBAL first restores the programs' order. Harmless where the library is already loaded.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    try:
        ctypes.CDLL("libstdc++.so.6", mode=getattr(os, "RTLD_GLOBAL", 0x100))
    except OSError:
        pass  # no system libstdc++ (static toolchains): nothing to put first
