"""The decision rule: which candidate divisors no other measurably beats, and which of them wins (paired
per-prompt differences over two standard errors, each task apart)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def as_good(best: list[float], other: list[float], z: float = 2.0) -> bool:
    """True when `other` is not measurably worse than `best`: scores on the same prompts, so the
    per-prompt differences are paired; their mean must exceed `z` standard errors to count. With one
    prompt only an exact tie counts."""
    d = np.asarray(best, dtype=np.float64) - np.asarray(other, dtype=np.float64)
    m = float(d.mean())
    if m <= 0:
        return True
    if len(d) < 2:
        return False
    return m <= z * float(d.std(ddof=1)) / math.sqrt(len(d))


def _task_slices(n: int, parts: int) -> list[slice]:
    """The prompts of each of `parts` tasks among a candidate's n scores (each task's run in turn)."""
    if parts < 1 or n % parts:
        raise ValueError(f"{n} scores do not split into {parts} tasks")
    k = n // parts
    return [slice(i * k, (i + 1) * k) for i in range(parts)]


def best_mean(per: dict) -> Any:
    return max(per, key=lambda c: (per[c].mean(), -int(c)))


def undominated(scores: dict, parts: int = 1) -> list:
    """The candidates no other candidate measurably beats. One beats another when it is better by more
    than the prompts' noise (paired differences over two standard errors, :func:`as_good`) on the
    prompts of some task and not measurably worse on those of any. Tasks are tested apart: pooled, the
    noisier task's spread would hide a clear difference on the other (and a gain on one task could
    hide a loss on the other). With one task: the candidates not measurably worse than any other."""
    per = {c: np.atleast_1d(np.asarray(v, dtype=np.float64)) for c, v in scores.items()}
    parts = parts if len(next(iter(per.values()))) > 1 else 1    # one number per candidate: a mean
    sls = _task_slices(len(next(iter(per.values()))), parts)

    def better(a, b, x: slice) -> bool:           # b measurably worse than a on the prompts x
        return not as_good(per[a][x], per[b][x])

    def beats(a, b) -> bool:
        return any(better(a, b, x) for x in sls) and not any(better(b, a, x) for x in sls)

    keep = [c for c in per if not any(beats(o, c) for o in per if o != c)]
    return keep or [best_mean(per)]     # noise can make a cycle of "beats": then the best mean


def pick(scores: dict[int, Any], background: int, parts: int = 1) -> int:
    """The best divisor: among the candidates (scores: a list per prompt, `parts` tasks' prompts in
    turn, or one number) that no other measurably beats (:func:`undominated`), the one nearest the
    background divisor (in log2), then the smaller. A sweep that cannot tell candidates apart keeps
    the background."""
    return min(undominated(scores, parts), key=lambda c: (abs(math.log2(c) - math.log2(background)), c))
