"""GGML_OP_DPE_FLASH_ATTN (csrc/ggml-dpe.h) against a float64 NumPy reference of DPE's one softmax.

Each (query i, cell j) pair has one score: near, q_i . k_win[slot], where j is a window slot with
0 <= pos_q[i] - pos_win[slot] < w; far, q_far_i . k[j], everywhere else; plus stock's mask, then one softmax
over all cells and one product with V.

The reference takes K and V as the kernel stores them (rounded to the cache type) and, where the kernel
converts the far query to K's dot-product type (one row at a time: decode, quantized K, fewer than 64 rows),
the far query rounded the same way; the tiled path keeps queries in float32. What remains is float32
arithmetic, so the tolerance is float rounding (TOL); test_tolerance_catches_wrong_selection shows that
scoring one near pair as far, or one far pair as near, moves the output by far more.
"""
from __future__ import annotations

import subprocess
import sys
import zlib

import numpy as np
import pytest

_native = pytest.importorskip("dpe_gguf._native", reason="dpe_gguf's native build is not installed")

BACKENDS = ["cpu"] + (["cuda"] if _native.BUILD_INFO["cuda"] else [])
TOL = 2e-5          # max |out - ref| for outputs of magnitude ~1 (values are N(0, 1))
Q_TILE = 64         # GGML_FA_TILE_Q: from this many query rows the CPU kernel runs tiles
NEG = -np.inf


def reference(q, q_far, k, v, mask, k_win, idx, pos_win, pos_q, window, scale, sinks=None, softcap=0.0):
    """float64 DPE attention. q, q_far [S, H, T, D]; k [S, Hk, N, D]; v [S, Hk, N, Dv]; mask [S, T, N];
    k_win [S, Hk, W, D]; idx, pos_win [S, W]; pos_q [S*T]; returns [S, T, H, Dv]."""
    S, H, T, _ = q.shape
    Hk = k.shape[1]
    g = H // Hk
    out = np.zeros((S, T, H, v.shape[3]))
    for s in range(S):
        for h in range(H):
            hk = h // g
            far = q_far[s, h].astype(np.float64) @ k[s, hk].astype(np.float64).T  # [T, N]
            near = q[s, h].astype(np.float64) @ k_win[s, hk].astype(np.float64).T  # [T, W]
            sc = far.copy()
            pq = pos_q[s * T:(s + 1) * T].astype(np.int64)
            for slot in range(idx.shape[1]):
                r = pq - np.int64(pos_win[s, slot])
                sel = (r >= 0) & (r < window)
                sc[sel, idx[s, slot]] = near[sel, slot]
            sc = sc * scale
            if softcap:
                sc = softcap * np.tanh(sc / softcap)
            sc = sc + mask[s].astype(np.float64)
            m = sc.max(axis=1, keepdims=True)
            if sinks is not None:
                m = np.maximum(m, sinks[h])
            m = np.where(np.isfinite(m), m, 0.0)
            e = np.exp(sc - m)
            den = e.sum(axis=1, keepdims=True)
            if sinks is not None:
                den = den + np.exp(sinks[h] - m)
            o = (e @ v[s, hk].astype(np.float64)) / np.where(den == 0, 1, den)
            out[s, :, h, :] = o
    return out


