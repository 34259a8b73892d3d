"""dpe-gguf: DPE (Dimension-Wise Positional Embeddings Manipulation) for GGUF models and llama.cpp.

Importing dpe_gguf points llama-cpp-python at the patched libllama (LLAMA_CPP_LIB_PATH), so
`import dpe_gguf` before `import llama_cpp` is all an application needs.
"""
from dpe_gguf.llama.native import setup_llama_cpp as _setup_llama_cpp

__version__ = "0.1.0"

_setup_llama_cpp()

from dpe_gguf.format.convert import convert, inspect, strip  # noqa: E402
from dpe_gguf.errors import DPEError  # noqa: E402
from dpe_gguf.format.model_info import ModelInfo, read_dpe, read_model_info  # noqa: E402
from dpe_gguf.format.params import DPEParams, divisor_table, topk_mask  # noqa: E402

__all__ = ["DPEError", "DPEParams", "ModelInfo", "convert", "divisor_table", "inspect", "read_dpe",
           "read_model_info", "strip", "topk_mask"]
