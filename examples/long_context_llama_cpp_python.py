"""A llama-cpp-python application reading a document longer than the model's trained context.

The only DPE-specific line is `import dpe_gguf` before `llama_cpp`: it points llama-cpp-python at
dpe-gguf's patched libllama, which runs DPE whenever the GGUF has DPE parameters. Everything else is
the ordinary `llama_cpp.Llama` API. `kv_overrides={"dpe.window": 0}` runs the same file as stock
llama.cpp, for comparison (`{"dpe.window": N}` changes the local window).

    python examples/long_context_llama_cpp_python.py                       # embedded SmolLM2, 16k tokens
    python examples/long_context_llama_cpp_python.py --model m.dpe.gguf --tokens 32768 --compare
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import dpe_gguf  # noqa: F401  -- before llama_cpp: load the patched libllama
import llama_cpp
from dpe_gguf.evaluation.demo import demo_model
from dpe_gguf.llama.native import build_info

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def build_document(llm: llama_cpp.Llama, n_tokens: int, depth: float, code: int) -> str:
    """About n_tokens of filler with one fact at relative depth `depth`, then the question."""
    fact = f"\nThe secret code of the vault is {code}. Remember it. {code} is the secret code.\n"
    question = "\nWhat is the secret code of the vault? The secret code of the vault is"
    per_filler = len(llm.tokenize(FILLER.encode() * 50, add_bos=False)) / 50
    fixed = len(llm.tokenize((fact + question).encode(), add_bos=False))
    n_fill = int((n_tokens - fixed - 8) / per_filler)
    at = int(n_fill * depth)
    return FILLER * at + fact + FILLER * (n_fill - at) + question


def ask(model: str, document: str, n_ctx: int, overrides: dict | None, n_gpu_layers: int) -> tuple[str, float]:
    llm = llama_cpp.Llama(model, n_ctx=n_ctx, n_batch=2048, n_ubatch=512, flash_attn=True,
                          n_gpu_layers=n_gpu_layers, kv_overrides=overrides, verbose=False)
    t0 = time.time()
    out = llm(document, max_tokens=8, temperature=0.0, top_k=1)
    return out["choices"][0]["text"], time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a DPE GGUF (default: the embedded SmolLM2 converted by `dpe-gguf demo`)")
    ap.add_argument("--tokens", type=int, default=16384, help="document length in tokens")
    ap.add_argument("--depth", type=float, default=0.3, help="where the fact sits (0 = start, 1 = end)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare", action="store_true", help="also ask stock llama.cpp (dpe.window = 0)")
    args = ap.parse_args(argv)
    model = args.model or str(demo_model())
    n_gpu_layers = -1 if build_info().get("cuda") else 0
    code = random.Random(args.seed).randint(100000, 999999)
    vocab = llama_cpp.Llama(model, vocab_only=True, verbose=False)
    document = build_document(vocab, args.tokens, args.depth, code)
    n_prompt = len(vocab.tokenize(document.encode()))
    n_ctx = n_prompt + 64
    runs = [("DPE", None)] + ([("stock", {"dpe.window": 0})] if args.compare else [])
    print(f"document: {n_prompt} tokens, secret code {code} at depth {args.depth}")
    ok_dpe = False
    for name, overrides in runs:
        answer, secs = ask(model, document, n_ctx, overrides, n_gpu_layers)
        found = str(code) in answer
        ok_dpe = ok_dpe or (name == "DPE" and found)
        print(f"{name:>5}: {answer.strip()!r} ({'correct' if found else 'wrong'}, {secs:.1f} s)")
    return 0 if ok_dpe else 1


if __name__ == "__main__":
    sys.exit(main())
