"""Key-frequency selection (docs/design.md section 4, selection), measured through the patched llama.cpp.

    texts = calibration_texts(n_samples=4, n_chars=12000, seed=0)   # shipped text, ~2.7k tokens each
    scores = key_scores("model.gguf", texts, n_tokens=2048)         # (n_layer, n_head_kv, F) float64
    keep = dpe_gguf.topk_mask(scores, default_topk(scores.shape[-1]))   # dpe_gguf.format.params.topk_mask

``key_scores`` runs the model with llama.cpp's graph evaluation callback (``cb_eval``) and reads the
query and key of every layer *before* RoPE: the last node named ``Qcur-{il}`` / ``Kcur-{il}`` that
is not the ROPE node. In the pinned llama.cpp (``build_qkv`` in src/llama-graph.cpp, used by the
llama and qwen2 graphs) that is the 3-D ``[head_dim, n_head, n_tokens]`` reshape made after the
projection and its bias, just before ``ggml_rope_ext``; the 2-D projection and bias nodes carry the
same name but are not captured. A fused QKV projection gives a 3-D view with that name instead,
also handled (strided read).

For each layer ``l``, query head ``q`` (KV head ``h = q // (n_head / n_head_kv)``) and frequency ``f``:

    c(l, q, f) = mean_t |q_t,f| * |k_t,f|

where ``|x_f|`` is the 2-norm of the pair that frequency ``f`` rotates: dims ``(2f, 2f+1)`` for NORMAL
rope, ``(f, f + n_rot/2)`` for NEOX; dims past ``n_rot`` do not rotate and are ignored. ``c`` is
averaged over the texts (each weighted equally, whatever its length), then the query heads of each
KV head are summed (``dpe_gguf.format.params.fold_query_heads``).

The capture runs in a Python ctypes callback with NumPy: per ubatch and layer it copies one Q and
one K tensor (``ggml_backend_tensor_get``, so offloaded layers work too), reduces them to per-pair
norms and adds ``sum_t |q| * |k|`` to a float64 accumulator of shape ``(n_layer, n_head, F)``.
Memory beyond the model and its context is one layer's Q/K of one ubatch. The callback costs little
next to the forward pass: SmolLM2-135M Q4_1, 2048 tokens, 2 CPU threads, ubatch 512: 240 captures
take ~0.3 s of a ~5 s forward pass, so there is no native version.
"""
from __future__ import annotations

import ctypes
import os
import random
import sys
from pathlib import Path

import numpy as np

from dpe_gguf.errors import DPEError
from dpe_gguf.llama.session import LlamaSession
from dpe_gguf.format.model_info import ModelInfo, has_dpe, open_reader
from dpe_gguf.format.params import fold_query_heads

MIN_TOKENS = 64
GGML_TYPE_F32 = 0


DEFAULT_TOPK_FRACTION = 0.75


def default_topk(n_freq: int) -> int:
    """Frequencies kept per (layer, KV head) by default: 75% of ``F`` (the paper keeps 48 of 64)."""
    return max(1, round(DEFAULT_TOPK_FRACTION * n_freq))


# ---------------------------------------------------------------------------------------------
# Calibration text
# ---------------------------------------------------------------------------------------------

