"""Automatic DPE calibration (docs/design.md section 4): key-frequency selection and per-group effective
lengths, both measured through the patched llama.cpp.

1. Selection: :func:`dpe_gguf.calibration.selection.key_scores` on ordinary text (the shipped haystack or
   ``--text``); the top-k frequencies per (layer, KV head) get divisors, the others keep 1.
2. Detection: for the target length T, every group but the one under test is held at a background
   divisor, 2T/L (docs/design.md section 4) or, with ``background="uniform"``, the best uniform divisor found by a
   first sweep of uniform (Self-Extend) tables; the group under test sweeps divisors 1, 2, 4, ... up
   to T/w (lengths T, T/2, ... down to the window); each candidate table is scored on the same
   retrieval prompts at length T (multi-needle by default, or several tasks' prompts together),
   by the answer's teacher-forced log-probability or greedy hits. The prompts are the tasks of
   :mod:`dpe_gguf.evaluation.tasks` drawn from their own "calibration" stream: never the evaluation's.
   The best divisor per group wins: one candidate beats another when it is better by more than the
   prompts' noise (paired per-prompt differences over two standard errors) on some task's prompts
   and not measurably worse on any; among the candidates no other beats, the one nearest the
   background wins. A group is moved off the background only where the measurement says so, and a
   gain on one task bought with a loss on another does not move it.

Every candidate table's per-prompt scores are cached in a JSON file keyed by the model's sha256 and
the settings, so an interrupted run resumes, a finished one is reused, and a table measured twice
(every group's sweep contains the background table) runs once. ``calibrate`` returns (and writes) a
:class:`Calibration` that ``dpe-gguf convert --from-calibration FILE`` turns into a DPE GGUF.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from dpe_gguf.calibration.cache import ScoreCache, cache_root, file_sha256
from dpe_gguf.calibration.report import say
from dpe_gguf.calibration.result import Calibration
from dpe_gguf.calibration.settings import CalibrationSettings
from dpe_gguf.calibration.sweep import detect, select
from dpe_gguf.format.model_info import read_model_info
from dpe_gguf.format.params import topk_mask


def calibrate(model: str | Path, target: int, *, scales: tuple[int, ...] | None = None, scores: Any = None,
              quiet: bool = False, **options: Any) -> Calibration:
    """Run selection and detection for `model` at the target context `target`: detection is skipped when
    `scales` are given, selection when `scores` are (an array or .npy file, as `convert --scores` takes).
    `options` are the other fields of :class:`CalibrationSettings` (window, topk, task, trials, ...)."""
    model = Path(model)
    info = read_model_info(model)
    L = info.context_length
    s = CalibrationSettings(target=target, **options).resolved(L, info.n_freq)
    t0 = time.time()
    sha = file_sha256(model)
    given = None
    if scores is not None:
        from dpe_gguf.format.convert import load_scores
        scores = load_scores(scores, info)     # folded, checked against the model
        given = hashlib.sha256(np.ascontiguousarray(scores, dtype=np.float64).tobytes()).hexdigest()
    settings = s.record(given_scores=scores is not None)
    # measurements are keyed by candidate table inside the file, so quick and full runs, and either
    # background, share one cache ("cache": 3 since the prompts come from the calibration stream)
    shared = {k: v for k, v in settings.items() if k not in ("quick", "background")}
    tag = hashlib.sha256(json.dumps({**shared, "sha": sha, "scores": given, "cache": 3},
                                    sort_keys=True).encode()).hexdigest()[:16]
    cache = ScoreCache(cache_root() / f"{sha[:16]}-{tag}.json")
    say(f"calibration cache: {cache.path}", quiet)

    keep = None
    if scores is not None:
        keep = topk_mask(scores, s.topk)
    elif s.select_frequencies:
        cached = cache.get("selection")
        if cached is None:
            scores = select(model, s.text, s.sel_samples, min(s.sel_tokens, L), s.seed, s.ngl, quiet)
            cache.put("selection", scores.tolist())
        else:
            scores = np.asarray(cached, dtype=np.float64)
        keep = topk_mask(scores, s.topk)
    if scales is None:
        d = detect(model, keep, s, cache, quiet)
        scales, found = d.scales, dict(detection=d.means(), background=d.background,
                                       uniform={str(c): v for c, v in d.uniform.items()},
                                       per_prompt={str(g): {str(c): v for c, v in by.items()}
                                                   for g, by in d.groups.items()})
    else:
        found = {}
    return Calibration(model_sha256=sha, target=target, window=s.window, topk=s.topk, group_scales=tuple(scales),
                       scores=None if scores is None else scores.tolist(), settings=settings,
                       seconds=round(time.time() - t0, 1), **found)
