"""Throughput of DPE against stock llama.cpp, as ratios from one llama-bench run on one machine.

Stock is the same file with `--dpe off` when given a DPE GGUF only, or a separate stock GGUF; both run
in the same llama-bench invocation (interleaved repetitions), so the ratio is not a comparison of two
machines or two moments.

    python bench/throughput.py STOCK.gguf DPE.gguf --ngl 99 --depths 0,8192,32768 --fa 1,0
    python bench/throughput.py STOCK.gguf DPE.gguf --ngl 0 --depths 0,4096 -p 512 -n 16   # CPU
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stock")
    ap.add_argument("dpe")
    ap.add_argument("--ngl", default="99")
    ap.add_argument("--fa", default="1,0", help="flash attention values (llama-bench -fa)")
    ap.add_argument("--depths", default="0,8192,32768", help="tokens already in the cache (llama-bench -d)")
    ap.add_argument("-p", default="4096", help="prompt tokens (prefill test)")
    ap.add_argument("-n", default="64", help="generated tokens (decode test)")
    ap.add_argument("-r", default="2", help="repetitions")
    ap.add_argument("--json", help="write llama-bench's rows here")
    args = ap.parse_args(argv)
    import dpe_gguf  # noqa: F401  (the patched build)
    from dpe_gguf.llama.native import tool_path
    cmd = [str(tool_path("llama-bench")), "-m", f"{args.stock},{args.dpe}", "-ngl", args.ngl, "-fa", args.fa,
           "-d", args.depths, "-p", args.p, "-n", args.n, "-r", args.r, "-o", "json"]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr)
        return res.returncode
    rows = json.loads(res.stdout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    by = {}
    for r in rows:
        test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        key = (r["flash_attn"], test, r["n_depth"])
        by.setdefault(key, {})[r["model_filename"]] = r["avg_ts"]
    print("| fa | test | depth | stock t/s | DPE t/s | DPE / stock |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (fa, test, depth), v in sorted(by.items(), key=lambda kv: (-int(kv[0][0]), kv[0][1], kv[0][2])):
        s, d = v.get(args.stock), v.get(args.dpe)
        if s and d:
            print(f"| {'on' if fa else 'off'} | {test} | {depth} | {s:,.0f} | {d:,.0f} | {d / s:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