def calibration_texts(n_samples: int, n_chars: int, seed: int, path: str | os.PathLike[str] | None = None
                      ) -> list[str]:
    """``n_samples`` chunks of ``n_chars`` characters of ordinary text, at seeded offsets.

    The text is the shipped haystack (``dpe_gguf.texts.load_haystack()``) or the user's file at
    ``path``. When ``n_samples * n_chars`` fits in the text the chunks do not overlap: their starts
    are ``i * n_chars + u_i`` with ``u_0 <= u_1 <= ...`` drawn uniformly from the slack (a uniform
    random placement of non-overlapping chunks). Otherwise they are spread evenly with a seeded phase
    and overlap as little as the length allows. Same arguments, same chunks.
    """
    from dpe_gguf.texts import load_haystack

    for value, what in ((n_samples, "n_samples"), (n_chars, "n_chars")):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{what} must be a positive integer, got {value!r}")
    text = load_haystack(path)
    where = "the shipped calibration text" if path is None else str(path)
    if n_chars > len(text):
        raise ValueError(f"{where} has {len(text)} characters, fewer than n_chars = {n_chars}; "
                         "ask for shorter samples or give a longer text file")
    rng = random.Random(int(seed))
    slack = len(text) - n_samples * n_chars
    if slack >= 0:
        offsets = sorted(rng.randint(0, slack) for _ in range(n_samples))
        starts = [i * n_chars + u for i, u in enumerate(offsets)]
    else:
        span = len(text) - n_chars
        phase = rng.random()
        starts = [int((i + phase) * span / n_samples) for i in range(n_samples)]
    return [text[s:s + n_chars] for s in starts]


# ---------------------------------------------------------------------------------------------
# ggml access from Python (the few functions and struct fields the callback needs)
# ---------------------------------------------------------------------------------------------

