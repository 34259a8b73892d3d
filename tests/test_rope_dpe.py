"""GGML_OP_ROPE_DPE (csrc/ggml-dpe.h) against a float64 NumPy reference of docs/design.md section 3.

The op rotates vectors that ordinary RoPE already rotated at position `pos` so that frequency f ends
up at DPE's position P(pos, sigma): key P_k(j, s) = floor(j/s), query P_q(i, s) = floor(i/s) + w - floor(w/s).

Tolerance. Every check compares per rotated pair: |out - ref| / |pair| <= PAIR_TOL. The kernels form
the angle delta * theta_f in double, reduce it to [-pi, pi] and round to float (<= 1.2e-7 rad), take a
float sin/cos (CPU ~6e-8; CUDA __sinf/__cosf ~4e-7 on [-pi, pi]) and do the 2x2 rotation in float
(~2 * 6e-8 relative). That is <= ~6e-7 of the pair's norm; PAIR_TOL = 2e-6 leaves margin. Any formula
error moves an angle by at least one position step of the slowest frequency used (theta_f * 1 >= 1e-6 rad
only for the lowest frequencies; in practice deltas are off by hundreds of positions), and the
`test_tolerance_catches_wrong_formulas` test asserts the usual mistakes exceed PAIR_TOL by a wide margin.
"""
from __future__ import annotations

import numpy as np
import pytest

_native = pytest.importorskip("dpe_gguf._native", reason="dpe_gguf's native build is not installed")

NORMAL, NEOX = 0, 2
PAIR_TOL = 2e-6
BACKENDS = ["cpu"] + (["cuda"] if _native.BUILD_INFO["cuda"] else [])


# ---------------------------------------------------------------- float64 reference (spec section 3)

def theta(n_dims, freq_base, freq_scale=1.0, ext_factor=0.0, beta_fast=32.0, beta_slow=1.0, n_ctx_orig=0,
          freq_factors=None):
    """theta_f, the model's angle per position for f = 0..F-1, as ggml's rope defines it.

    theta_scale = freq_base^(-2/n_dims) is rounded to float32 as ggml computes it (both CPU and CUDA);
    the rest is exact. freq_factors divide; YaRN mixes freq_scale with 1 by the ramp over corr dims."""
    F = n_dims // 2
    f = np.arange(F, dtype=np.float64)
    theta_scale = float(np.float32(freq_base) ** (np.float32(-2.0) / np.float32(n_dims)))
    rate = theta_scale ** f
    if freq_factors is not None:
        rate = rate / np.asarray(freq_factors, dtype=np.float64)
    if ext_factor != 0.0:
        def corr_dim(beta):
            return n_dims * np.log(n_ctx_orig / (beta * 2 * np.pi)) / (2 * np.log(freq_base))
        low = max(0.0, np.floor(corr_dim(beta_fast)))
        high = min(n_dims - 1.0, np.ceil(corr_dim(beta_slow)))
        ramp = (1.0 - np.clip((f - low) / max(0.001, high - low), 0.0, 1.0)) * ext_factor
        return rate * (freq_scale * (1.0 - ramp) + ramp)
    return rate * freq_scale


