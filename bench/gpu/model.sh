#!/bin/bash
# Sourced by check.sh and tune.sh on the GPU machine (after build.sh), from the repository root, carrying
# .carry/smol.part2: SmolLM2 put together at /tmp/smol.gguf (the default model of the package) and its DPE file
# /tmp/g2-16.gguf (groups 2..16, w = 1024); leaves the shell in /tmp with R set to the repository root.
R=$(pwd)
cat /tmp/smol.part1 "$R/.carry/smol.part2" > /tmp/smol.gguf
export DPE_GGUF_DEFAULT_MODEL=/tmp/smol.gguf
cd /tmp
python3 -c "from dpe_gguf.cli import main; main()" convert /tmp/smol.gguf -o /tmp/g2-16.gguf \
  --scales 2,2,4,4,8,8,16,16 --window 1024 2>&1 | tail -1
