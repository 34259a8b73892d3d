"""Calibration's settings and the rules they follow: groups, detection tasks, the background divisor, the
default window, and which extensions are allowed (docs/design.md sections 2 and 4)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from dpe_gguf.errors import DPEError
from dpe_gguf.format.params import check_target_context, check_window

CALIBRATION_VERSION = 1
DEFAULT_GROUPS = 8        # G, docs/design.md section 2
DETECTION_TASKS = ("multi_needle", "passkey")   # one answer each, what the log-probability score needs
DEFAULT_TASK = "multi_needle"
DEFAULT_TRIALS = 5        # prompts per task per candidate
QUICK_TRIALS = 2          # the same with --quick
SCORERS = ("logprob", "hits")      # the first is the default
BACKGROUNDS = ("fixed", "uniform")  # the first is the default


@dataclass(frozen=True)
class CalibrationSettings:
    """Every setting of a calibration. None: chosen for the model by :meth:`resolved` (window, topk, ngl, trials).
    :meth:`record` is what the calibration file keeps of them (its "settings", also the score cache's key)."""
    target: int
    window: int | None = None        # the local window (default_window(L))
    topk: int | None = None          # frequencies scaled per KV head (selection.default_topk(F))
    n_groups: int = DEFAULT_GROUPS
    text: Path | None = None         # the selection text (None: the shipped text)
    sel_samples: int = 4             # selection: texts ...
    sel_tokens: int = 2048           # ... of this many tokens (at most L)
    select_frequencies: bool = True  # False: no selection, every frequency scaled
    task: str = DEFAULT_TASK         # a task of DETECTION_TASKS, or several joined by commas
    trials: int | None = None        # prompts per task (DEFAULT_TRIALS, QUICK_TRIALS with quick)
    seed: int = 0
    quick: bool = False              # 3 candidate divisors per group around the background
    scorer: str = SCORERS[0]         # "logprob": mean log-probability of the answer; "hits": greedy answers found
    background: str = BACKGROUNDS[0]  # "fixed": the others hold 2T/L; "uniform": the best uniform divisor, swept first
    ngl: int | None = None           # layers on the GPU (runtime.default_ngl(): all with CUDA)
    flash_attn: bool = True
    threads: int | None = None
    parallel: int = 1                # candidate tables measured at once

    def resolved(self, L: int, n_freq: int) -> "CalibrationSettings":
        """The settings with the model's defaults filled in and checked (the window below L, the target above it)."""
        from dpe_gguf.calibration.selection import default_topk
        from dpe_gguf.llama.runtime import default_ngl
        if self.background not in BACKGROUNDS:
            raise DPEError(f"background {self.background!r}: fixed (2T/L) or uniform (the best uniform divisor)")
        if self.scorer not in SCORERS:
            raise DPEError(f"scorer {self.scorer!r}: one of {', '.join(SCORERS)}")
        s = replace(self, window=default_window(L) if self.window is None else self.window,
                    topk=default_topk(n_freq) if self.topk is None else self.topk,
                    ngl=default_ngl() if self.ngl is None else self.ngl,
                    trials=(QUICK_TRIALS if self.quick else DEFAULT_TRIALS) if self.trials is None else self.trials,
                    task=",".join(parse_tasks(self.task)))
        check_extension(s.target, s.window, L)
        return s

    def record(self, given_scores: bool = False) -> dict:
        """The file's "settings" (resolved settings; the run-only ones, ngl, threads and parallel, are left out)."""
        return dict(target=self.target, window=self.window, topk=self.topk, n_groups=self.n_groups,
                    text=str(self.text) if self.text else None, sel_samples=self.sel_samples,
                    sel_tokens=self.sel_tokens, task=self.task, trials=self.trials, seed=self.seed, quick=self.quick,
                    select="given scores" if given_scores else self.select_frequencies, scorer=self.scorer,
                    background=self.background)

    @property
    def tasks(self) -> list[str]:
        return parse_tasks(self.task)

    def candidates(self, L: int, around: int | None = None) -> list[int]:
        """Divisors T/len for len = T, T/2, ... >= w: 1, 2, 4, ..., and in quick mode only the
        three around `around` (default: the background divisor 2T/L)."""
        top = max(1, self.target // self.window)
        cands = [1 << i for i in range(int(math.log2(top)) + 1)]
        if self.quick:
            bg = around or background_divisor(self.target, L)
            cands = [c for c in cands if bg / 2 <= c <= bg * 2] or cands[-1:]
        return cands


def parse_tasks(task: str) -> list[str]:
    """The detection tasks of a comma list ("passkey,multi_needle"), in order, each once."""
    tasks = list(dict.fromkeys(t.strip() for t in str(task).split(",") if t.strip()))
    bad = [t for t in tasks if t not in DETECTION_TASKS]
    if not tasks or bad:
        raise DPEError(f"detection task {task!r}: one or more of {', '.join(DETECTION_TASKS)}, joined by commas")
    return tasks


def background_divisor(target: int, L: int) -> int:
    """2T/L rounded up to a power of two: the divisor the other groups hold during detection."""
    return 1 << max(0, math.ceil(math.log2(2 * target / L)))


def default_window(L: int) -> int:
    """The local window when none is given: 1024, or L/8 for models trained on fewer than 8192 tokens (docs/design.md
    section 2: always below L)."""
    return min(1024, L // 8)


def check_extension(target: int, window: int, L: int) -> None:
    """Refuse a window that is not below the trained context L, or a target that is not above it (the
    rules of dpe_gguf.format.params, which convert applies too)."""
    check_window(window, L)
    check_target_context(target, L)
