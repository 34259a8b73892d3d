"""SmolLM2's 2k-token parity (tests/test_engine.py's SmolLM2 test) over several weight and ubatch shapes: stock's
and DPE's max |diff|, KL and argmax agreement to their float64 references, side by side, so the spread of
stock's own distance under rounding changes is measured beside DPE's (docs/RESULTS.md, "The SmolLM2 parity test
on AMX Xeons" for the CPU, "CUDA parity of step 6" for the GPU).

    python bench/amx_parity.py [--fa] [--ubatch 512,128,37] [--ngl 99] [--weights repacked,plain]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import dpe_gguf  # noqa: E402,F401  (before llama_cpp: the patched libllama)
import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402
from dpe_gguf import DPEParams, convert, read_dpe  # noqa: E402
from dpe_gguf.llama.session import LlamaSession  # noqa: E402
from dpe_gguf.models import default_model  # noqa: E402
from dpe_gguf.reference.parity import compare_logits, reference_logits  # noqa: E402
from test_engine import natural_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fa", action="store_true", help="flash attention on")
    ap.add_argument("--ubatch", default="512", help="ubatch sizes, comma-separated")
    ap.add_argument("--ngl", type=int, default=0, help="layers offloaded to the GPU (99: all)")
    ap.add_argument("--weights", default="repacked,plain",
                    help="CPU weight layouts to run, comma-separated: repacked (AMX where the CPU has it), plain")
    a = ap.parse_args()
    layouts = a.weights.split(",")
    if not set(layouts) <= {"repacked", "plain"}:
        ap.error(f"--weights: unknown layout in {a.weights!r} (repacked, plain)")
    model = default_model()
    work = Path(tempfile.mkdtemp(prefix="dpe-amx-"))
    dpe = convert(model, work / "smol.dpe.gguf", DPEParams(window=256, group_scales=(2, 2, 4, 4, 8, 8, 16, 16)),
                  progress=False)
    vocab = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(natural_text().encode(), add_bos=False)[:2048]
    vocab.close()

    def logits(path: Path, repack: bool, n_ubatch: int) -> np.ndarray:
        with LlamaSession(path, n_gpu_layers=a.ngl, repack=repack) as s:
            s.open_context(n_ctx=2048, n_batch=512, n_ubatch=n_ubatch, n_threads=2, flash_attn=a.fa)
            return s.prompt_logits(tokens)

    ref_dpe = reference_logits(dpe, tokens, chunk=512)
    _, table = read_dpe(dpe)
    ref_plain = reference_logits(model, tokens, np.ones_like(table), 256, chunk=512)
    print("| flash attn | weights | ubatch | stock max \\|diff\\| | DPE max \\|diff\\| | DPE / stock | KL mean stock / DPE "
          "| argmax stock / DPE |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for repack in (w == "repacked" for w in layouts):
        for ub in (int(u) for u in a.ubatch.split(",")):
            t = time.time()
            s, d = compare_logits(ref_plain, logits(model, repack, ub)), compare_logits(ref_dpe, logits(dpe, repack, ub))
            print(f"| {'on' if a.fa else 'off'} | {'repacked' if repack else 'plain'} | {ub} | {s.max_abs_diff:.3f} | "
                  f"{d.max_abs_diff:.3f} | {d.max_abs_diff / s.max_abs_diff:.2f} | {s.kl.mean():.2e} / {d.kl.mean():.2e} | "
                  f"{s.argmax_agreement:.4f} / {d.argmax_agreement:.4f} |"
                  f" <!-- {time.time() - t:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
