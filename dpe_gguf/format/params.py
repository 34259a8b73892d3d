"""DPE parameters and the divisor table (docs/design.md sections 2, 3 and 5).

The table is ``sigma(l, h, f) = s[g(f)]`` if frequency ``f`` is selected for layer ``l``,
KV head ``h``, else 1, with the group of ``f`` being ``g(f) = floor(f * G / F)``.
In NumPy it has shape ``(n_layer, n_head_kv, F)`` in C order, which is exactly the ggml shape
``[F, n_head_kv, n_layer]`` of the ``rope_dpe.weight`` tensor.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from dpe_gguf.errors import DPEError

# The GGUF contract, docs/design.md section 5.
DPE_VERSION = 1
KEY_VERSION = "dpe.version"
KEY_WINDOW = "dpe.window"
KEY_ORIGINAL_CONTEXT = "dpe.original_context_length"
KEY_TARGET_CONTEXT = "dpe.target_context_length"
KEY_GROUP_SCALES = "dpe.group_scales"
KEY_TOPK = "dpe.topk"
KEY_CALIBRATION = "dpe.calibration"
KEY_PREFIX = "dpe."
TENSOR_NAME = "rope_dpe.weight"

UINT32_MAX = 2**32 - 1


def _as_int(value: object, what: str) -> int:
    """``value`` as a Python int; refuses bools, floats and strings (even '4' or 4.0)."""
    if isinstance(value, bool):
        raise DPEError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # int and NumPy integers only
    except TypeError:
        raise DPEError(f"{what} must be an integer, got {value!r}") from None


@dataclass(frozen=True)
class DPEParams:
    """What the user chooses: window ``w``, one integer divisor per frequency group, and optionally
    the number of key frequencies kept per (layer, KV head), the context the numbers were
    calibrated for and a free-text note on where they came from (stored as ``dpe.calibration``).

    ``topk=None`` means no selection (every frequency is scaled by its group's divisor).
    ``target_context=None`` lets :func:`convert` use :func:`default_target_context`.
    """

    window: int
    group_scales: tuple[int, ...]
    topk: int | None = None
    target_context: int | None = None
    calibration: str | None = None

    def __post_init__(self) -> None:
        window = _as_int(self.window, "window")
        if not 1 <= window <= UINT32_MAX:
            raise DPEError(f"window must be >= 1, got {window}")
        if isinstance(self.group_scales, (str, bytes)) or not hasattr(self.group_scales, "__iter__"):
            raise DPEError(f"group_scales must be a sequence of integers, got {self.group_scales!r}")
        scales = tuple(_as_int(s, "each group scale") for s in self.group_scales)
        if not scales:
            raise DPEError("give at least one group scale (e.g. --scales 4 for uniform divisor 4)")
        for s in scales:
            if not 1 <= s <= UINT32_MAX:
                raise DPEError(f"group scales are position divisors and must be integers >= 1, got {s}")
        topk = None if self.topk is None else _as_int(self.topk, "topk")
        if topk is not None and topk < 1:
            raise DPEError(f"topk must be >= 1, got {topk}")
        target = None if self.target_context is None else _as_int(self.target_context, "target_context")
        if target is not None and not 1 <= target <= UINT32_MAX:
            raise DPEError(f"target_context must be a positive uint32, got {target}")
        if self.calibration is not None and not isinstance(self.calibration, str):
            raise DPEError(f"calibration must be a string, got {self.calibration!r}")
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "group_scales", scales)
        object.__setattr__(self, "topk", topk)
        object.__setattr__(self, "target_context", target)

    @property
    def n_groups(self) -> int:
        """``G``, the number of frequency groups."""
        return len(self.group_scales)

    def check_for_model(self, n_freq: int, context_length: int, where: str = "model") -> None:
        """Raise :class:`DPEError` if these parameters do not fit a model with ``F = n_freq``
        frequencies and training context ``L = context_length``."""
        check_window(self.window, context_length, where)
        if self.n_groups > n_freq:
            raise DPEError(
                f"{self.n_groups} group scales given but {where} has only F = {n_freq} rotary "
                f"frequencies; give between 1 and {n_freq} scales (8 is the usual choice)")
        if self.topk is not None and not 1 <= self.topk <= n_freq:
            raise DPEError(f"topk {self.topk} is outside [1, {n_freq}] (F = n_rot/2 of {where})")
        if self.target_context is not None:
            check_target_context(self.target_context, context_length, where)


# The two rules every entry point (convert, calibrate, detection) applies, in one place.

def check_window(window: int, context_length: int, where: str = "the model") -> None:
    """The window must be below the trained context ``L`` (docs/design.md section 2)."""
    if window >= context_length:
        raise DPEError(
            f"window {window} is not below the trained context {context_length} of {where} (positions closer "
            f"than the window use ordinary RoPE); pick e.g. --window {min(1024, context_length // 4) or 1}")


def check_target_context(target: int, context_length: int, where: str = "the model") -> None:
    """A target context must be above the trained context ``L``: DPE extends the context."""
    if target <= context_length:
        raise DPEError(
            f"target context {target} is not above the trained context {context_length} of {where}: "
            f"nothing to extend; give a target > {context_length}")


def group_of(n_freq: int, n_groups: int) -> np.ndarray:
    """``g(f) = floor(f * G / F)`` for every ``f`` in ``[0, F)`` (int64)."""
    return (np.arange(n_freq, dtype=np.int64) * n_groups) // n_freq


def divisor_table(n_layer: int, n_head_kv: int, n_freq: int, group_scales: tuple[int, ...] | list[int],
                  keep: np.ndarray | None = None) -> np.ndarray:
    """The divisor table ``sigma``, float32 of shape ``(n_layer, n_head_kv, n_freq)``.

    ``keep`` is a boolean mask of that shape (True = frequency selected) or None (all selected).
    """
    scales = np.asarray(group_scales, dtype=np.float32)
    if scales.ndim != 1 or not 1 <= scales.size <= n_freq:
        raise DPEError(f"need between 1 and {n_freq} group scales, got {scales.size}")
    per_freq = scales[group_of(n_freq, scales.size)]
    table = np.broadcast_to(per_freq, (n_layer, n_head_kv, n_freq)).copy()
    if keep is not None:
        keep = np.asarray(keep)
        if keep.shape != table.shape or keep.dtype != np.bool_:
            raise DPEError(f"keep mask must be boolean of shape {table.shape}, got {keep.dtype} {keep.shape}")
        table[~keep] = 1.0
    return np.ascontiguousarray(table, dtype=np.float32)


def topk_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask keeping the ``k`` largest scores along the last axis (per layer and KV head).

    Ties are broken deterministically: the lower frequency index wins.
    """
    scores = np.asarray(scores)
    n_freq = scores.shape[-1]
    if not 1 <= k <= n_freq:
        raise DPEError(f"topk {k} is outside [1, {n_freq}]")
    if not np.all(np.isfinite(scores)):
        raise DPEError("scores contain NaN or infinite values")
    # A stable sort of the negated scores keeps equal scores in ascending f order.
    order = np.argsort(-scores.astype(np.float64), axis=-1, kind="stable")
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, order[..., :k], True, axis=-1)
    return mask


def fold_query_heads(scores: np.ndarray, n_head_kv: int) -> np.ndarray:
    """Fold query-head scores ``(n_layer, n_head, F)`` into KV heads ``(n_layer, n_head_kv, F)`` by
    summing each group of ``n_head / n_head_kv`` consecutive query heads (docs/design.md section 4)."""
    n_layer, n_head, n_freq = scores.shape
    if n_head % n_head_kv:
        raise DPEError(f"cannot fold {n_head} query heads into {n_head_kv} KV heads")
    return scores.reshape(n_layer, n_head_kv, n_head // n_head_kv, n_freq).sum(axis=2)


def default_target_context(context_length: int, window: int, group_scales: tuple[int, ...]) -> int:
    """Longest context whose far query positions stay inside the trained context for the most
    scaled group: the largest ``n`` with ``P_q(n - 1, s) < L`` for ``s = max(s_g)``, i.e.
    ``(L - w + floor(w / s)) * s``. Used when no target context is given."""
    s = max(group_scales)
    return min((context_length - window + window // s) * s, UINT32_MAX)
