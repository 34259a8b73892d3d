"""scikit-build-core dynamic metadata: depend on the llama-cpp-python bindings built without a
compiled library (LLAMA_BUILD=OFF), so ``pip install .`` never compiles a second llama.cpp.
The bindings load dpe-gguf's patched libllama through LLAMA_CPP_LIB_PATH (set by ``import dpe_gguf``).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import upstream  # noqa: E402

BASE_DEPENDENCIES = ["numpy>=1.24", "gguf==0.19.0", "tqdm>=4.60", "matplotlib>=3.7"]


def dynamic_metadata(field: str, settings: dict | None = None) -> list[str]:
    if field != "dependencies":
        raise ValueError(f"dpe-gguf metadata provider only computes dependencies, not {field}")
    try:
        wheel = upstream.bindings_wheel()
    except upstream.BuildError as e:
        raise RuntimeError(f"dpe-gguf build: error: {e}") from None
    return [*BASE_DEPENDENCIES, f"llama-cpp-python @ {wheel.as_uri()}"]
