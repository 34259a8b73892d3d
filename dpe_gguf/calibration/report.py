"""What calibration tells the user: progress lines, and the per-group table with why each divisor won."""
from __future__ import annotations

import sys

import numpy as np

from dpe_gguf.calibration.result import Calibration
from dpe_gguf.calibration.settings import DEFAULT_TASK, background_divisor, parse_tasks
from dpe_gguf.calibration.stats import best_mean, undominated


def say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def format_detection(cal: Calibration, L: int) -> str:
    """The per-group table (mean scores) and why each divisor won."""
    prior = background_divisor(cal.target, L)
    bg = cal.background or prior
    first = next(iter(cal.detection.values()))
    parts = len(parse_tasks(cal.settings.get("task", DEFAULT_TASK)))
    lines = []
    if cal.uniform:
        means = {c: float(np.mean(v)) for c, v in cal.uniform.items()}
        lines.append("uniform sweep (every group the same divisor: Self-Extend): "
                     + "  ".join(f"d={c} {v:.2f}" for c, v in means.items())
                     + f"  -> background {bg}:" + _why(cal.uniform, prior, "2T/L", parts))
    lines.append(f"{'group':>5}  " + "  ".join(f"{'d=' + c:>6}" for c in first) + "   chosen  why")
    for g, by in cal.detection.items():
        chosen = cal.group_scales[int(g)]
        per = cal.per_prompt.get(g) or {c: [v] for c, v in by.items()}
        lines.append(f"{g:>5}  " + "  ".join(f"{v:>6.2f}" for v in by.values()) + f"   {chosen:>6} "
                     + _why(per, bg, "the background", parts))
    lines.append(f"(other groups held at divisor {bg}" + (" = 2T/L" if bg == prior else " (best uniform)")
                 + " while one group is swept; scores: mean log-probability of the answer, higher is better)")
    return "\n".join(lines)


def _why(per: dict, prior: int, prior_name: str, parts: int = 1) -> str:
    arrays = {c: np.atleast_1d(np.asarray(v, dtype=np.float64)) for c, v in per.items()}
    best = best_mean(arrays)
    keep = undominated(arrays, parts)
    by = " on any task" if parts > 1 and len(arrays[best]) > 1 else ""
    if keep == [best]:
        return f" best mean {arrays[best].mean():.2f}, clearly"
    if len(keep) == 1:
        return f" the only candidate no other measurably beats{by} (best mean: d={best})"
    return (f" best mean {arrays[best].mean():.2f} (d={best}); not measurably beaten{by}: "
            f"{', '.join(f'd={c}' for c in keep)}; the one nearest {prior_name} ({prior}) wins")
