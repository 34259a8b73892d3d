"""Where dpe-gguf keeps files between runs (calibration scores, the demo's converted model, the
evaluation suite's Self-Extend copies): ``DPE_GGUF_CACHE`` if set, else ``$XDG_CACHE_HOME/dpe-gguf``,
else ``~/.cache/dpe-gguf``. The build finds its own cache by the same rule (build_support/upstream.py,
which runs before this package is installed and so cannot import it)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root(*parts: str) -> Path:
    """The cache folder, or a folder below it (not created here)."""
    base = os.environ.get("DPE_GGUF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dpe-gguf")
    return Path(base).joinpath(*parts)