def pairs(mode, n_dims):
    """Dimension pair of frequency f: NORMAL (2f, 2f+1), NEOX (f, f + n_dims/2)."""
    f = np.arange(n_dims // 2)
    return (2 * f, 2 * f + 1) if mode == NORMAL else (f, f + n_dims // 2)


def rotate(x, angle, mode, n_dims):
    """Rotate pair f of x [T, H, D] by angle [T, H, F] (float64); dims beyond n_dims unchanged."""
    x = np.asarray(x, dtype=np.float64)
    ia, ib = pairs(mode, n_dims)
    out = x.copy()
    c, s = np.cos(angle), np.sin(angle)
    out[..., ia] = x[..., ia] * c - x[..., ib] * s
    out[..., ib] = x[..., ia] * s + x[..., ib] * c
    return out


def rope_np(x, p, mode, n_dims, rate):
    """Ordinary RoPE at positions p: [T] (every frequency) or [T, H, F] (one per head and frequency)."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim == 1:
        p = p[:, None, None]
    return rotate(x, p * rate, mode, n_dims)


def sigma_per_head(table, n_head):
    """The divisor row of every query head: head h uses KV head h // (n_head / n_head_kv)."""
    return table[np.arange(n_head) // (n_head // table.shape[0])]


def dpe_positions(pos, sigma, window, is_query):
    """P_k(j, s) = floor(j/s); P_q(i, s) = floor(i/s) + w - floor(w/s). pos [T], sigma [H, F] -> [T, H, F]."""
    s = sigma.astype(np.int64)[None]
    p = np.asarray(pos, dtype=np.int64)[:, None, None]
    P = np.floor_divide(p, s)
    if is_query:
        P = P + window - np.floor_divide(window, s)
    return P


def rope_dpe_np(x_rot, pos, table, mode, n_dims, rate, window, is_query):
    """The op: rotate already-rotated vectors by (P(pos, sigma) - pos) * theta_f."""
    sigma = sigma_per_head(table, x_rot.shape[1])
    delta = dpe_positions(pos, sigma, window, is_query) - np.asarray(pos, dtype=np.int64)[:, None, None]
    return rotate(x_rot, delta * rate, mode, n_dims)


# ---------------------------------------------------------------- helpers

def pair_err(out, ref, mode, n_dims):
    """max over rotated pairs of |out - ref| / |ref pair|, and max abs error on the copied dims."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    ia, ib = pairs(mode, n_dims)
    d = np.hypot(out[..., ia] - ref[..., ia], out[..., ib] - ref[..., ib])
    n = np.maximum(np.hypot(ref[..., ia], ref[..., ib]), 1e-30)
    rest = np.setdiff1d(np.arange(out.shape[-1]), np.concatenate([ia, ib]))
    rest_err = np.abs(out[..., rest] - ref[..., rest]).max() if rest.size else 0.0
    return float((d / n).max()), float(rest_err)


def random_table(rng, n_head_kv, F, scales=(1, 2, 3, 4, 8, 16, 32)):
    return rng.choice(np.array(scales, dtype=np.float32), size=(n_head_kv, F))


def run(x, pos, table, cfg, backend="cpu", **kw):
    return _native.rope_dpe(x, pos, table, n_dims=cfg["n_dims"], mode=cfg["mode"], window=cfg["window"],
                            is_query=cfg["is_query"], freq_base=cfg["freq_base"], freq_scale=cfg["freq_scale"],
                            ext_factor=cfg["ext_factor"], beta_fast=32.0, beta_slow=1.0,
                            n_ctx_orig=cfg["n_ctx_orig"], freq_factors=cfg["freq_factors"], backend=backend, **kw)


def make_case(seed, mode, n_head, n_head_kv, head_dim, n_dims, is_query, ff, yarn, n_tokens=24):
    rng = np.random.default_rng(seed)
    F = n_dims // 2
    pos = rng.integers(0, 100_000, size=n_tokens).astype(np.int32)
    pos[:4] = [0, 1023, 1024, 99_999]  # window edges and the far end
    cfg = dict(mode=mode, n_dims=n_dims, window=1024, is_query=is_query, freq_base=500000.0 if yarn else 10000.0,
               freq_scale=0.25 if yarn else 1.0, ext_factor=1.0 if yarn else 0.0, n_ctx_orig=8192 if yarn else 0,
               freq_factors=rng.uniform(0.9, 8.0, size=F).astype(np.float32) if ff else None)
    x = rng.standard_normal((n_tokens, n_head, head_dim))  # un-rotated vectors (float64)
    return x, pos, random_table(rng, n_head_kv, F), cfg


def rate_of(cfg):
    return theta(cfg["n_dims"], cfg["freq_base"], cfg["freq_scale"], cfg["ext_factor"], 32.0, 1.0,
                 cfg["n_ctx_orig"], cfg["freq_factors"])


CASES = [  # mode, n_head, n_head_kv, head_dim, n_dims
    (NORMAL, 8, 8, 64, 64),    # MHA
    (NORMAL, 8, 2, 128, 128),  # GQA 4 (llama 3)
    (NEOX, 12, 4, 64, 64),     # GQA 3
    (NEOX, 6, 2, 80, 32),      # n_dims < head dim (stablelm-like)
    (NORMAL, 4, 1, 96, 64),    # MQA, n_dims < head dim
]


def case_id(c):
    """The test id of a CASES entry."""
    return f"{'neox' if c[0] else 'norm'}-h{c[1]}-kv{c[2]}-d{c[3]}-r{c[4]}"


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("yarn", [False, True], ids=["plain", "yarn"])
@pytest.mark.parametrize("ff", [False, True], ids=["noff", "ff"])
@pytest.mark.parametrize("is_query", [False, True], ids=["key", "query"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case, is_query, ff, yarn, backend):
    mode, n_head, n_head_kv, head_dim, n_dims = case
    x, pos, table, cfg = make_case(hash((case, is_query, ff, yarn)) & 0xFFFF, mode, n_head, n_head_kv, head_dim,
                                   n_dims, is_query, ff, yarn)
    rate = rate_of(cfg)
    x_rot = rope_np(x, pos, mode, n_dims, rate).astype(np.float32)  # what the model's rope produced

    out = run(x_rot, pos, table, cfg, backend)
    assert out.dtype == np.float32 and out.shape == x_rot.shape

    # 1. rotation of the already-rotated vectors by the position delta
    err, rest = pair_err(out, rope_dpe_np(x_rot, pos, table, mode, n_dims, rate, cfg["window"], is_query), mode, n_dims)
    assert err <= PAIR_TOL and rest == 0.0, (err, rest)

    # 2. equals rotating the un-rotated vectors directly to DPE's positions P (rotations compose)
    P = dpe_positions(pos, sigma_per_head(table, n_head), cfg["window"], is_query)
    err, _ = pair_err(out, rope_np(x, P, mode, n_dims, rate), mode, n_dims)
    assert err <= PAIR_TOL, err


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", [NORMAL, NEOX])
@pytest.mark.parametrize("is_query", [False, True])
def test_all_divisors_one_is_exact_copy(mode, is_query, backend):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((33, 8, 128)).astype(np.float32)
    x[0, 0, :4] = [-0.0, 0.0, -0.0, np.float32(1e-40)]  # signed zeros and a denormal survive too
    pos = rng.integers(0, 131_072, size=33).astype(np.int32)
    table = np.ones((2, 48), np.float32)
    out = _native.rope_dpe(x, pos, table, n_dims=96, mode=mode, window=1024, is_query=is_query,
                           freq_base=500000.0, freq_factors=np.full(48, 3.0, np.float32), ext_factor=1.0,
                           freq_scale=0.125, n_ctx_orig=8192, backend=backend)
    assert np.array_equal(out.view(np.uint32), x.view(np.uint32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_view(backend):
    x, pos, table, cfg = make_case(11, NEOX, 8, 2, 64, 64, True, True, False)
    rate = rate_of(cfg)
    x_rot = rope_np(x, pos, NEOX, 64, rate).astype(np.float32)
    big = np.zeros((x.shape[0], 2 * x.shape[1], 96), np.float32)  # e.g. a view into a fused QKV tensor
    big[:, ::2, 16:80] = x_rot
    view = big[:, ::2, 16:80]
    assert not view.flags.c_contiguous
    out = run(view, pos, table, cfg, backend)
    np.testing.assert_array_equal(out, run(x_rot, pos, table, cfg, backend))


def test_threads_agree():
    x, pos, table, cfg = make_case(5, NORMAL, 12, 4, 128, 128, False, False, True, n_tokens=37)
    x_rot = rope_np(x, pos, NORMAL, 128, rate_of(cfg)).astype(np.float32)
    one = run(x_rot, pos, table, cfg, n_threads=1)
    for n in (2, 3, 5):
        np.testing.assert_array_equal(run(x_rot, pos, table, cfg, n_threads=n), one)


def test_negative_positions_floor():
    """P_k(j, s) = floor(j/s) also for j < 0 (C division truncates; the op must floor)."""
    x = np.random.default_rng(3).standard_normal((4, 2, 8)).astype(np.float32)
    pos = np.array([-5, -4, -1, 7], np.int32)
    table = np.full((1, 4), 4.0, np.float32)
    cfg = dict(mode=NORMAL, n_dims=8, window=6, is_query=True, freq_base=10000.0, freq_scale=1.0, ext_factor=0.0,
               n_ctx_orig=0, freq_factors=None)
    out = run(x, pos, table, cfg)
    err, _ = pair_err(out, rope_dpe_np(x, pos, table, NORMAL, 8, rate_of(cfg), 6, True), NORMAL, 8)
    assert err <= PAIR_TOL


@pytest.mark.skipif("cuda" not in BACKENDS, reason="build without CUDA")
@pytest.mark.parametrize("case", CASES[:3])
def test_cuda_matches_cpu(case):
    mode, n_head, n_head_kv, head_dim, n_dims = case
    x, pos, table, cfg = make_case(21, mode, n_head, n_head_kv, head_dim, n_dims, True, True, True, n_tokens=300)
    x_rot = rope_np(x, pos, mode, n_dims, rate_of(cfg)).astype(np.float32)
    err, rest = pair_err(run(x_rot, pos, table, cfg, "cuda"), run(x_rot, pos, table, cfg, "cpu"), mode, n_dims)
    assert err <= PAIR_TOL and rest == 0.0, err


def test_tolerance_catches_wrong_formulas():
    """The usual mistakes land far outside PAIR_TOL: P_q and P_k swapped, the query head's index used as
    the KV head, the rate without freq_factors, and the float64 base^(-2f/n) rate instead of ggml's float32
    theta_scale (that last one by a smaller margin: it is a 1e-3..1e-2 rad effect at 1e5 positions)."""
    x, pos, table, cfg = make_case(99, NORMAL, 8, 2, 128, 128, True, True, False)
    rate = rate_of(cfg)
    x_rot = rope_np(x, pos, NORMAL, 128, rate).astype(np.float32)
    out = run(x_rot, pos, table, cfg)
    ref = rope_dpe_np(x_rot, pos, table, NORMAL, 128, rate, 1024, True)
    assert pair_err(out, ref, NORMAL, 128)[0] <= PAIR_TOL

    swapped = rope_dpe_np(x_rot, pos, table, NORMAL, 128, rate, 1024, False)
    assert pair_err(out, swapped, NORMAL, 128)[0] > 1e4 * PAIR_TOL

    table_by_query_head = np.concatenate([table, table[::-1], table, table[::-1]])  # row h, not h // 4
    assert not np.array_equal(sigma_per_head(table_by_query_head, 8), sigma_per_head(table, 8))
    wrong_head = rope_dpe_np(x_rot, pos, table_by_query_head, NORMAL, 128, rate, 1024, True)
    assert pair_err(out, wrong_head, NORMAL, 128)[0] > 1e4 * PAIR_TOL

    no_ff = rope_dpe_np(x_rot, pos, table, NORMAL, 128, rate * cfg["freq_factors"], 1024, True)
    assert pair_err(out, no_ff, NORMAL, 128)[0] > 1e4 * PAIR_TOL

    exact_base = 10000.0 ** (-2.0 * np.arange(64) / 128) / cfg["freq_factors"]
    assert pair_err(out, rope_dpe_np(x_rot, pos, table, NORMAL, 128, exact_base, 1024, True), NORMAL, 128)[0] > 10 * PAIR_TOL


# ---------------------------------------------------------------- kind KEY_INVERSE

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("yarn", [False, True], ids=["plain", "yarn"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_inverse_rotates_far_keys_back(case, yarn, backend):
    """The window's keys are rebuilt from the cache's far keys: KEY_INVERSE of the far key at pos is the key
    ordinary RoPE rotated at pos (float64 reference), to the op's own precision."""
    mode, n_head, n_head_kv, head_dim, n_dims = case
    x, pos, table, cfg = make_case(hash((case, yarn, "inv")) & 0xFFFF, mode, n_head, n_head_kv, head_dim, n_dims,
                                   False, True, yarn)
    rate = rate_of(cfg)
    x_rot = rope_np(x, pos, mode, n_dims, rate)                      # the key ordinary RoPE gives
    P = dpe_positions(pos, sigma_per_head(table, n_head), cfg["window"], False)
    k_far = rope_np(x, P, mode, n_dims, rate).astype(np.float32)     # what the cache holds
    back = run(k_far, pos, table, cfg, backend, inverse=True)
    err, rest = pair_err(back, x_rot.astype(np.float32), mode, n_dims)   # dims past n_dims: copied
    assert err <= PAIR_TOL and rest == 0.0, (err, rest)
    # not a no-op: the far keys differ from the ordinary ones by far more than the tolerance
    assert pair_err(k_far, x_rot, mode, n_dims)[0] > 1e3 * PAIR_TOL
    with pytest.raises(ValueError):
        run(k_far, pos, table, dict(cfg, is_query=True), backend, inverse=True)


# ---------------------------------------------------------------- GGML_OP_DPE_NEAR_SCORES

def near_scores_np(kq, kq_near, idx, pos_win, pos_q, window):
    """float64 reference: kq[s, h, i, idx[s, j]] = kq_near[s, h, i, j] where 0 <= pos_q - pos_win < window."""
    out = np.array(kq, dtype=np.float64)
    S, H, T, _ = kq.shape
    for s in range(S):
        for i in range(T):
            r = int(pos_q[s * T + i]) - pos_win[s].astype(np.int64)
            for j in np.nonzero((r >= 0) & (r < window))[0]:
                out[s, :, i, idx[s, j]] = kq_near[s, :, i, j]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 9, 7, 300, 40), (2, 4, 5, 96, 33), (3, 2, 1, 64, 64)],
                         ids=["one-stream", "two-streams", "decode-3-streams"])
