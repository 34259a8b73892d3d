"""Entry points that put the patched llama.cpp programs on PATH (`llama-cli`, ...).

Each replaces the Python process with the real program from dpe_gguf/bin, so signals, exit codes
and standard streams behave exactly as with the upstream binaries.
"""
from __future__ import annotations

import os
import sys

from dpe_gguf.llama.native import NativeBuildMissing, tool_path


def _exec(name: str) -> None:
    try:
        path = tool_path(name)
    except NativeBuildMissing as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    os.execv(path, [name, *sys.argv[1:]])


def llama_cli() -> None:
    _exec("llama-cli")


def llama_completion() -> None:
    _exec("llama-completion")


def llama_server() -> None:
    _exec("llama-server")


def llama_bench() -> None:
    _exec("llama-bench")


def llama_perplexity() -> None:
    _exec("llama-perplexity")
