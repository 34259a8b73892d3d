"""A plain PyTorch reference of DPE (docs/design.md sections 1-3) on the weights of a GGUF file.

This is the yardstick the llama.cpp engine is judged by, so it is written to be read: one
function per concept of docs/design.md, in its order and names (section numbers in brackets).

    rope_theta            theta_f, the model's own angle rate of frequency f         (design 1)
    frequency_pairs       which two dimensions frequency f rotates (NORMAL / NEOX)   (design 1)
    divisor_table         sigma(l, h, f) from the group divisors s_g                  (design 2)
    dpe_key_positions     P_k(j, s) = floor(j / s)                                    (design 3)
    dpe_query_positions   P_q(i, s) = floor(i / s) + w - floor(w / s)                 (design 3)
    rotate / rope         rotate frequency f of a vector by an angle / by pos * theta_f
    rope_dpe_q/rope_dpe_k rotate frequency f by P_q / P_k times theta_f               (design 3)
    merge_scores          near (r < w) and far (r >= w) scores merged into one matrix (design 3)
    dpe_scores            rotations + merge_scores, from unrotated q and k
    dpe_attention         one softmax over all keys of a query, times V               (design 3)

`load_model` reads a GGUF file (llama, which includes Mistral, and qwen2), dequantizes every
tensor with gguf-py and keeps llama.cpp's own tensor layout: a llama file's Q/K rows stay in
llama.cpp's permuted order, so frequency f rotates dimensions (2f, 2f+1) exactly as in the engine.
`ReferenceModel.forward` runs the transformer with DPE attention, for a whole prompt (prefill) or
a few tokens at a time with a `Cache` (incremental decoding); both give the same logits.

Nothing here is tuned for speed beyond plain batched matmuls; float32 by default, float64 for tests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from os import PathLike

import numpy as np
import torch

NORMAL, NEOX = "normal", "neox"

# llama.cpp's rope type per GGUF architecture (llama_model_rope_type). Mistral models are stored
# with architecture "llama" by llama.cpp's converter.
ROPE_LAYOUT = {"llama": NORMAL, "qwen2": NEOX}
SUPPORTED_ARCHITECTURES = tuple(ROPE_LAYOUT)
# Rope scaling llama.cpp applies to these architectures that the reference reproduces exactly.
# ("linear" is llama.cpp's default type; its factor gives freq_scale = 1 / factor.)
SUPPORTED_ROPE_SCALING = ("none", "linear")


class UnsupportedModelError(ValueError):
    """The GGUF file is a model the DPE reference does not implement (architecture, rope type)."""


# ---------------------------------------------------------------------------------------------
# Spec section 1: the model's own rope, indexed by frequency f
# ---------------------------------------------------------------------------------------------

def rope_theta(n_rot: int, freq_base: float, freq_scale: float = 1.0,
               freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """theta_f = freq_scale * freq_base^(-2f/n_rot) / rope_freqs[f], for f in [0, n_rot/2). float64.

    This is ggml's rope angle rate (ggml_rope_cache_init / rope_yarn without the YaRN ramp).
    """
    f = torch.arange(n_rot // 2, dtype=torch.float64)
    theta = freq_scale * freq_base ** (-2.0 * f / n_rot)
    if freq_factors is not None:
        theta = theta / freq_factors.to(torch.float64)
    return theta


def frequency_pairs(n_rot: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two dimensions frequency f rotates: NORMAL (2f, 2f+1), NEOX (f, f + n_rot/2)."""
    f = torch.arange(n_rot // 2)
    if layout == NORMAL:
        return 2 * f, 2 * f + 1
    if layout == NEOX:
        return f, f + n_rot // 2
    raise ValueError(f"unknown rope layout {layout!r}; expected {NORMAL!r} or {NEOX!r}")


# ---------------------------------------------------------------------------------------------
# Spec section 2: the divisor table
# ---------------------------------------------------------------------------------------------

def divisor_table(group_scales, n_layer: int, n_head_kv: int, n_freq: int,
                  selected: np.ndarray | None = None) -> np.ndarray:
    """sigma(l, h, f) = s_{g(f)} if f in S(l, h) else 1, with g(f) = floor(f * G / F).

    `selected`: optional bool array (n_layer, n_head_kv, F), the key frequencies S(l, h);
    all frequencies when None. Returns float32 (n_layer, n_head_kv, F): the memory layout of
    the GGUF tensor `rope_dpe.weight` (ggml shape [F, n_head_kv, n_layer]).
    """
    s = np.asarray(group_scales, dtype=np.float32)
    g = (np.arange(n_freq) * len(s)) // n_freq
    table = np.broadcast_to(s[g], (n_layer, n_head_kv, n_freq)).copy()
    if selected is not None:
        table = np.where(selected, table, np.float32(1.0)).astype(np.float32)
    return table


# ---------------------------------------------------------------------------------------------
# Spec section 3: DPE positions, rotations, merged attention
# ---------------------------------------------------------------------------------------------

def dpe_key_positions(j: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """P_k(j, s) = floor(j / s). j: (T,) int64, sigma: (H, F) int64 -> (H, T, F) int64."""
    return torch.div(j[:, None], sigma[:, None, :], rounding_mode="floor")


def dpe_query_positions(i: torch.Tensor, sigma: torch.Tensor, window: int) -> torch.Tensor:
    """P_q(i, s) = floor(i / s) + w - floor(w / s). i: (T,), sigma: (H, F) -> (H, T, F)."""
    s = sigma[:, None, :]
    return torch.div(i[:, None], s, rounding_mode="floor") + window - torch.div(window, s, rounding_mode="floor")


def rotate(x: torch.Tensor, angle: torch.Tensor, layout: str) -> torch.Tensor:
    """Rotate frequency f of x by angle[..., f] (radians, float64); dims past n_rot are kept.

    x: (..., T, head_dim); angle broadcastable to (..., T, F) with F = n_rot / 2. The pair of
    frequency f is the one `frequency_pairs` names (taken here as strided views); same sign
    convention as ggml's rope: (a, b) -> (a cos - b sin, a sin + b cos).
    """
    n_freq = angle.shape[-1]
    cos, sin = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
    xr, rest = x[..., :2 * n_freq], x[..., 2 * n_freq:]
    if layout == NORMAL:    # (2f, 2f+1)
        a, b = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    elif layout == NEOX:    # (f, f + F)
        a, b = xr[..., :n_freq], xr[..., n_freq:]
        rotated = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    else:
        raise ValueError(f"unknown rope layout {layout!r}; expected {NORMAL!r} or {NEOX!r}")
    return torch.cat([rotated, rest], dim=-1)


def rope(x: torch.Tensor, pos: torch.Tensor, theta: torch.Tensor, layout: str) -> torch.Tensor:
    """Ordinary RoPE: frequency f of the vector at position p is rotated by p * theta_f."""
    return rotate(x, pos.to(torch.float64)[:, None] * theta, layout)


def rope_dpe_q(q: torch.Tensor, i: torch.Tensor, sigma: torch.Tensor, window: int,
               theta: torch.Tensor, layout: str) -> torch.Tensor:
    """Far-query rotation: frequency f of query head h at i rotated by P_q(i, sigma[h, f]) * theta_f.

    q: (H, T, D); sigma: (H, F), one row per query head (its KV head's row).
    """
    return rotate(q, dpe_query_positions(i, sigma, window).to(torch.float64) * theta, layout)


def rope_dpe_k(k: torch.Tensor, j: torch.Tensor, sigma: torch.Tensor,
               theta: torch.Tensor, layout: str) -> torch.Tensor:
    """Far-key rotation: frequency f of KV head h at j rotated by P_k(j, sigma[h, f]) * theta_f."""
    return rotate(k, dpe_key_positions(j, sigma).to(torch.float64) * theta, layout)


def merge_scores(q_near: torch.Tensor, q_far: torch.Tensor, k_near: torch.Tensor, k_far: torch.Tensor,
                 q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """One score matrix from rotated vectors: q_near . k_near where r = i - j < w, q_far . k_far
    where r >= w; scaled by 1/sqrt(head_dim), -inf where j > i. Keys already expanded to query heads."""
    near = q_near @ k_near.mT
    far = q_far @ k_far.mT
    r = q_pos[:, None] - k_pos[None, :]
    scores = torch.where(r < window, near, far)
    scores.mul_(1.0 / math.sqrt(q_near.shape[-1])).masked_fill_(r < 0, float("-inf"))   # in place: T x T is big
    return scores


def dpe_scores(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
               sigma: torch.Tensor, window: int, theta: torch.Tensor, layout: str) -> torch.Tensor:
    """Scaled attention scores with DPE, before the softmax: (n_head, Tq, Tk), -inf where j > i.

    q: (n_head, Tq, D) and k: (n_head_kv, Tk, D), both before RoPE; q_pos, k_pos: int64 positions;
    sigma: (n_head_kv, F) divisors of this layer. Near keys (r = i - j < w) score
    rope(q, i) . rope(k, j); far keys score rope_dpe_q(q, i) . rope_dpe_k(k, j). Keys are rotated
    once per KV head and shared by the query heads of its group (h_kv = h_q // group).
    """
    group = q.shape[0] // k.shape[0]
    sigma_q = sigma.repeat_interleave(group, dim=0)
    return merge_scores(rope(q, q_pos, theta, layout), rope_dpe_q(q, q_pos, sigma_q, window, theta, layout),
                        rope(k, k_pos, theta, layout).repeat_interleave(group, 0),
                        rope_dpe_k(k, k_pos, sigma, theta, layout).repeat_interleave(group, 0),
                        q_pos, k_pos, window)


def dpe_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                  k_pos: torch.Tensor, sigma: torch.Tensor, window: int, theta: torch.Tensor,
                  layout: str, block: int = 512) -> torch.Tensor:
    """softmax(dpe_scores) @ V: one softmax over near and far keys together. (n_head, Tq, D).

    k_pos must be increasing (cache order). The rotations are those of `dpe_scores`, done once;
    queries then go in blocks of `block` rows, each against the keys up to its last query (the
    others are masked anyway). This bounds memory; the result does not depend on `block`.
    """
    group = q.shape[0] // k.shape[0]
    sigma_q = sigma.repeat_interleave(group, dim=0)
    q_near, q_far = rope(q, q_pos, theta, layout), rope_dpe_q(q, q_pos, sigma_q, window, theta, layout)
    k_near = rope(k, k_pos, theta, layout).repeat_interleave(group, 0)
    k_far = rope_dpe_k(k, k_pos, sigma, theta, layout).repeat_interleave(group, 0)
    v = v.repeat_interleave(group, 0)
    out = []
    for s in range(0, q.shape[1], block):
        b = slice(s, s + block)
        n = int((k_pos <= q_pos[b].max()).sum())
        scores = merge_scores(q_near[:, b], q_far[:, b], k_near[:, :n], k_far[:, :n], q_pos[b], k_pos[:n], window)
        out.append(torch.softmax(scores, dim=-1) @ v[:, :n])
    return torch.cat(out, dim=1)


# ---------------------------------------------------------------------------------------------
# The model: GGUF weights, transformer forward, cache
# ---------------------------------------------------------------------------------------------

@dataclass
class Cache:
    """Per-layer keys before RoPE and values, (n_head_kv, n_past, head_dim) each.

    Keys are kept unrotated: a new query rotates every cached key for its own (near or far)
    score, so token-by-token decoding computes exactly what a full prefill computes.
    """
    k: list = field(default_factory=list)
    v: list = field(default_factory=list)

    @property
    def n_past(self) -> int:
        return self.k[0].shape[1] if self.k else 0


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@dataclass
class ReferenceModel:
    """A llama / qwen2 GGUF model in PyTorch with DPE attention. Build it with `load_model`."""
    path: str
    arch: str
    layout: str
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    n_vocab: int
    n_ctx_train: int
    rms_eps: float
    theta: torch.Tensor               # (F,) float64, design section 1's theta_f
    weights: dict                     # GGUF tensor name -> torch tensor, ggml's layout
    dtype: torch.dtype = torch.float32

    @property
    def n_freq(self) -> int:
        return self.n_rot // 2

    def vanilla_table(self) -> np.ndarray:
        """The all-ones divisor table: DPE that equals the unmodified model."""
        return np.ones((self.n_layer, self.n_head_kv, self.n_freq), dtype=np.float32)

    def check_tokens(self, tokens) -> torch.Tensor:
        ids = torch.as_tensor(np.asarray(tokens)).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("no tokens given")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"token ids must be integers, got {ids.dtype}")
        bad = ((ids < 0) | (ids >= self.n_vocab)).nonzero()
        if len(bad):
            at = int(bad[0])
            raise ValueError(f"token id {int(ids[at])} at index {at} is outside the vocabulary of "
                             f"{self.path} (valid ids: 0..{self.n_vocab - 1})")
        return ids.to(torch.int64)

    def check_table(self, table, window: int) -> torch.Tensor:
        want = (self.n_layer, self.n_head_kv, self.n_freq)
        t = np.asarray(table, dtype=np.float64)
        if t.shape != want:
            raise ValueError(f"divisor table has shape {t.shape}; this model needs "
                             f"(n_layer, n_head_kv, n_rot/2) = {want}")
        if not np.all(np.isfinite(t)) or np.any(t < 1) or np.any(t != np.round(t)):
            raise ValueError("divisor table values must be integers >= 1")
        if isinstance(window, bool) or int(window) != window or window < 0:
            raise ValueError(f"window must be an integer >= 0, got {window!r}")
        return torch.from_numpy(t.astype(np.int64))

    def forward(self, tokens, table=None, window: int = 0, cache: Cache | None = None) -> torch.Tensor:
        """Logits (n_tokens, n_vocab) for `tokens` placed after the `cache` (if any).

        table: divisors (n_layer, n_head_kv, n_rot/2), None for all ones (the unmodified model);
        window: w. With a cache, the tokens take positions n_past.. and are appended to it.
        """
        ids = self.check_tokens(tokens)
        sigma = self.check_table(self.vanilla_table() if table is None else table, window)
        n_past = cache.n_past if cache is not None else 0
        q_pos = torch.arange(n_past, n_past + len(ids))
        W = self.weights
        x = W["token_embd.weight"][ids]
        for l in range(self.n_layer):
            blk = f"blk.{l}."
            h = rms_norm(x, W[blk + "attn_norm.weight"], self.rms_eps)
            q = self._linear(h, blk + "attn_q").view(len(ids), self.n_head, self.head_dim).transpose(0, 1)
            k = self._linear(h, blk + "attn_k").view(len(ids), self.n_head_kv, self.head_dim).transpose(0, 1)
            v = self._linear(h, blk + "attn_v").view(len(ids), self.n_head_kv, self.head_dim).transpose(0, 1)
            if cache is not None:
                if len(cache.k) <= l:
                    cache.k.append(k[:, :0])
                    cache.v.append(v[:, :0])
                k = cache.k[l] = torch.cat([cache.k[l], k], dim=1)
                v = cache.v[l] = torch.cat([cache.v[l], v], dim=1)
            k_pos = torch.arange(k.shape[1])
            o = dpe_attention(q, k, v, q_pos, k_pos, sigma[l], int(window), self.theta, self.layout)
            x = x + self._linear(o.transpose(0, 1).reshape(len(ids), -1), blk + "attn_output")
            h = rms_norm(x, W[blk + "ffn_norm.weight"], self.rms_eps)
            ffn = torch.nn.functional.silu(self._linear(h, blk + "ffn_gate")) * self._linear(h, blk + "ffn_up")
            x = x + self._linear(ffn, blk + "ffn_down")
        x = rms_norm(x, W["output_norm.weight"], self.rms_eps)
        return torch.nn.functional.linear(x, W.get("output.weight", W["token_embd.weight"]))

    __call__ = forward

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weights[name + ".weight"], self.weights.get(name + ".bias"))


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def load_model(path: str | PathLike, dtype: torch.dtype = torch.float32) -> ReferenceModel:
    """Read a llama (incl. Mistral) or qwen2 GGUF file; every tensor dequantized to `dtype`.

    Raises UnsupportedModelError for other architectures, mixture-of-experts files and rope
    scaling types other than none/linear (YaRN, LongRoPE, ...).
    """
    import gguf

    path = str(path)
    reader = gguf.GGUFReader(path)
    arch = _field(reader, "general.architecture")
    if arch not in ROPE_LAYOUT:
        raise UnsupportedModelError(
            f"{path}: architecture {arch!r} is not supported by the DPE reference; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Mistral files use 'llama')")
    scaling = _field(reader, f"{arch}.rope.scaling.type", "linear")
    if scaling not in SUPPORTED_ROPE_SCALING:
        raise UnsupportedModelError(
            f"{path}: rope scaling type {scaling!r} is not supported by the DPE reference; "
            f"supported: {', '.join(SUPPORTED_ROPE_SCALING)} (and rope_freqs factors)")
    names = {t.name for t in reader.tensors}
    if any("_exps" in n or "ffn_gate_inp" in n for n in names):
        raise UnsupportedModelError(f"{path}: mixture-of-experts {arch} models are not supported "
                                    f"by the DPE reference; supported: dense {', '.join(SUPPORTED_ARCHITECTURES)}")

    weights = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        weights[t.name] = torch.from_numpy(np.array(w, dtype=np.float32)).to(dtype)

    n_embd = int(_field(reader, f"{arch}.embedding_length"))
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", n_embd // n_head))
    n_rot = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    factor = float(_field(reader, f"{arch}.rope.scaling.factor",
                          _field(reader, f"{arch}.rope.scale_linear", 0.0)))
    theta = rope_theta(n_rot, float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
                       1.0 if factor == 0.0 else 1.0 / factor, weights.get("rope_freqs.weight"))
    return ReferenceModel(
        path=path, arch=arch, layout=ROPE_LAYOUT[arch],
        n_layer=int(_field(reader, f"{arch}.block_count")), n_head=n_head,
        n_head_kv=int(_field(reader, f"{arch}.attention.head_count_kv", n_head)),
        head_dim=head_dim, n_rot=n_rot, n_vocab=weights["token_embd.weight"].shape[0],
        n_ctx_train=int(_field(reader, f"{arch}.context_length")),
        rms_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        theta=theta, weights=weights, dtype=dtype)
