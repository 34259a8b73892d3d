"""The natural text shipped with the package (dpe_gguf/data/haystack.txt): the haystack of the
evaluation's needle tasks and the ordinary text that key-frequency selection and calibration read.
One place for it, so that evaluation (:mod:`dpe_gguf.evaluation.tasks`) and calibration
(:mod:`dpe_gguf.calibration.selection`) read the same text without one importing the other."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path


def load_haystack(path: str | Path | None = None) -> str:
    """The shipped haystack text (``path=None``), or the text of the user's file."""
    if path is None:
        return _shipped_haystack()
    text = Path(path).read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"haystack file {path} has no text")
    return text


@lru_cache(maxsize=1)
def _shipped_haystack() -> str:
    return resources.files(__package__).joinpath("data").joinpath("haystack.txt").read_text(encoding="utf-8")
