"""The `dpe-gguf` command line (placeholder, being written)."""