def make_case(rng, *, S=1, H=4, Hk=2, T=1, D=64, Dv=None, N=700, w=100, seqs_per_stream=1, holes=0,
              first_pos=None):
    """Random inputs: each stream holds `seqs_per_stream` sequences in interleaved cells (so the window's
    cells are not contiguous), `holes` empty cells; the ubatch's T queries are the last T positions of the
    stream's first sequence. Returns the inputs and the window set as the engine builds it."""
    Dv = Dv or D
    q = rng.standard_normal((S, H, T, D)).astype(np.float32)
    q_far = rng.standard_normal((S, H, T, D)).astype(np.float32)
    k = rng.standard_normal((S, Hk, N, D)).astype(np.float32)
    v = rng.standard_normal((S, Hk, N, Dv)).astype(np.float32)
    k_win_full = rng.standard_normal((S, Hk, N, D)).astype(np.float32)  # the ordinary key of every cell
    mask = np.full((S, T, N), NEG, dtype=np.float32)
    idxs, pws, pos_q = [], [], []
    for s in range(S):
        seq = np.arange(N) % seqs_per_stream                    # which sequence a cell holds
        empty = np.zeros(N, dtype=bool)
        if holes:
            empty[rng.choice(N, size=holes, replace=False)] = True
        cells0 = np.flatnonzero((seq == 0) & ~empty)             # cells of sequence 0, in cache order
        n0 = len(cells0)
        start = first_pos if first_pos is not None else 0
        pos = np.full(N, -1, dtype=np.int64)
        pos[cells0] = start + np.arange(n0)
        for other in range(1, seqs_per_stream):                  # other sequences: their own positions
            c = np.flatnonzero((seq == other) & ~empty)
            pos[c] = start + np.arange(len(c))
        pq = pos[cells0[n0 - T:]]                                # the queries: the last T of sequence 0
        pos_q.extend(pq.tolist())
        for t in range(T):
            visible = (seq == 0) & ~empty & (pos <= pq[t])
            mask[s, t, visible] = 0.0
        lo, hi = pq.min(), pq.max()
        # the engine's window set, plus the cell just outside it (distance w from the first query): a slot
        # is near only within w, which the kernel must check itself
        win = [j for j in range(N) if seq[j] == 0 and not empty[j] and lo - w - 1 < pos[j] <= hi]
        idxs.append(win)
        pws.append([int(pos[j]) for j in win])
    n_win = max(len(x) for x in idxs) + 3                        # padding slots, as the engine adds
    idx = np.zeros((S, n_win), dtype=np.int32)
    pos_win = np.full((S, n_win), np.iinfo(np.int32).max, dtype=np.int32)
    k_win = np.zeros((S, Hk, n_win, D), dtype=np.float32)
    for s in range(S):
        n = len(idxs[s])
        idx[s, :n] = idxs[s]
        pos_win[s, :n] = pws[s]
        k_win[s, :, :n] = k_win_full[s][:, idxs[s]]
    return dict(q=q, q_far=q_far, k=k, v=v, mask=mask, k_win=k_win, idx=idx, pos_win=pos_win,
                pos_q=np.asarray(pos_q, dtype=np.int32), window=w)


def row_path(T, kv_type):
    """Whether the CPU kernel converts the far query to K's dot type (see the module docstring)."""
    return not (T >= Q_TILE and kv_type in ("f16", "f32"))


def run_case(c, kv_type="f16", backend="cpu", sinks=None, softcap=0.0, n_threads=2, stock=False):
    D = c["q"].shape[3]
    scale = 1.0 / np.sqrt(D)
    k_st = _native.round_trip(c["k"], kv_type)
    v_st = _native.round_trip(c["v"], kv_type)
    out = _native.dpe_flash_attn(c["q"], c["q_far"], k_st, v_st, c["mask"], c["k_win"], c["idx"], c["pos_win"],
                                 c["pos_q"], sinks, window=c["window"], scale=scale, softcap=softcap,
                                 kv_type=kv_type, backend=backend, n_threads=n_threads, stock=stock)
    if stock:
        # stock attends with q_far to every cell: its reference is DPE's with no near pair (window 0)
        c = dict(c, window=0)
    S, H, T, _ = c["q"].shape
    q_far = c["q_far"]
    if backend == "cpu" and row_path(T, kv_type) and kv_type != "f32":
        dot_type = "q8_0" if kv_type not in ("f16", "f32") else kv_type
        q_far = _native.round_trip(q_far, dot_type)
    ref = reference(c["q"], q_far, k_st, v_st, c["mask"], c["k_win"], c["idx"], c["pos_win"], c["pos_q"],
                    c["window"], scale, sinks=sinks, softcap=softcap)
    return out, ref


def tolerance(c, kv_type, backend, sinks=None, softcap=0.0):
    """TOL on the CPU. On CUDA, flash attention rounds Q, K and the softmax weights to F16 (stock's kernels as
    well as DPE's), so float rounding is not the yardstick there: DPE may be at most twice as far from its
    float64 reference as stock's CUDA flash attention of the same inputs is from its own."""
    if backend == "cpu":
        return TOL
    out, ref = run_case(c, kv_type, backend, sinks=sinks, softcap=softcap, stock=True)
    return 2 * float(np.max(np.abs(out - ref)))


