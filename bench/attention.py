"""Kernel harness: DPE's flash attention (GGML_OP_DPE_FLASH_ATTN) against stock's (GGML_OP_FLASH_ATTN_EXT)
of the same shape, alone, on one ggml backend: the ratio stock time / DPE time (1.0 = stock's speed).

Correctness is tests/test_dpe_attention.py (float64 NumPy reference, the same op and inputs of this kind);
this script only times. Shapes default to SmolLM2-135M (9 query heads, 3 KV heads, head dim 64).

    python bench/attention.py                                  # CPU, decode and prefill, n_kv 1k..64k
    python bench/attention.py --backend cuda --n-kv 1024,8192,32768,131072 --prefill 512
"""
from __future__ import annotations

import argparse


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-kv", default="1024,4096,16384,65536", help="cache sizes")
    ap.add_argument("--prefill", type=int, default=512, help="query rows of the prefill case (0: skip)")
    ap.add_argument("--heads", default="9,3", help="query heads, KV heads")
    ap.add_argument("--d", type=int, default=64, help="head dim")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--kv-type", default="f16")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    from dpe_gguf import _native

    n_head, n_head_kv = (int(x) for x in args.heads.split(","))
    cases = [("decode", 1)] + ([("prefill", args.prefill)] if args.prefill else [])
    print(f"backend {args.backend}, threads {args.threads}, heads {n_head}/{n_head_kv}, d {args.d}, "
          f"window {args.window}, K/V {args.kv_type}")
    print("| case | n_kv | stock ms | DPE ms | stock / DPE |")
    print("| --- | --- | --- | --- | --- |")
    for name, n_tps in cases:
        for n_kv in (int(x) for x in args.n_kv.split(",")):
            if n_kv < n_tps:
                continue
            reps = args.reps if n_tps == 1 else max(2, args.reps // 4)
            kw = dict(n_kv=n_kv, n_tps=n_tps, n_head=n_head, n_head_kv=n_head_kv, d=args.d, window=args.window,
                      kv_type=args.kv_type, reps=reps, backend=args.backend, n_threads=args.threads)
            t_stock = _native.bench_attention(dpe=False, **kw)
            t_dpe = _native.bench_attention(dpe=True, **kw)
            print(f"| {name} ({n_tps} rows) | {n_kv} | {t_stock * 1e3:.3f} | {t_dpe * 1e3:.3f} | "
                  f"{t_stock / t_dpe:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
