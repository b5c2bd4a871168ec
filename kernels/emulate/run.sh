#!/usr/bin/env bash
# Runs sdstream's plain CUDA kernels on the CPU (kernels/emulate/emulate.h) against their
# formulas: each *.cpp here includes one .cu file of kernels/src and checks its kernels. Needs g++
# (C++20, x86-64) and CUDA's headers, which scripts/cuda-toolchain.sh installs from the package
# index (no GPU, no CUDA install). Exits non-zero when a check fails or nothing could be built.
#
#   bash kernels/emulate/run.sh              # every check
#   EMULATE_VERBOSE=1 bash kernels/emulate/run.sh group_norm   # one file, every check's line
set -euo pipefail
cd "$(dirname "$0")"

# The fibers switch stacks with a few x86-64 instructions (emulate.h).
if [[ "$(uname -m)" != x86_64 ]]; then
  echo "kernels/emulate: the stand-in runs on x86-64 only, not $(uname -m)" >&2
  exit 1
fi
if [[ -z "${CUDA_INCLUDE:-}" ]]; then
  eval "$(bash ../../scripts/cuda-toolchain.sh)"
  CUDA_INCLUDE="$(dirname "$(dirname "$(command -v nvcc)")")/include"
fi
[[ -f "$CUDA_INCLUDE/cuda_fp16.h" ]] || {
  echo "kernels/emulate: no cuda_fp16.h under $CUDA_INCLUDE" >&2
  exit 1
}
out="${CARGO_TARGET_DIR:-../../target}/emulate"
mkdir -p "$out"

names=("$@")
if [[ ${#names[@]} -eq 0 ]]; then
  for source in *.cpp; do names+=("${source%.cpp}"); done
fi
for name in "${names[@]}"; do
  # -w: CUDA's headers and the kernels' attributes warn under a host compiler.
  g++ -std=c++20 -O1 -w -I"$CUDA_INCLUDE" -include emulate.h "$name.cpp" -o "$out/$name"
  "$out/$name"
done
