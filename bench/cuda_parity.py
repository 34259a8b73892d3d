"""Tiny-model parity on any backend: DPE engine vs DPE reference next to stock engine vs vanilla
reference, same tokens, through tests/test_engine.py's own helpers (F32 KV; flash attention off/on).

    DPE_TEST_NGL=99 python bench/cuda_parity.py tests      # on a CUDA machine, from the repo root
"""
import sys, os
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
import test_engine as T
from dpe_gguf.reference.parity import compare_logits, reference_logits
for arch in ("llama", "qwen2"):
    d = f"/tmp/cp-{arch}"; os.makedirs(d, exist_ok=True)
    plain, dpe, tokens, table = T.make_tiny(__import__("pathlib").Path(d), arch)
    for fa in (False, True):
        ref_d = reference_logits(dpe, tokens, dtype=torch.float64)
        ref_p = reference_logits(plain, tokens, np.ones_like(table), T.WINDOW, dtype=torch.float64)
        e_d = T.engine_logits(dpe, tokens, n_prompt=T.N_PROMPT, type_kv=T.F32 if not fa else None, flash_attn=fa)
        e_p = T.engine_logits(plain, tokens, n_prompt=T.N_PROMPT, type_kv=T.F32 if not fa else None, flash_attn=fa)
        rd, rp = compare_logits(ref_d, e_d), compare_logits(ref_p, e_p)
        span = ref_d.max() - ref_d.min()
        print(f"{arch} fa={fa} span={span:.2f} DPE: max {rd.max_abs_diff:.4g} ({rd.max_abs_diff/span:.2e} of span) argmax {rd.argmax_agreement:.3f} | "
              f"stock: max {rp.max_abs_diff:.4g} ({rp.max_abs_diff/span:.2e}) argmax {rp.argmax_agreement:.3f}", flush=True)
