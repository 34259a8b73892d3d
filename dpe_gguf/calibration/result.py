"""What calibration measured: the sweeps' per-prompt scores (:class:`Detection`) and the calibration file
that ``dpe-gguf convert --from-calibration`` reads (:class:`Calibration`, JSON)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dpe_gguf.calibration.settings import CALIBRATION_VERSION
from dpe_gguf.errors import DPEError
from dpe_gguf.format.gguf_stream import write_atomic
from dpe_gguf.format.params import DPEParams


@dataclass
class Calibration:
    """What calibration measured, in a form `convert` accepts (JSON)."""
    model_sha256: str
    target: int
    window: int
    topk: int
    group_scales: tuple[int, ...]
    scores: list | None               # (n_layer, n_head_kv, F) selection scores, None without selection
    detection: dict = field(default_factory=dict)   # group -> {divisor: mean score}
    settings: dict = field(default_factory=dict)
    background: int = 0                             # divisor the other groups held (0: no detection)
    uniform: dict = field(default_factory=dict)     # divisor -> per-prompt scores of the uniform sweep
    per_prompt: dict = field(default_factory=dict)  # group -> {divisor: per-prompt scores}
    seconds: float = 0.0
    version: int = CALIBRATION_VERSION

    def params(self) -> DPEParams:
        note = (f"dpe-gguf calibrate v{self.version}: selection top-{self.topk} on "
                f"{self.settings.get('text') or 'the shipped text'} ({self.settings.get('sel_samples')} x "
                f"{self.settings.get('sel_tokens')} tokens); detection {self.settings.get('task')} at "
                f"{self.target} tokens, {self.settings.get('trials')} trials"
                f"{' per task' if ',' in str(self.settings.get('task')) else ''}, seed {self.settings.get('seed')}"
                f"{', quick' if self.settings.get('quick') else ''}"
                + (f", others held at {self.background}"
                   + (" (best uniform)" if self.settings.get("background") == "uniform" else " (2T/L)")
                   if self.background else ""))
        return DPEParams(window=self.window, group_scales=tuple(self.group_scales),
                         topk=self.topk if self.scores is not None else None,
                         target_context=self.target, calibration=note)

    def score_array(self) -> np.ndarray | None:
        return None if self.scores is None else np.asarray(self.scores, dtype=np.float64)

    def save(self, path: Path) -> Path:
        return write_atomic(Path(path), json.dumps(asdict(self), indent=1).encode())

    @classmethod
    def load(cls, path: Path) -> "Calibration":
        try:
            d = json.loads(Path(path).read_text())
            if d.get("version") != CALIBRATION_VERSION:
                raise DPEError(f"{path}: calibration file version {d.get('version')} (this dpe-gguf reads "
                               f"{CALIBRATION_VERSION})")
            d["group_scales"] = tuple(d["group_scales"])
            return cls(**d)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise DPEError(f"{path}: not a calibration file of `dpe-gguf calibrate` ({e})") from None


@dataclass
class Detection:
    """What the sweeps measured: per-sample scores of every candidate (same prompts for all)."""
    scales: tuple[int, ...]
    background: int                          # the divisor the other groups held
    uniform: dict[int, list[float]]          # divisor -> scores (empty unless background "uniform")
    groups: dict[int, dict[int, list[float]]]  # group -> divisor -> scores

    def means(self) -> dict:
        return {str(g): {str(c): float(np.mean(v)) for c, v in by.items()} for g, by in self.groups.items()}