CASES = {
    # decode: one query, n_kv >= 512 (cells split across threads)
    "decode": dict(T=1, N=1500, w=300),
    "decode-gqa3-d128": dict(T=1, H=9, Hk=3, D=128, N=900, w=257),
    "decode-window-covers-all": dict(T=1, N=600, w=1000),
    # few rows (one row at a time), a window that crosses the ubatch
    "rows": dict(T=7, N=300, w=50),
    # tiles: more than one Q tile, window edges inside KV tiles, several streams
    "tiled": dict(T=100, N=400, w=90),
    "tiled-streams-d128": dict(S=2, T=70, H=4, Hk=4, D=128, N=260, w=64),
    # interleaved sequences (window cells not contiguous), empty cells
    "seqs-holes": dict(T=65, N=500, w=70, seqs_per_stream=3, holes=40),
    "seqs-decode": dict(T=1, N=1400, w=200, seqs_per_stream=2, holes=30),
    # window larger than the ubatch and smaller than the prompt, positions past 2^16
    "late-positions": dict(T=80, N=700, w=200, first_pos=70000),
    # SmolLM2's shape at depth: many KV tiles (CUDA splits them across blocks), a window of 1024
    "long-decode-gqa3": dict(T=1, H=9, Hk=3, N=12000, w=1024),
    "long-prefill-gqa3": dict(T=200, H=9, Hk=3, N=6000, w=1024),
    # head dim 256 (Gemma 3's): two tokens of 4 heads (8 rows: CUDA's vector kernel at its widest there), and
    # three (12 rows: its one-slice tensor-core kernel)
    "decode-d256": dict(T=2, H=4, Hk=1, D=256, N=900, w=100),
    "rows-d256": dict(T=3, H=4, Hk=1, D=256, N=500, w=60),
    # several streams decoding at once (llama-server's slots)
    "decode-streams": dict(S=3, T=1, H=4, Hk=2, N=700, w=150),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("kv_type", ["f16", "f32"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(name, kv_type, backend):
    rng = np.random.default_rng(zlib.crc32(f"{name}/{kv_type}".encode()))
    c = make_case(rng, **CASES[name])
    out, ref = run_case(c, kv_type, backend)
    assert np.max(np.abs(out - ref)) < tolerance(c, kv_type, backend)


@pytest.mark.parametrize("name", ["decode", "rows", "tiled", "seqs-holes"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_k_and_v(name, backend):
    rng = np.random.default_rng(7)
    c = make_case(rng, **CASES[name])
    out, ref = run_case(c, "q8_0", backend)
    assert np.max(np.abs(out - ref)) < tolerance(c, "q8_0", backend)


@pytest.mark.parametrize("name", ["decode", "rows", "tiled"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sinks_and_softcap(name, backend):
    rng = np.random.default_rng(11)
    # on CUDA the yardstick is stock's flash attention, whose vector kernel has a softcap only for head dims 128
    # and 256 (fattn-vec.cuh): those cases run at d 128 there
    c = make_case(rng, **dict(CASES[name], **({"D": 128} if backend == "cuda" else {})))
    H = c["q"].shape[1]
    sinks = rng.standard_normal(H).astype(np.float32) * 3
    out, ref = run_case(c, "f16", backend, sinks=sinks, softcap=5.0)
    assert np.max(np.abs(out - ref)) < tolerance(c, "f16", backend, sinks=sinks, softcap=5.0)


def as_store(c, rng):
    """The window's keys of case c laid out as the engine's store holds them: row idx % n_slots (n_slots chosen so
    that the window's cells have distinct rows), the other rows random."""
    S, Hk, W, D = c["k_win"].shape
    real = c["pos_win"] != np.iinfo(np.int32).max
    n_slots = max(int(real.sum(axis=1).max()), 1)
    while any(len(set((c["idx"][s][real[s]] % n_slots).tolist())) < real[s].sum() for s in range(S)):
        n_slots += 1
    store = rng.standard_normal((S, Hk, n_slots + 1, D)).astype(np.float32)
    for s in range(S):
        store[s][:, c["idx"][s][real[s]] % n_slots] = c["k_win"][s][:, real[s]]
    return store, n_slots


@pytest.mark.parametrize("name", ["decode", "rows", "tiled", "seqs-holes", "long-decode-gqa3", "decode-d256",
                                  "rows-d256", "decode-streams", "tiled-streams-d128"])
@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_window_keys_read_from_a_store(name, kv_type, backend):
    """kw_slots: the kernels read slot j's window key from row idx[j] % S of a store (the engine's window key
    store) and give the bits they give for the gathered keys."""
    rng = np.random.default_rng(sorted(CASES).index(name) + 40)
    c = make_case(rng, **CASES[name])
    store, n_slots = as_store(c, rng)
    D = c["q"].shape[3]
    k_st = _native.round_trip(c["k"], kv_type)
    v_st = _native.round_trip(c["v"], kv_type)
    args = (c["q"], c["q_far"], k_st, v_st, c["mask"])
    rest = (c["idx"], c["pos_win"], c["pos_q"])
    kw = dict(window=c["window"], scale=1.0 / np.sqrt(D), kv_type=kv_type, backend=backend)
    gathered = _native.dpe_flash_attn(*args, c["k_win"], *rest, **kw)
    stored = _native.dpe_flash_attn(*args, store, *rest, kw_slots=n_slots, **kw)
    np.testing.assert_array_equal(stored.view(np.uint32), gathered.view(np.uint32))
    # the store is read: a wrong slot count reads other rows
    wrong = _native.dpe_flash_attn(*args, store, *rest, kw_slots=n_slots + 1, **kw)
    assert not np.array_equal(wrong, gathered)


@pytest.mark.parametrize("name", ["decode", "tiled", "seqs-holes"])
def test_threads_agree(name):
    rng = np.random.default_rng(3)
    c = make_case(rng, **CASES[name])
    a, _ = run_case(c, "f16", n_threads=1)
    b, _ = run_case(c, "f16", n_threads=2)
    d, _ = run_case(c, "f16", n_threads=3)
    assert np.max(np.abs(a - b)) < TOL and np.max(np.abs(a - d)) < TOL


def test_no_window_is_far_attention():
    """Window 0: every pair far, so the op is attention of q_far over the cache (the reference without
    the near scores, written out separately here)."""
    rng = np.random.default_rng(5)
    c = make_case(rng, T=70, N=300, w=1)
    c["window"] = 0
    out, _ = run_case(c, "f32")
    S, H, T, D = c["q"].shape
    g = H // c["k"].shape[1]
    for h in range(H):
        sc = c["q_far"][0, h].astype(np.float64) @ c["k"][0, h // g].astype(np.float64).T / np.sqrt(D) + c["mask"][0]
        p = np.exp(sc - sc.max(axis=1, keepdims=True))
        o = p @ c["v"][0, h // g] / p.sum(axis=1, keepdims=True)
        assert np.max(np.abs(out[0, :, h] - o)) < TOL


@pytest.mark.skipif("cuda" not in BACKENDS, reason="a CUDA build is needed")
@pytest.mark.parametrize("name", ["decode", "tiled", "seqs-holes"])
def test_cuda_no_window_is_stock(name):
    """Window 0 on CUDA: DPE's kernel computes stock's flash attention of q_far, within stock's own distance
    to the float64 reference."""
    rng = np.random.default_rng(23)
    c = make_case(rng, **CASES[name])
    c["window"] = 0
    out, ref = run_case(c, "f16", "cuda")
    st, _ = run_case(c, "f16", "cuda", stock=True)
    tol = tolerance(c, "f16", "cuda")
    assert np.max(np.abs(out - ref)) < tol
    assert np.max(np.abs(out - st)) < tol


def sharpen_boundary(c):
    """Give the window's two boundary cells of every query (distances w - 1 and w) near keys aligned with
    that query, so that scoring either one the other way moves the output visibly."""
    S, H, T, _ = c["q"].shape
    g = H // c["k"].shape[1]
    for s in range(S):
        for t in range(T):
            pq = int(c["pos_q"][s * T + t])
            for dist in (c["window"] - 1, c["window"]):
                for slot in np.flatnonzero(c["pos_win"][s] == pq - dist):
                    c["k_win"][s, :, slot] = 0.5 * c["q"][s, ::g, t]


@pytest.mark.parametrize("name,backend", [(n, b) for b in BACKENDS for n in ("decode", "tiled", "seqs-holes")])
def test_tolerance_catches_wrong_selection(name, backend):
    """Moving the near/far boundary by one position (w - 1 or w + 1) exceeds the tolerance by a wide margin,
    so the tests above would see an off-by-one in the kernel's choice of dot product."""
    rng = np.random.default_rng(13)
    c = make_case(rng, **CASES[name])
    sharpen_boundary(c)
    out, ref = run_case(c, "f32", backend)
    tol = tolerance(c, "f32", backend)
    assert np.max(np.abs(out - ref)) < tol
    for w in (c["window"] - 1, c["window"] + 1):
        wrong = reference(c["q"], c["q_far"], c["k"], c["v"], c["mask"], c["k_win"], c["idx"], c["pos_win"],
                          c["pos_q"], w, 1.0 / np.sqrt(c["q"].shape[3]))
        assert np.max(np.abs(out - wrong)) > 100 * tol


def test_refuses_unordered_window(tmp_path):
    """The window's cells must ascend (the engine builds them so); the kernel stops with a message rather
    than misread them (a ggml assertion: run in a child process)."""
    code = (
        "import numpy as np, sys; sys.path.insert(0, %r); import test_dpe_attention as t\n"
        "c = t.make_case(np.random.default_rng(17), T=1, N=600, w=50)\n"
        "c['idx'][0, [0, 1]] = c['idx'][0, [1, 0]]\n"
        "t.run_case(c, 'f16')\n"
    ) % str(__import__("pathlib").Path(__file__).parent)
    # cwd: not the repository root, whose dpe_gguf/ (without the native build) would shadow the installed one
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode != 0
    assert "window cells must ascend" in r.stderr