def test_near_scores_match_reference(shape, backend):
    """Window slots at scattered cells (holes, another sequence's cells), padding slots (pos INT32_MAX), queries
    whose windows start inside and before the window set: exactly the reference, nothing else touched."""
    S, H, T, n_kv, n_win = shape
    rng = np.random.default_rng(sum(shape))
    window = 16
    kq = rng.standard_normal((S, H, T, n_kv)).astype(np.float32)
    kq_near = rng.standard_normal((S, H, T, n_win)).astype(np.float32)
    idx = np.stack([rng.permutation(n_kv)[:n_win] for _ in range(S)]).astype(np.int32)
    pos_win = rng.integers(0, 200, size=(S, n_win)).astype(np.int32)
    pos_win[:, -3:] = np.iinfo(np.int32).max                           # padding slots
    pos_q = rng.integers(0, 220, size=S * T).astype(np.int32)
    pos_q[0] = pos_win[0, 0] + window - 1                              # the window's far edge: near
    out = _native.dpe_near_scores(kq, kq_near, idx, pos_win, pos_q, window=window, backend=backend)
    ref = near_scores_np(kq, kq_near, idx, pos_win, pos_q, window)
    np.testing.assert_array_equal(out, ref.astype(np.float32))
    changed = (out != kq).mean()
    assert 0 < changed < 0.5, changed                                  # the test exercises both branches
    assert out[0, 0, 0, idx[0, 0]] == kq_near[0, 0, 0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 9, 7, 300, 40), (3, 2, 1, 64, 30)], ids=["one-stream", "decode-3-streams"])
