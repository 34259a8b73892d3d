#!/bin/bash
# The GPU machine, call 2 of 2 (issued at once after build.sh: an idle machine goes back after 30 s), carrying
# .carry/smol.part2: the model, the CUDA checks, the SmolLM2 parity spread and the throughput of both engines.
# Outputs under $OUT: fa.json (llama-bench rows).
R=$(pwd)
cat /tmp/smol.part1 "$R/.carry/smol.part2" > /tmp/smol.gguf
export DPE_GGUF_DEFAULT_MODEL=/tmp/smol.gguf
cd /tmp
python3 -c "from dpe_gguf.cli import main; main()" convert /tmp/smol.gguf -o /tmp/g2-16.gguf \
  --scales 2,2,4,4,8,8,16,16 --window 1024 2>&1 | tail -1
/tmp/tbo -o ROPE_DPE -b CUDA0 2>&1 | tail -2
/tmp/tbo -o DPE_FLASH_ATTN -b CUDA0 2>&1 | tail -2
cd /tmp/t
python3 -m pytest -q -x tests/test_rope_dpe.py 2>&1 | tail -1
python3 -m pytest -q tests/test_dpe_attention.py -k cuda 2>&1 | tail -1
DPE_TEST_NGL=99 timeout 300 python3 -m pytest -q tests/test_engine.py -k "not smollm2" 2>&1 | grep -E "^FAILED|passed|failed|bort"
timeout 200 python3 bench/amx_parity.py --fa --ngl 99 --weights plain --ubatch 512,256,128 2>&1 | grep "^|"
python3 bench/throughput.py /tmp/smol.gguf /tmp/g2-16.gguf --ngl 99 --fa 1 --depths 0,8192,32768,65536 \
  -p 4096 -n 64 -r 2 --json "$OUT/fa.json" 2>&1 | tail -11
