#!/usr/bin/env bash
# Peer libraries for `persona-axis bench steer` and `bench generate`, beside .venv's persona-axis.
set -euo pipefail
cd "$(dirname "$0")/.."
# steering-vectors asks for transformers<5 and repeng for numpy<2; both run with ours, so no dependency pins.
.venv/bin/python -m pip install --quiet --no-deps steering-vectors==0.12.2 repeng==0.4.0
# llama.cpp, the decode-speed reference, built from source (several minutes on 2 cores). Its default native
# build dies with "Illegal instruction" on these CPUs: build for the instruction sets /proc/cpuinfo lists.
flags="$(grep -m1 '^flags' /proc/cpuinfo || true)"
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) \
-DGGML_F16C=$(has f16c) -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VNNI=$(has avx512_vnni) \
-DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
  .venv/bin/python -m pip install --quiet --no-deps llama-cpp-python==0.3.36 diskcache==5.6.3