def test_near_scores_read_a_store(shape, backend):
    """kw_slots = S: the near scores are against the rows of a store of keys by cell (decode without flash
    attention multiplies the store itself, docs/design.md section 6), slot j's score in row idx[j] % S: the
    reference on the gathered rows, bit for bit; another S reads other rows."""
    S_str, H, T, n_kv, n_win = shape
    rng = np.random.default_rng(7 + sum(shape))
    window, slots = 16, 37
    n_rows = 48                                                        # the store's rows, padded past S + 1
    kq = rng.standard_normal((S_str, H, T, n_kv)).astype(np.float32)
    store = rng.standard_normal((S_str, H, T, n_rows)).astype(np.float32)
    idx = np.stack([np.sort(rng.permutation(n_kv)[:n_win]) for _ in range(S_str)]).astype(np.int32)
    pos_win = rng.integers(0, 200, size=(S_str, n_win)).astype(np.int32)
    pos_win[:, -3:] = np.iinfo(np.int32).max
    pos_q = rng.integers(0, 220, size=S_str * T).astype(np.int32)
    pos_q[0] = pos_win[0, 0]
    gathered = np.stack([store[s][..., idx[s] % slots] for s in range(S_str)])
    ref = near_scores_np(kq, gathered, idx, pos_win, pos_q, window)
    out = _native.dpe_near_scores(kq, store, idx, pos_win, pos_q, window=window, kw_slots=slots, backend=backend)
    np.testing.assert_array_equal(out, ref.astype(np.float32))
    assert 0 < (out != kq).mean() < 0.5
    other = _native.dpe_near_scores(kq, store, idx, pos_win, pos_q, window=window, kw_slots=slots + 1,
                                    backend=backend)
    assert not np.array_equal(other, out)
    # a wider result (far scores computed for the first cells only): kq's columns, zeros, then the same merge
    wide = _native.dpe_near_scores(kq, store, idx, pos_win, pos_q, window=window, kw_slots=slots,
                                   n_kv=n_kv + 40, backend=backend)
    kq_wide = np.concatenate([kq, np.zeros(kq.shape[:3] + (40,), np.float32)], axis=3)
    np.testing.assert_array_equal(wide, near_scores_np(kq_wide, gathered, idx, pos_win, pos_q, window).astype(np.float32))
    with pytest.raises(ValueError):                                    # fewer rows than slots
        _native.dpe_near_scores(kq, store[..., :slots - 1], idx, pos_win, pos_q, window=window, kw_slots=slots,
                                backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["key", "query", "inverse", "key_full", "query_pair"])
