"""dpe-gguf: DPE (Dimension-Wise Positional Embeddings Manipulation) for GGUF models and llama.cpp."""
__version__ = "0.1.0"
