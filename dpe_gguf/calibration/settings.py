"""Calibration's settings and the rules they follow: groups, detection tasks, the background divisor, the
default window, and which extensions are allowed (docs/design.md sections 2 and 4)."""
from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass
class DetectSettings:
    target: int
    window: int
    n_groups: int = DEFAULT_GROUPS
    task: str = DEFAULT_TASK    # a task of DETECTION_TASKS, or several joined by commas
    trials: int = DEFAULT_TRIALS  # prompts per task
    seed: int = 0
    quick: bool = False
    ngl: int = 0
    flash_attn: bool = True
    threads: int | None = None
    scorer: str = SCORERS[0]    # "logprob": mean log-probability of the answer; "hits": greedy answers found
    parallel: int = 1           # candidate tables measured at once
    background: str = BACKGROUNDS[0]  # "fixed": the others hold 2T/L; "uniform": the best uniform divisor, swept first

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
