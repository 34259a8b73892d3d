#!/bin/bash
# The GPU machine, after build.sh (issued at once: an idle machine goes back after 30 s), carrying
# .carry/smol.part2: the launch knobs of DPE's CUDA flash attention (csrc/ggml-cuda-dpe-fattn.cu, read once per
# process from the environment) swept on the kernel harness and on llama-bench, and `ncu --set full` of both
# engines' attention kernels at one shape.
#   DPE_FA_VEC_MIN_CHUNKS=n  each split of the decode kernel at least n chunks of 32 cells (0: the default rule)
#   DPE_FA_COMBINE_Y=y       the split combine's threads per dim
#   DPE_FA_SPLIT_CEIL=1      splits enough to fill the GPU's blocks (the old rule) instead of one wave's worth
# Outputs under $OUT (the tool brings back at most 8 files a call): harness.md (every bench/attention.py table,
# each under its knobs), tp-default.json (llama-bench rows), ncu-full-8192.txt; the other llama-bench tables on
# stdout.
source "$(dirname "$0")/model.sh"
/tmp/tbo -o DPE_FLASH_ATTN -b CUDA0 2>&1 | tail -1
(cd /tmp/t && timeout 150 python3 -m pytest -q tests/test_dpe_attention.py -k "cuda or store" 2>&1 | grep -E "^FAILED|passed|failed|rror" | head -20)
H="timeout 120 python3 /tmp/t/bench/attention.py --backend cuda --reps 20"
HM="$OUT/harness.md"
echo "## defaults" >> "$HM"; $H --n-kv 1024,8192,32768,131072 --prefill 512 >> "$HM" 2>&1
echo "## DPE_FA_SPLIT_CEIL=1" >> "$HM"; DPE_FA_SPLIT_CEIL=1 $H --n-kv 1024,8192,32768,131072 --prefill 512 >> "$HM" 2>&1
for v in 0 1 2 4; do
  for y in 4 16; do
    echo "## DPE_FA_VEC_MIN_CHUNKS=$v DPE_FA_COMBINE_Y=$y" >> "$HM"
    DPE_FA_VEC_MIN_CHUNKS=$v DPE_FA_COMBINE_Y=$y $H --n-kv 1024,8192,32768,131072 --prefill 0 >> "$HM" 2>&1
  done
done
grep -E "^## |^\| [dp]" "$HM"
TP="timeout 150 python3 /tmp/t/bench/throughput.py /tmp/smol.gguf /tmp/g2-16.gguf --ngl 99 --fa 1"
$TP --depths 0,8192,32768,65536 -p 4096 -n 64 -r 2 --json "$OUT/tp-default.json" 2>&1 | tail -9
for v in 2 4; do
  echo "== DPE_FA_VEC_MIN_CHUNKS=$v DPE_FA_COMBINE_Y=16"
  DPE_FA_VEC_MIN_CHUNKS=$v DPE_FA_COMBINE_Y=16 $TP --depths 0,8192,32768,65536 -p 0 -n 64 -r 2 2>&1 | tail -5
done
echo "== DPE_FA_SPLIT_CEIL=1"
DPE_FA_SPLIT_CEIL=1 $TP --depths 0,8192,32768 -p 4096 -n 0 -r 2 2>&1 | tail -4
# one prefill ubatch (512 rows at the end of 8192 cells) and one decode step of each engine, every ncu section
timeout 150 ncu --set full -k regex:"dpe_fattn|flash_attn" \
  python3 /tmp/t/bench/attention.py --backend cuda --reps 1 --n-kv 8192 --prefill 512 > "$OUT/ncu-full-8192.txt" 2>&1
grep -E "^  [a-z_:<>(), 0-9A-Za-z]+\(|Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|Executed Ipc A|Waves Per SM|L2 Hit|One or More|No Eligible" \
  "$OUT/ncu-full-8192.txt" | head -150
