"""The PyTorch reference of docs/design.md section 3 on a GGUF's own weights (``model``), and engine logits
compared against it (``parity``)."""