@pytest.mark.parametrize("positions", ["window", "prompt", "spread"])
def test_many_rows(positions, kind, backend):
    """Many rows: a window of consecutive cells, a long prompt, or positions spread over 100k (the CPU kernel
    builds the angles of dense rows from per-(f, s) tables, and of spread rows directly): the reference, to
    the same tolerance."""
    rng = np.random.default_rng(len(positions) + len(kind))
    n = {"window": 1040, "prompt": 3000, "spread": 300}[positions]
    pos = {"window": np.arange(70_000, 70_000 + n), "prompt": np.arange(n),
           "spread": np.sort(rng.integers(0, 100_000, n))}[positions].astype(np.int32)
    mode, n_head, n_head_kv, n_dims = NEOX, 6, 3, 64
    is_query = kind in ("query", "query_pair")
    cfg = dict(mode=mode, n_dims=n_dims, window=1024, is_query=is_query, freq_base=100000.0, freq_scale=1.0,
               ext_factor=0.0, n_ctx_orig=0, freq_factors=None)
    table = random_table(rng, n_head_kv, n_dims // 2)
    rate = rate_of(cfg)
    x = rng.standard_normal((n, n_head, n_dims))
    P = dpe_positions(pos, sigma_per_head(table, n_head), cfg["window"], is_query)
    if kind in ("key_full", "query_pair"):
        out = run(x.astype(np.float32), pos, table, cfg, backend, full=True)
        ref = rope_np(x, P, mode, n_dims, rate)
        if kind == "query_pair":
            assert pair_err(out[0], rope_np(x, pos, mode, n_dims, rate), mode, n_dims)[0] <= PAIR_TOL
            out = out[1]
        err, _ = pair_err(out, ref, mode, n_dims)
        assert err <= PAIR_TOL, err
        return
    if kind == "inverse":
        inp, ref = rope_np(x, P, mode, n_dims, rate), rope_np(x, pos, mode, n_dims, rate)
    else:
        inp, ref = rope_np(x, pos, mode, n_dims, rate), rope_np(x, P, mode, n_dims, rate)
    out = run(inp.astype(np.float32), pos, table, cfg, backend, inverse=kind == "inverse")
    err, _ = pair_err(out, ref, mode, n_dims)
    assert err <= PAIR_TOL, err


# ---------------------------------------------------------------- kinds KEY_FULL and QUERY_PAIR (ggml_rope_ext's work too)

def scale_rotated(x, m, mode, n_dims):
    """x with its rotated pairs times m (ggml_rope_ext's magnitude factor); dims past n_dims as they are."""
    out = np.array(x, dtype=np.float64)
    ia, ib = pairs(mode, n_dims)
    out[..., ia] *= m
    out[..., ib] *= m
    return out


def mscale_of(cfg, attn_factor):
    """ggml's rope_yarn: attn_factor, times 1 + 0.1 ln(1/freq_scale) where YaRN extends (ext_factor != 0)."""
    return attn_factor * (1.0 + 0.1 * np.log(1.0 / cfg["freq_scale"]) if cfg["ext_factor"] != 0.0 else 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("yarn", [False, True], ids=["plain", "yarn"])
@pytest.mark.parametrize("ff", [False, True], ids=["noff", "ff"])
@pytest.mark.parametrize("is_query", [False, True], ids=["key_full", "query_pair"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_full_kinds_match_reference(case, is_query, ff, yarn, backend):
    """From vectors no rope has rotated: KEY_FULL gives the far keys, QUERY_PAIR the queries rotated at pos and the
    far queries, each scaled by ggml_rope_ext's factor (attn_factor 0.75 here, and YaRN's where it extends), the
    dims past n_dims copied unscaled."""
    mode, n_head, n_head_kv, head_dim, n_dims = case
    x, pos, table, cfg = make_case(hash((case, is_query, ff, yarn, "full")) & 0xFFFF, mode, n_head, n_head_kv,
                                   head_dim, n_dims, is_query, ff, yarn)
    rate = rate_of(cfg)
    x32 = x.astype(np.float32)
    m = mscale_of(cfg, 0.75)
    P = dpe_positions(pos, sigma_per_head(table, n_head), cfg["window"], is_query)
    far = scale_rotated(rope_np(x32, P, mode, n_dims, rate), m, mode, n_dims)
    out = run(x32, pos, table, cfg, backend, full=True, attn_factor=0.75)
    if is_query:
        assert out.shape == (2,) + x.shape
        near = scale_rotated(rope_np(x32, pos, mode, n_dims, rate), m, mode, n_dims)
        err, rest = pair_err(out[0], near, mode, n_dims)
        assert err <= PAIR_TOL and rest == 0.0, (err, rest)
        out = out[1]
    assert out.shape == x.shape
    err, rest = pair_err(out, far, mode, n_dims)
    assert err <= PAIR_TOL and rest == 0.0, (err, rest)
    # the scale is applied: without it the pairs are off by |1 - m| of their norm
    assert pair_err(out, rope_np(x32, P, mode, n_dims, rate), mode, n_dims)[0] > 0.5 * abs(1.0 - m)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_key_then_inverse_is_the_models_rope(backend):
    """What the engine relies on: the window's keys rebuilt from KEY_FULL's far keys (KEY_INVERSE) are the keys
    ggml_rope_ext gives, and a pair at shift 0 is the vector times the scale."""
    x, pos, table, cfg = make_case(17, NORMAL, 8, 2, 128, 128, False, True, True, n_tokens=40)
    pos[4] = 0
    rate = rate_of(cfg)
    k_far = run(x.astype(np.float32), pos, table, cfg, backend, full=True, attn_factor=1.25)
    back = run(k_far, pos, table, cfg, backend, inverse=True)
    ref = scale_rotated(rope_np(x.astype(np.float32), pos, NORMAL, 128, rate), mscale_of(cfg, 1.25), NORMAL, 128)
    assert pair_err(back, ref, NORMAL, 128)[0] <= 2 * PAIR_TOL
    np.testing.assert_allclose(k_far[4], x[4].astype(np.float32) * np.float32(mscale_of(cfg, 1.25)), rtol=1e-6)


def test_full_kinds_threads_agree():
    x, pos, table, cfg = make_case(6, NEOX, 12, 4, 64, 64, True, False, True, n_tokens=150)
    one = run(x.astype(np.float32), pos, table, cfg, full=True, n_threads=1)
    for n in (2, 3, 5):
        np.testing.assert_array_equal(run(x.astype(np.float32), pos, table, cfg, full=True, n_threads=n), one)


def test_attn_factor_needs_a_full_kind():
    x, pos, table, cfg = make_case(8, NORMAL, 4, 2, 64, 64, False, False, False)
    with pytest.raises(ValueError):
        run(x.astype(np.float32), pos, table, cfg, attn_factor=0.5)


# ---------------------------------------------------------------- rows: the window's keys read from the cache

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache_type", ["f32", "f16"])
@pytest.mark.parametrize("kind", ["inverse", "key", "query"])
def test_rows_gather_from_the_cache(kind, cache_type, backend):
    """ggml_rope_dpe_ext with rows: slot j of stream s is cell rows[s, j] of the cache (F32 or F16, converted
    exactly as get_rows converts it) rotated at pos[s, j]; the same as gathering first and rotating after."""
    rng = np.random.default_rng({"inverse": 1, "key": 2, "query": 3}[kind] + 10 * (cache_type == "f16"))
    S, N, Hk, D, W, n_dims = 3, 500, 3, 64, 70, 64
    cache = rng.standard_normal((S, N, Hk, D)).astype(np.float32)
    rows = np.stack([np.sort(rng.choice(N, W, replace=False)) for _ in range(S)]).astype(np.int32)
    pos = rng.integers(0, 100_000, (S, W)).astype(np.int32)
    pos[:, -5:] = np.arange(5) + 1020                                # the window's edge
    table = random_table(rng, Hk, n_dims // 2)
    out = _native.rope_dpe_rows(cache, rows, pos, table, n_dims=n_dims, mode=NEOX, window=1024,
                                is_query=kind == "query", inverse=kind == "inverse", freq_base=10000.0,
                                cache_type=cache_type, backend=backend)
    assert out.shape == (S, W, Hk, D)
    stored = cache if cache_type == "f32" else cache.astype(np.float16).astype(np.float32)
    cfg = dict(mode=NEOX, n_dims=n_dims, window=1024, is_query=kind == "query", freq_base=10000.0, freq_scale=1.0,
               ext_factor=0.0, n_ctx_orig=0, freq_factors=None)
    rate = rate_of(cfg)
    for s in range(S):
        g = stored[s, rows[s]]                                       # [W, Hk, D]
        sigma = sigma_per_head(table, Hk)
        P = dpe_positions(pos[s], sigma, 1024, kind == "query")
        delta = P - pos[s].astype(np.int64)[:, None, None]
        ref = rotate(g, (-delta if kind == "inverse" else delta) * rate, NEOX, n_dims)
        err, rest = pair_err(out[s], ref, NEOX, n_dims)
        assert err <= PAIR_TOL and rest == 0.0, (s, err, rest)
        # the same as the op on the gathered rows
        np.testing.assert_array_equal(out[s], run(g, pos[s], table, cfg, backend, inverse=kind == "inverse"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_refuse_cells_outside_the_cache(backend):
    cache = np.zeros((1, 10, 1, 8), np.float32)
    with pytest.raises(ValueError):
        _native.rope_dpe_rows(cache, np.array([[3, 10]], np.int32), np.zeros((1, 2), np.int32),
                              np.ones((1, 4), np.float32), n_dims=8, mode=NORMAL, window=4, freq_base=10000.0,
                              backend=backend)


# ---------------------------------------------------------------- KEY_WRITE: the cache and store writes in one node

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cache_type", ["f32", "f16"])
@pytest.mark.parametrize("mode", [NORMAL, NEOX])
@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (1, 40), (3, 32)])  # (n_stream, tokens per stream)
def test_key_write_is_the_nodes_it_replaces(shape, mode, cache_type, backend):
    """ggml_rope_dpe_key_write leaves the cache and the store bit for bit as the nodes it replaces leave them
    (KEY_FULL, set_rows into the cache; the cache type's round trip, KEY_INVERSE, set_rows into the store), rows
    and slots it does not write keep their bytes, and each stored key is what rotating its cache row back gives
    (ggml_rope_dpe_ext with rows: the engine's other way to the window's keys)."""
    ns, n_tps = shape
    rng = np.random.default_rng(100 * ns + n_tps + 7 * mode + (cache_type == "f16"))
    Hk, D, n_dims, window = 3, 64, 48, 256                            # dims past n_dims are copied
    nt, n_rows, n_slots = ns * n_tps, 300, n_tps + 6
    a = rng.standard_normal((nt, Hk, D)).astype(np.float32)
    pos = rng.integers(0, 60_000, nt).astype(np.int32)
    pos[0] = 0
    table = random_table(rng, Hk, n_dims // 2)
    cache = rng.standard_normal((n_rows, Hk * D)).astype(np.float32)
    idx = rng.choice(n_rows, nt, replace=False).astype(np.int64)
    store = rng.standard_normal((ns, Hk, n_slots, D)).astype(np.float32)
    slot = np.stack([rng.choice(n_slots, n_tps, replace=False) for _ in range(ns)]).astype(np.int64)
    args = dict(n_dims=n_dims, mode=mode, window=window, freq_base=10000.0, attn_factor=1.125, cache_type=cache_type,
                backend=backend)
    c1, s1 = _native.rope_dpe_key_write(a, pos, table, cache, idx, store, slot, fused=True, **args)
    c0, s0 = _native.rope_dpe_key_write(a, pos, table, cache, idx, store, slot, fused=False, **args)
    np.testing.assert_array_equal(c1.view(np.uint32), c0.view(np.uint32))
    np.testing.assert_array_equal(s1.view(np.uint32), s0.view(np.uint32))
    held = cache if cache_type == "f32" else cache.astype(np.float16).astype(np.float32)
    untouched = np.setdiff1d(np.arange(n_rows), idx)
    np.testing.assert_array_equal(c1[untouched], held[untouched])
    assert not np.array_equal(c1[idx], held[idx])
    for s in range(ns):
        free = np.setdiff1d(np.arange(n_slots), slot[s])
        np.testing.assert_array_equal(s1[s][:, free], store[s][:, free])
        # each stored key: its cache row rotated back at its position
        tok = np.arange(s * n_tps, (s + 1) * n_tps)
        back = _native.rope_dpe_rows(c1.reshape(1, n_rows, Hk, D), idx[tok][None].astype(np.int32), pos[tok][None],
                                     table, n_dims=n_dims, mode=mode, window=window, freq_base=10000.0,
                                     cache_type=cache_type, backend=backend)[0]     # [n_tps, Hk, D]
        np.testing.assert_array_equal(s1[s][:, slot[s]].transpose(1, 0, 2).view(np.uint32), back.view(np.uint32))
    # without a store: the same cache
    c2, _ = _native.rope_dpe_key_write(a, pos, table, cache, idx, fused=True, **args)
    np.testing.assert_array_equal(c2.view(np.uint32), c0.view(np.uint32))


def test_key_write_threads_agree():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((70, 2, 32)).astype(np.float32)
    pos = rng.integers(0, 9000, 70).astype(np.int32)
    table = random_table(rng, 2, 16)
    cache = np.zeros((100, 64), np.float32)
    idx = rng.choice(100, 70, replace=False).astype(np.int64)
    store = np.zeros((2, 2, 40, 32), np.float32)
    slot = np.stack([rng.choice(40, 35, replace=False) for _ in range(2)]).astype(np.int64)
    args = dict(n_dims=32, mode=NEOX, window=64, freq_base=10000.0)
    ref = _native.rope_dpe_key_write(a, pos, table, cache, idx, store, slot, n_threads=1, **args)
    for n in (2, 3, 8):
        got = _native.rope_dpe_key_write(a, pos, table, cache, idx, store, slot, n_threads=n, **args)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
