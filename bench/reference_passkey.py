"""First answer token of the PyTorch reference on passkey prompts (bench/passkey.py --write-prompts),
to check the engine's passkey answers against the spec on the same token ids.

    python bench/reference_passkey.py pk/ MODEL.gguf --scales 4 --window 1024 --length 16384 --depths 0.25,0.5

Prints the reference's top-5 first tokens per prompt (float32, CPU; ~13 min per 16k prompt on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import dpe_gguf  # noqa: F401  (before llama_cpp: the patched libllama)
import llama_cpp
from dpe_gguf.reference import model as reference


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompts", type=Path)
    ap.add_argument("model")
    ap.add_argument("--scales", default="4")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--depths", default="0.25,0.5")
    args = ap.parse_args(argv)
    depths = {float(d) for d in args.depths.split(",")}
    vocab = llama_cpp.Llama(args.model, vocab_only=True, verbose=False)
    model = reference.load_model(args.model, torch.float32)
    scales = [int(s) for s in args.scales.split(",")]
    table = reference.divisor_table(scales, model.n_layer, model.n_head_kv, model.n_freq)
    for t in json.loads((args.prompts / "passkey.json").read_text()):
        if t["length"] != args.length or t["depth"] not in depths:
            continue
        ids = vocab.tokenize(t["prompt"].encode(), add_bos=True, special=True)
        t0 = time.time()
        cache = reference.Cache()
        with torch.no_grad():
            for s in range(0, len(ids), 2048):
                logits = model.forward(ids[s:s + 2048], table, args.window, cache)
        top = torch.topk(logits[-1], 5)
        print(json.dumps(dict(depth=t["depth"], key=t["key"], n_tokens=len(ids), top_ids=top.indices.tolist(),
                              top_text=[vocab.detokenize([i]).decode(errors="replace") for i in top.indices.tolist()],
                              seconds=round(time.time() - t0, 1))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
