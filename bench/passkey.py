"""Passkey retrieval through the patched llama.cpp: stock vs DPE GGUFs, side by side.

The prompts of `dpe-gguf eval`'s passkey task (dpe_gguf.evaluation.tasks: the classic filler, a 5-digit key)
at evenly spaced depths, greedy decoding; a trial passes when the first generated tokens contain the key.
Prompts are text, sized with the model's tokenizer; the runner is llama-completion (what users run).

    python bench/passkey.py MODEL.gguf [MODEL.dpe.gguf ...] --lengths 16384,32768 --depths 5 --ngl 99
    python bench/passkey.py --write-prompts DIR MODEL.gguf --lengths ...   # prompts only (run elsewhere)
    python bench/passkey.py --prompts DIR MODEL.gguf ...                    # run prompts written before
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

def count_tokens(model: str):
    """A function text -> number of tokens, with the model's own tokenizer (patched libllama)."""
    import dpe_gguf  # noqa: F401
    import llama_cpp
    llm = llama_cpp.Llama(model, vocab_only=True, verbose=False)
    return lambda s: len(llm.tokenize(s.encode(), add_bos=False))


def make_trials(lengths, depths: int, seed: int, count) -> list[dict]:
    """The prompts of `dpe-gguf eval`'s passkey task (dpe_gguf.evaluation.tasks), `depths` evenly spaced depths per length."""
    from dpe_gguf.evaluation import tasks as evaltasks
    trials = []
    for n in lengths:
        for d in range(depths):
            depth = d / max(depths - 1, 1)
            sample = evaltasks.make_sample("passkey", n, depth, seed, count, index=d)
            trials.append(dict(length=n, depth=round(depth, 2), key=int(sample.answers[0]), prompt=sample.prompt))
    return trials


def run_cli(binary: str, model: str, trial: dict, ngl: int, fa: bool, extra: list[str]) -> dict:
    prompt_file = Path(f"/tmp/passkey-{trial['length']}-{trial['key']}.txt")
    prompt_file.write_text(trial["prompt"])
    cmd = [binary, "-m", model, "-f", str(prompt_file), "-n", "8", "--temp", "0", "-no-cnv",
           "--no-display-prompt", "-c", str(trial["length"] + 256), "-b", "2048", "-ub", "512",
           "-ngl", str(ngl), "-fa", "on" if fa else "off", "--no-warmup", *extra]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    answer = res.stdout.strip()
    return dict(model=Path(model).name, length=trial["length"], depth=trial["depth"], key=trial["key"],
                answer=answer[:40], ok=res.returncode == 0 and str(trial["key"]) in answer,
                rc=res.returncode, seconds=round(time.time() - t0, 2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--lengths", default="16384,32768")
    ap.add_argument("--depths", type=int, default=5)
    ap.add_argument("--ngl", type=int, default=0)
    ap.add_argument("--fa", action="store_true", help="flash attention on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cli", default=shutil.which("llama-completion") or "llama-completion")
    ap.add_argument("--write-prompts", metavar="DIR", help="write the prompts (JSON) and stop")
    ap.add_argument("--prompts", metavar="DIR", help="use prompts written by --write-prompts")
    ap.add_argument("--json", help="write all rows here")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.prompts:
        trials = json.loads((Path(args.prompts) / "passkey.json").read_text())
        lengths = sorted({t["length"] for t in trials})
    else:
        trials = make_trials(lengths, args.depths, args.seed, count_tokens(args.models[0]))
    if args.write_prompts:
        Path(args.write_prompts).mkdir(parents=True, exist_ok=True)
        (Path(args.write_prompts) / "passkey.json").write_text(json.dumps(trials))
        return 0
    rows = []
    for m in args.models:
        for t in trials:
            rows.append(run_cli(args.cli, m, t, args.ngl, args.fa, []))
            print(json.dumps(rows[-1]), flush=True)
    n_depths = len(trials) // len(lengths)
    print("\n| model | " + " | ".join(str(n) for n in lengths) + " |")
    print("| --- |" + " --- |" * len(lengths))
    for m in args.models:
        name = Path(m).name
        cells = [f"{sum(r['ok'] for r in rows if r['model'] == name and r['length'] == n)}/{n_depths}"
                 for n in lengths]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
