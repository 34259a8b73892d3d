"""Passkey retrieval through the patched llama.cpp (llama-cpp-python): stock vs DPE GGUFs.

The classic filler ("The grass is green. ..."), a 5-digit key at evenly spaced depths, greedy
decoding; a trial passes when the generated text contains the key. The prompt is the spec's
anchor setup (dpe-spec.md section 6).

    python bench/passkey.py MODEL.gguf [MODEL.dpe.gguf ...] --lengths 16384,32768 --depths 5 --ngl 99 --fa
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time

import dpe_gguf  # noqa: F401  (before llama_cpp: the patched libllama)
import llama_cpp

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n\n")
QUESTION = "\n\nWhat is the pass key? The pass key is"


def passkey_prompt(llm: llama_cpp.Llama, n_tokens: int, depth: float, key: int) -> list[int]:
    """Token ids of a prompt of about n_tokens with the key at relative depth `depth`."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    tok = lambda s: llm.tokenize(s.encode(), add_bos=False)  # noqa: E731
    head, needle_ids, tail, filler = tok(TASK), tok(needle), tok(QUESTION), tok(FILLER)
    budget = n_tokens - len(head) - len(needle_ids) - len(tail) - 1
    body = (filler * (budget // len(filler) + 1))[:budget]
    at = int(len(body) * depth)
    bos = [llm.token_bos()] if llm.token_bos() >= 0 else []
    return bos + head + body[:at] + needle_ids + body[at:] + tail


def run(model: str, lengths: list[int], depths: int, ngl: int, fa: bool, seed: int, dpe: str | None) -> list[dict]:
    rows = []
    n_ctx = max(lengths) + 64
    overrides = {"dpe.window": 0} if dpe == "off" else None
    llm = llama_cpp.Llama(model, n_ctx=n_ctx, n_batch=2048, n_ubatch=512, n_gpu_layers=ngl, flash_attn=fa,
                          verbose=False, kv_overrides=overrides)
    rng = random.Random(seed)
    for n in lengths:
        for d in range(depths):
            depth = d / max(depths - 1, 1)
            key = rng.randint(10000, 99999)
            ids = passkey_prompt(llm, n, depth, key)
            llm.reset()
            t0 = time.time()
            out = llm.generate(ids, temp=0.0, top_k=1)
            toks = []
            for t in out:
                if t == llm.token_eos() or len(toks) >= 8:
                    break
                toks.append(t)
            text = llm.detokenize(toks).decode(errors="replace")
            ok = str(key) in text
            rows.append(dict(model=model, dpe=dpe or "file", length=n, depth=round(depth, 2), key=key,
                             answer=text.strip(), ok=ok, seconds=round(time.time() - t0, 2)))
            print(json.dumps(rows[-1]), flush=True)
    llm.close()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--lengths", default="16384,32768")
    ap.add_argument("--depths", type=int, default=5)
    ap.add_argument("--ngl", type=int, default=0)
    ap.add_argument("--fa", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write all rows here")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for m in args.models:
        rows += run(m, lengths, args.depths, args.ngl, args.fa, args.seed, None)
    print("\nmodel | " + " | ".join(str(n) for n in lengths))
    for m in args.models:
        cells = [f"{sum(r['ok'] for r in rows if r['model'] == m and r['length'] == n)}/{args.depths}"
                 for n in lengths]
        print(f"{m} | " + " | ".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
