"""Every way dpe-gguf runs its patched llama.cpp: where the build lives and what it was built with
(``native``, ``info``), one model and context in process through llama-cpp-python (``session``), llama-server
and llama-perplexity as subprocesses and the shared run settings (``runtime``), and the ``llama-*`` entry points
(``tools``)."""
