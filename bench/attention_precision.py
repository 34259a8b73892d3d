"""DPE's flash attention against the float64 reference, beside stock's, on CUDA and the CPU: max |out - ref| for
each case of tests/test_dpe_attention.py (F16 K/V), the table in docs/RESULTS.md ("step 3").

    python bench/attention_precision.py tests      # on a CUDA build, from outside the checkout's dpe_gguf
"""
import sys
import zlib

import numpy as np

sys.path.insert(0, sys.argv[1])
import test_dpe_attention as t  # noqa: E402

print(f"{'case':26} {'DPE CUDA':>10} {'stock CUDA':>10} {'DPE CPU':>10}")
for name in sorted(t.CASES):
    rng = np.random.default_rng(zlib.crc32(f"{name}/f16".encode()))
    c = t.make_case(rng, **t.CASES[name])
    o, r = t.run_case(c, "f16", "cuda")
    so, sr = t.run_case(c, "f16", "cuda", stock=True)
    co, cr = t.run_case(c, "f16", "cpu", n_threads=8)
    print(f"{name:26} {np.abs(o - r).max():10.2e} {np.abs(so - sr).max():10.2e} {np.abs(co - cr).max():10.2e}",
          flush=True)