class _TensorHead(ctypes.Structure):
    """The leading fields of ``struct ggml_tensor`` (ggml/include/ggml.h of the pinned llama.cpp):
    type, buffer, ne[4], nb[4], op. Only read, never written."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int)]


_GGML = None


def _ggml() -> ctypes.CDLL:
    """ctypes handle of the patched libggml-base (the copy libllama itself uses)."""
    global _GGML
    if _GGML is None:
        from dpe_gguf.llama.native import LIB_DIR
        name = {"darwin": "libggml-base.dylib", "win32": "ggml-base.dll"}.get(sys.platform, "libggml-base.so")
        lib = ctypes.CDLL(str(LIB_DIR / name))
        vp = ctypes.c_void_p
        for fn, res, args in (("ggml_get_name", ctypes.c_char_p, [vp]), ("ggml_op_desc", ctypes.c_char_p, [vp]),
                              ("ggml_nbytes", ctypes.c_size_t, [vp]), ("ggml_nelements", ctypes.c_int64, [vp]),
                              ("ggml_backend_tensor_get", None, [vp, vp, ctypes.c_size_t, ctypes.c_size_t])):
            f = getattr(lib, fn)
            f.restype, f.argtypes = res, args
        _GGML = lib
    return _GGML


# ---------------------------------------------------------------------------------------------
# The capture
# ---------------------------------------------------------------------------------------------

class _Capture:
    """State of the eval callback: which nodes to read and the running sums of ``|q| * |k|``."""

    def __init__(self, n_layer: int, n_head: int, n_head_kv: int, head_dim: int, n_rot: int, rope_type: str):
        self.n_layer, self.n_head, self.n_head_kv, self.head_dim = n_layer, n_head, n_head_kv, head_dim
        self.n_freq = n_rot // 2
        F = self.n_freq
        if rope_type == "normal":
            self.pair = (slice(0, 2 * F, 2), slice(1, 2 * F, 2))
        elif rope_type == "neox":
            self.pair = (slice(0, F), slice(F, 2 * F))
        else:
            raise DPEError(f"rope type {rope_type!r}: key selection supports NORMAL and NEOX rope")
        self.lib = _ggml()
        self.wanted = {}
        for il in range(n_layer):
            self.wanted[f"Qcur-{il}".encode()] = (0, il)
            self.wanted[f"Kcur-{il}".encode()] = (1, il)
        self.sums = np.zeros((n_layer, n_head, F), dtype=np.float64)   # sum_t |q| |k| of the current text
        self.tokens = np.zeros(n_layer, dtype=np.int64)                  # tokens summed per layer
        self.pending: list[dict[int, np.ndarray]] = [{}, {}]              # Q / K norms waiting for their pair
        self.buf = np.empty(0, dtype=np.uint8)
        self.error: BaseException | None = None
        self.callback = None  # the ctypes function object; kept alive as long as the context

    def reset(self) -> None:
        self.sums[:] = 0
        self.tokens[:] = 0
        self.pending = [{}, {}]

    def _want(self, t: int) -> tuple[int, int] | None:
        hit = self.wanted.get(self.lib.ggml_get_name(t))
        if hit is None or self.lib.ggml_op_desc(t) == b"ROPE":
            return None
        head = _TensorHead.from_address(t)
        n_heads = self.n_head if hit[0] == 0 else self.n_head_kv
        if head.ne[0] != self.head_dim or head.ne[1] != n_heads or head.ne[3] != 1:
            return None   # the 2-D projection / bias nodes of the same name
        return hit

    def __call__(self, t: int, ask: bool, user_data) -> bool:
        try:
            hit = self._want(t)
            if hit is None:
                return False   # not ours: nothing to read (ask), or keep going (after compute)
            if ask:
                return True
            self._read(t, *hit)
            return True
        except BaseException as e:  # noqa: BLE001  (an exception must not cross the C boundary)
            if self.error is None:
                self.error = e
            return False

    def _read(self, t: int, kind: int, il: int) -> None:
        head = _TensorHead.from_address(t)
        if head.type != GGML_TYPE_F32:
            raise DPEError(f"{self.lib.ggml_get_name(t).decode()} has ggml type {head.type}, expected F32")
        if not head.buffer:
            raise DPEError(f"{self.lib.ggml_get_name(t).decode()} has no backend buffer")
        nbytes = self.lib.ggml_nbytes(t)
        if self.buf.size < nbytes:
            self.buf = np.empty(nbytes, dtype=np.uint8)
        self.lib.ggml_backend_tensor_get(t, self.buf.ctypes.data, 0, nbytes)
        ne, nb = tuple(head.ne), tuple(head.nb)
        # NumPy view (n_tokens, n_heads, head_dim) of ggml's [head_dim, n_heads, n_tokens] (strided)
        x = np.lib.stride_tricks.as_strided(self.buf[:nbytes].view(np.float32),
                                            shape=(ne[2], ne[1], ne[0]), strides=(nb[2], nb[1], nb[0]),
                                            writeable=False)
        a = x[..., self.pair[0]].astype(np.float64)
        b = x[..., self.pair[1]].astype(np.float64)
        norms = np.sqrt(a * a + b * b)           # (n_tokens, n_heads, F)
        other = self.pending[1 - kind].pop(il, None)
        if other is None:
            if il in self.pending[kind]:
                raise DPEError(f"two pre-RoPE {'QK'[kind]}cur-{il} nodes before their pair: unexpected graph")
            self.pending[kind][il] = norms
            return
        qn, kn = (norms, other) if kind == 0 else (other, norms)
        if qn.shape[0] != kn.shape[0]:
            raise DPEError(f"layer {il}: {qn.shape[0]} query tokens but {kn.shape[0]} key tokens")
        group = self.n_head // self.n_head_kv
        T, F = qn.shape[0], self.n_freq
        # sum_t |q_t,(h,g),f| * |k_t,h,f| -> (n_head_kv, group, F) -> query head h * group + g
        c = np.einsum("thgf,thf->hgf", qn.reshape(T, self.n_head_kv, group, F), kn)
        self.sums[il] += c.reshape(self.n_head, F)
        self.tokens[il] += T


def key_scores(model: str | Path, texts: list[str], n_tokens: int = 2048, n_gpu_layers: int = 0,
               progress: bool = True, *, n_threads: int | None = None, n_ubatch: int = 512,
               f32_attention: bool = False) -> np.ndarray:
    """Key-frequency scores ``c`` folded into KV heads: float64 ``(n_layer, n_head_kv, F)``.

    Each text is tokenized (BOS as the model's vocabulary says), cut to its first ``n_tokens``
    tokens, and run once through the patched llama.cpp (``n_gpu_layers`` offloaded) in ubatches of
    ``n_ubatch`` tokens; texts under 64 tokens are an error. A DPE file runs with DPE off
    (``dpe.window = 0``): the pre-RoPE queries and keys do not depend on it.
    ``n_threads``: CPU threads (default: all cores). ``f32_attention``: F32 KV cache and no flash
    attention, so that attention (and with it every layer after the first) runs in float32 as the
    reference does, instead of llama.cpp's defaults (F16 cache, flash attention where available);
    the scores then match the float64 reference to ~1e-6 instead of ~1e-4, at twice the cache memory.
    See the module docstring for the definition of the scores.
    """
    import llama_cpp

    path = Path(model)
    with open_reader(path) as reader:
        info = ModelInfo.from_reader(reader, path=path)
        dpe_file = has_dpe(reader)
    if isinstance(texts, str) or not texts:
        raise DPEError("give a non-empty list of calibration texts (see calibration_texts)")
    if n_tokens < MIN_TOKENS:
        raise DPEError(f"n_tokens = {n_tokens}: need at least {MIN_TOKENS} tokens per text")
    if n_ubatch < 1:
        raise DPEError(f"n_ubatch must be >= 1, got {n_ubatch}")
    n_threads = n_threads or os.cpu_count() or 1

    cap = _Capture(info.n_layer, info.n_head, info.n_head_kv, info.head_dim, info.n_rot, info.rope_type)
    cap.callback = llama_cpp.ggml_backend_sched_eval_callback(cap)
    totals = np.zeros((info.n_layer, info.n_head, info.n_freq), dtype=np.float64)

    bar = None
    try:
        with LlamaSession(path, n_gpu_layers=n_gpu_layers,
                          kv_overrides={"dpe.window": 0} if dpe_file else None) as session:
            token_lists = []
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise DPEError(f"text {i} is not a string")
                ids = session.tokenize(text, limit=n_tokens)
                if len(ids) < MIN_TOKENS:
                    raise DPEError(f"calibration text {i} has {len(ids)} tokens; each text needs at least "
                                   f"{MIN_TOKENS} (give longer samples)")
                token_lists.append(ids)
            session.open_context(n_ctx=max(len(ids) for ids in token_lists), n_batch=n_ubatch, n_threads=n_threads,
                                 flash_attn=False if f32_attention else None,
                                 type_kv=GGML_TYPE_F32 if f32_attention else None, cb_eval=cap.callback)
            n_ub = session.n_batch
            if progress:
                bar = _progress_bar(sum(len(ids) for ids in token_lists))
            for ti, ids in enumerate(token_lists):
                cap.reset()
                session.clear()
                for s in range(0, len(ids), n_ub):
                    chunk = ids[s:s + n_ub]
                    rc = session.decode(chunk, s, [j == len(chunk) - 1 for j in range(len(chunk))])
                    if cap.error is not None:
                        raise DPEError(f"reading queries and keys failed: {cap.error}") from cap.error
                    if rc != 0:
                        raise DPEError(f"llama_decode failed with code {rc} on text {ti}")
                    if cap.pending[0] or cap.pending[1]:
                        raise DPEError("a pre-RoPE query or key had no partner in its ubatch: unexpected graph")
                    if bar is not None:
                        bar.update(len(chunk))
                missing = np.flatnonzero(cap.tokens != len(ids))
                if missing.size:
                    raise DPEError(
                        f"{path}: captured pre-RoPE Q/K for {cap.tokens[missing[0]]} of {len(ids)} tokens in "
                        f"layer {missing[0]} (architecture {info.arch}); key selection knows the graphs that "
                        "name them Qcur-il / Kcur-il before ggml_rope_ext (llama, qwen2, ...)")
                totals += cap.sums / len(ids)
    finally:
        if bar is not None:
            bar.close()
    return fold_query_heads(totals / len(token_lists), info.n_head_kv)


def _progress_bar(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="key selection", unit="tok", disable=None, leave=False, dynamic_ncols=True)
