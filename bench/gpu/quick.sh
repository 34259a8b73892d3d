#!/bin/bash
# The GPU machine, one call when little device time is left: build.sh (same carry), then the CUDA checks that
# need no SmolLM2: test-backend-ops for DPE's ops, the float64 tests of the attention kernels and of the rope and
# near-score ops, and the engine's store test with every layer on the GPU (each path's logits bit for bit). About
# 400 s of build and 60 s of checks on the H200.
set -e
bash "$(dirname "$0")/build.sh" 2>&1 | tail -2
set +e
/tmp/tbo -o DPE_FLASH_ATTN -b CUDA0 2>&1 | tail -1
/tmp/tbo -o ROPE_DPE -b CUDA0 2>&1 | tail -1
cd /tmp/t
timeout 60 python3 -m pytest -q tests/test_dpe_attention.py -k "cuda or store" 2>&1 | grep -E "^FAILED|passed|failed|rror" | head
timeout 60 python3 -m pytest -q tests/test_rope_dpe.py -k "near_scores" 2>&1 | grep -E "^FAILED|passed|failed|rror" | head
DPE_TEST_NGL=99 timeout 100 python3 -m pytest -q tests/test_engine.py -k "store" 2>&1 | grep -E "^FAILED|passed|failed|bort"
