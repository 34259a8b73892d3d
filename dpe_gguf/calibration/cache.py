"""Candidate scores on disk: one JSON file per model (sha256) and settings, so an interrupted calibration
resumes and a table measured twice runs once."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dpe_gguf import paths
from dpe_gguf.format.gguf_stream import write_atomic


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    return paths.cache_root("calibration")


class ScoreCache:
    """Candidate scores on disk (JSON, rewritten atomically after each candidate)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(self.data, indent=1).encode(),
                     remedy="set DPE_GGUF_CACHE to a writable folder")


def table_key(scales: tuple[int, ...]) -> str:
    return "t" + ",".join(map(str, scales))
