"""`dpe-gguf --version` and other facts about this installation."""
from __future__ import annotations

from dpe_gguf import __version__
from dpe_gguf.llama.native import NativeBuildMissing, build_info


def version_text() -> str:
    """Package version, pinned llama.cpp commit, patch series and whether the build has CUDA."""
    try:
        info = build_info()
    except NativeBuildMissing:
        return f"dpe-gguf {__version__} (no native build: running from a source tree)"
    cuda = f"on ({info['cuda_architectures']})" if info["cuda"] else "off"
    return (f"dpe-gguf {__version__}\n"
            f"llama.cpp {info['upstream_commit']} + patches {info['patch_series']}\n"
            f"CUDA: {cuda}\n"
            f"libraries: {info['lib_dir']}")
