"""One model and one context of the patched llama.cpp in this process (llama-cpp-python's C API).

For the measurements that need more than a server gives, such as a graph callback on every node
(key-frequency selection) or the logits of every position of a prompt (calibration's scores):

    with LlamaSession(path, n_gpu_layers=99) as s:
        ids = s.tokenize(text)
        s.open_context(n_ctx=4096, n_batch=512)
        s.decode(ids[:512], pos0=0, logits=[False] * 511 + [True])
        last = s.logits(511)

llama.cpp's log is silenced while the session is open. Everything is freed on close, including after
a set-up that failed part-way.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from dpe_gguf.errors import DPEError


@contextmanager
def quiet_llama_log():
    """llama.cpp's log (routed through llama_cpp's Python logger) silenced, then restored. It nests,
    and threads inside one outer use leave it as it was."""
    import llama_cpp._logger as llama_logger
    saved = llama_logger.logger.level
    llama_logger.set_verbose(False)
    try:
        yield
    finally:
        llama_logger.logger.setLevel(saved)


class LlamaSession:
    """``model`` loaded with ``n_gpu_layers`` offloaded; :meth:`open_context` adds one context (a
    single sequence) in which :meth:`decode` runs. ``kv_overrides``: integer metadata overrides, such
    as ``{"dpe.window": 0}`` (DPE off). ``repack=False`` is the programs' ``--no-repack`` (no extra
    CPU buffer types for the weights)."""

    def __init__(self, model: str | os.PathLike[str], *, n_gpu_layers: int = 0,
                 kv_overrides: dict[str, int] | None = None, repack: bool = True):
        import llama_cpp

        self.lib = llama_cpp
        self.path = Path(model)
        self.model = self.ctx = self.batch = None
        self._stack = ExitStack()
        self._stack.enter_context(quiet_llama_log())
        try:
            llama_cpp.llama_backend_init()
            mparams = llama_cpp.llama_model_default_params()
            mparams.n_gpu_layers = int(n_gpu_layers)
            mparams.use_extra_bufts = repack
            if kv_overrides:
                self._kvo = (llama_cpp.llama_model_kv_override * (len(kv_overrides) + 1))()
                for i, (key, value) in enumerate(kv_overrides.items()):
                    self._kvo[i].key = key.encode()
                    self._kvo[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
                    self._kvo[i].value.val_i64 = int(value)
                self._kvo[len(kv_overrides)].key = b"\0"
                mparams.kv_overrides = self._kvo
            self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
            if not self.model:
                raise DPEError(f"{self.path}: llama.cpp could not load the model")
            self.vocab = llama_cpp.llama_model_get_vocab(self.model)
            self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        except BaseException:
            self.close()
            raise

    def open_context(self, *, n_ctx: int, n_batch: int, n_ubatch: int | None = None, n_threads: int | None = None,
                     flash_attn: bool | None = None, type_kv: int | None = None, cb_eval=None) -> None:
        """A context of ``n_ctx`` tokens taking up to ``n_batch`` tokens per :meth:`decode`, run in ubatches
        of ``n_ubatch`` (default: one ubatch per decode).
        ``flash_attn``: None keeps llama.cpp's default. ``type_kv``: a ggml type id for K and V (None: F16).
        ``cb_eval``: a ``ggml_backend_sched_eval_callback`` called on every graph node."""
        lib = self.lib
        assert self.ctx is None, "one context per session"
        self.n_ctx = n_ctx
        self.n_batch = min(n_batch, n_ctx)
        threads = n_threads or os.cpu_count() or 1
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch if n_ubatch is None else min(n_ubatch, self.n_batch)
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        if flash_attn is not None:
            cparams.flash_attn_type = (lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                       else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        if type_kv is not None:
            cparams.type_k = cparams.type_v = type_kv
        if cb_eval is not None:
            cparams.cb_eval = cb_eval
            cparams.cb_eval_user_data = None
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise DPEError(f"{self.path}: llama.cpp could not create a context of {n_ctx} tokens")
        self.memory = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)

    def __enter__(self) -> "LlamaSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Free the batch, the context and the model (each may be missing), and restore the log."""
        lib = self.lib
        if self.batch is not None:
            lib.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            lib.llama_model_free(self.model)
            self.model = None
        self._stack.close()

    def tokenize(self, text: str, add_special: bool = True, limit: int | None = None) -> list[int]:
        """Token ids of ``text`` (BOS as the vocabulary says when ``add_special``), at most ``limit``."""
        lib = self.lib
        data = text.encode("utf-8")
        cap = len(data) + 8
        arr = (lib.llama_token * cap)()
        n = lib.llama_tokenize(self.vocab, data, len(data), arr, cap, add_special, False)
        if n < 0:
            raise DPEError(f"tokenization failed ({n})")
        return list(arr[:n if limit is None else min(n, limit)])

    def clear(self) -> None:
        """Empty the KV cache: the next decode starts a new prompt."""
        self.lib.llama_memory_clear(self.memory, True)

    def decode(self, ids: Sequence[int], pos0: int, logits: Sequence[bool]) -> int:
        """Decode ``ids`` at positions ``pos0, pos0 + 1, ...`` (sequence 0; at most ``n_batch`` of them),
        with the logits of the positions where ``logits`` is true; returns llama_decode's code."""
        if len(ids) > self.n_batch or len(logits) != len(ids):
            raise ValueError(f"decode: {len(ids)} ids (at most {self.n_batch}) and {len(logits)} logits flags")
        b = self.batch
        for j, tok in enumerate(ids):
            b.token[j] = tok
            b.pos[j] = pos0 + j
            b.n_seq_id[j] = 1
            b.seq_id[j][0] = 0
            b.logits[j] = bool(logits[j])
        b.n_tokens = len(ids)
        return self.lib.llama_decode(self.ctx, b)

    def prompt_logits(self, ids: Sequence[int]) -> np.ndarray:
        """float64 logits at every position of ``ids`` (sequence 0 from position 0, in decodes of ``n_batch``)."""
        out = []
        for c in range(0, len(ids), self.n_batch):
            chunk = ids[c:c + self.n_batch]
            code = self.decode(chunk, c, [True] * len(chunk))
            if code != 0:
                raise DPEError(f"{self.path}: llama_decode returned {code} at position {c}")
            out += [self.logits(j).astype(np.float64) for j in range(len(chunk))]
        return np.stack(out)

    def logits(self, j: int) -> np.ndarray:
        """The float32 logits of the last decode's ``j``-th token (a view: copy it to keep it)."""
        return np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, j), shape=(self.n_vocab,))
