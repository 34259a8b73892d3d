"""The parity harness: reference logits for a prompt, and a comparison of two logit arrays.

    logits = reference_logits("model.gguf", token_ids, table, window)   # (n_tokens, n_vocab)
    logits = reference_logits("model-dpe.gguf", token_ids)              # table and w from the file
    report = compare_logits(logits, engine_logits)
    print(report)                 # max |diff|, argmax agreement, KL, worst position
    assert report.max_abs_diff < 1e-3 and report.argmax_agreement == 1.0

Needs torch and gguf (the `reference` extra).
"""
from __future__ import annotations

from dataclasses import dataclass
from os import PathLike

import numpy as np


def reference_logits(model, tokens, table=None, window: int | None = None, *,
                     dtype=None, chunk: int | None = None) -> np.ndarray:
    """Logits of the DPE reference at every position of `tokens`: (n_tokens, n_vocab) numpy array
    in the computation's dtype (float32 by default, float64 with dtype=torch.float64).

    model: a GGUF path, or a `dpe_gguf.reference.model.ReferenceModel` already loaded.
    table, window: the divisor table (n_layer, n_head_kv, n_rot/2) and w. Leave both out to read
    `rope_dpe.weight` and `dpe.window` from a DPE GGUF; for the unmodified model pass
    `table=np.ones(...)` (any window).
    dtype: torch dtype of the computation (float32 by default).
    chunk: feed the prompt this many tokens at a time through the cache (same logits, less memory).
    """
    import torch

    from dpe_gguf.reference import model as reference

    if (table is None) != (window is None):
        raise ValueError("pass both table and window, or neither (to read them from a DPE GGUF)")
    if isinstance(model, (str, PathLike)):
        if table is None:
            table, window = _read_dpe_gguf(model)
        model = reference.load_model(model, dtype or torch.float32)
    elif table is None:
        table, window = _read_dpe_gguf(model.path)
    if dtype is not None and dtype != model.dtype:
        raise ValueError(f"model was loaded in {model.dtype}; load it in {dtype} or leave dtype out")
    ids = model.check_tokens(tokens)
    with torch.no_grad():
        if chunk is None:
            logits = model.forward(ids, table, window)
        else:
            cache = reference.Cache()
            logits = torch.cat([model.forward(ids[s:s + chunk], table, window, cache)
                                for s in range(0, len(ids), chunk)])
    return logits.numpy()


def _read_dpe_gguf(path) -> tuple[np.ndarray, int]:
    """(rope_dpe.weight as (n_layer, n_head_kv, F) float32, dpe.window) of a DPE GGUF file."""
    from dpe_gguf.format.model_info import read_dpe

    found = read_dpe(path)
    if found is None:
        raise ValueError(f"{path} is not a DPE GGUF (no dpe.window / rope_dpe.weight): pass the "
                         f"divisor table and window, or convert it with `dpe-gguf convert`")
    params, table = found
    return table, params.window


@dataclass
class ParityReport:
    """How far `actual` logits are from `expected` ones; per-position arrays plus summaries."""
    abs_diff: np.ndarray          # (n,) max |expected - actual| per position
    argmax_match: np.ndarray      # (n,) bool, same top token
    kl: np.ndarray                # (n,) KL(softmax(expected) || softmax(actual)), nats

    @property
    def n_positions(self) -> int:
        return len(self.abs_diff)

    @property
    def max_abs_diff(self) -> float:
        return float(self.abs_diff.max())

    @property
    def argmax_agreement(self) -> float:
        return float(self.argmax_match.mean())

    @property
    def mean_kl(self) -> float:
        return float(self.kl.mean())

    @property
    def max_kl(self) -> float:
        return float(self.kl.max())

    @property
    def worst_position(self) -> int:
        return int(self.abs_diff.argmax())

    def __str__(self) -> str:
        rows = [("positions", f"{self.n_positions}"),
                ("max |diff|", f"{self.max_abs_diff:.3e}  (position {self.worst_position})"),
                ("argmax agreement", f"{self.argmax_agreement:.4f}  "
                                     f"({int(self.argmax_match.sum())}/{self.n_positions})"),
                ("KL mean / max", f"{self.mean_kl:.3e} / {self.max_kl:.3e} nats")]
        return "\n".join(f"{k:<18} {v}" for k, v in rows)


def compare_logits(expected, actual) -> ParityReport:
    """Compare two logit arrays of the same shape (n_positions, n_vocab); float64 arithmetic."""
    a = np.asarray(expected, dtype=np.float64)
    b = np.asarray(actual, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"logit arrays must both be (n_positions, n_vocab); got {a.shape} and {b.shape}")
    log_p = a - _logsumexp(a)
    log_q = b - _logsumexp(b)
    kl = np.maximum((np.exp(log_p) * (log_p - log_q)).sum(-1), 0.0)
    return ParityReport(abs_diff=np.abs(a - b).max(-1), argmax_match=a.argmax(-1) == b.argmax(-1), kl=kl)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))
