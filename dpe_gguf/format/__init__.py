"""The GGUF contract (docs/design.md section 5): the ``dpe.*`` keys and the divisor table (``params``), reading
a model's facts and its DPE parameters (``model_info``), the GGUF header and the byte-for-byte tensor copy
(``gguf_header``, ``gguf_stream``), and the verbs that write and read DPE files (``convert``: convert, inspect,
strip). Nothing here runs llama.cpp."""
