"""llama-server with 4 slots: do concurrent greedy answers equal the serial ones, for a DPE model and for stock
(the same file with --dpe off) under the same load? (issue #19)

Four prompts of natural text (the standard library's documentation, as tests/test_engine.py uses), each sent
once serially, then all four twice by 8 concurrent clients, prompts never cached (each request is prefilled in
batches shared with the others). Per model: how many concurrent answers differ from the serial one, and the
largest |difference| of the top-5 log-probabilities over the tokens both runs share.

    python bench/server_concurrency.py MODEL.dpe.gguf [--tokens 1500] [-- llama-server flags...]
"""
from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import dpe_gguf  # noqa: E402,F401  (before llama_cpp: the patched libllama)
import llama_cpp  # noqa: E402
from dpe_gguf.llama.runtime import RunSettings, Server  # noqa: E402
from test_engine import natural_text  # noqa: E402


def answer(server: Server, prompt: str, n_predict: int) -> list[tuple[int, dict[int, float]]]:
    res = server.post("/completion", {"prompt": prompt, "n_predict": n_predict, "temperature": 0.0, "n_probs": 5,
                                       "cache_prompt": False})
    return [(t["id"], {c["id"]: c["logprob"] for c in t["top_logprobs"]}) for t in res["completion_probabilities"]]


def probe(model: Path, prompts: list[str], flags: list[str], n_predict: int, threads: int) -> tuple[int, float]:
    n_ctx = 4*4096
    with Server(model, n_ctx, extra_args=["-np", "4", *flags], settings=RunSettings(threads=threads)) as srv:
        serial = [answer(srv, p, n_predict) for p in prompts]
        conc: list = [None]*8
        def run(k: int) -> None:
            conc[k] = answer(srv, prompts[k % 4], n_predict)
        workers = [threading.Thread(target=run, args=(k,)) for k in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    differ, max_d = 0, 0.0
    for k in range(8):
        s, c = serial[k % 4], conc[k]
        differ += [t for t, _ in s] != [t for t, _ in c]
        for (ta, pa), (tb, pb) in zip(s, c):
            max_d = max([max_d] + [abs(pa[i] - pb[i]) for i in pa if i in pb])
            if ta != tb:
                break
    return differ, max_d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dpe", type=Path)
    ap.add_argument("--tokens", type=int, default=1500, help="prompt length in tokens")
    ap.add_argument("-n", type=int, default=12, help="tokens generated per answer")
    ap.add_argument("-t", type=int, default=2, help="threads")
    ap.add_argument("flags", nargs="*", help="llama-server flags for both runs (after --)")
    a = ap.parse_args()
    vocab = llama_cpp.Llama(str(a.dpe), vocab_only=True, verbose=False)
    toks = vocab.tokenize(natural_text().encode(), add_bos=False)
    step = a.tokens + 200
    assert len(toks) >= 4*step, f"the text has {len(toks)} tokens; need {4*step}"
    prompts = [vocab.detokenize(toks[i*step:i*step + a.tokens]).decode(errors="ignore") for i in range(4)]
    vocab.close()
    print("| model | flags | concurrent answers unlike the serial one | max \\|d logprob\\| (shared tokens) |")
    print("| --- | --- | --- | --- |")
    for name, extra in (("DPE", []), ("stock (--dpe off)", ["--dpe", "off"])):
        differ, max_d = probe(a.dpe, prompts, [*extra, *a.flags], a.n, a.t)
        print(f"| {name} | {' '.join(a.flags) or '(defaults)'} | {differ}/8 | {max_d:.3f} |", flush=True)


if __name__ == "__main__":
    main()
