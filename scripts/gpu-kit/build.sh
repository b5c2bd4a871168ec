#!/usr/bin/env bash
# Builds, on a machine with no GPU, what a GPU machine needs to test and benchmark the `cuda`
# feature without a Rust toolchain or network there (docs/GPU.md):
#   KIT/bench.xz        examples/bench, release, stripped, xz-compressed
#   KIT/attention-bench.xz  examples/attention_bench (attention alone), likewise
#   KIT/cuda-tests.xz   the test binary of core/tests/cuda.rs, likewise
#   KIT/fixtures.tar.xz the tiny fixtures those tests read (tests/fixtures, the parts they use)
#   KIT/full_size_manifest.json, KIT/full_size_manifest_sdxl.json, KIT/random_weights.py
#                       full-size random weights drawn on the GPU machine with torch alone
#   KIT/BUILD.txt       what was built, from which commit, with which toolchain
# KIT is target/gpu-kit (or $1): inside the repository, ignored by git, so the device tool can
# carry it (`carry: ["target/gpu-kit"]`). The binaries link against CUDA 13's libraries (cuBLAS,
# cuBLASLt, cuRAND, NVRTC, the CUDA runtime) and the driver's libcuda.so.1; scripts/gpu-kit/run.sh
# finds them on the GPU machine. The CUDA kernels are compiled for CUDA_COMPUTE_CAP (default 90:
# H100/H200).
set -euo pipefail
cd "$(dirname "$0")/../.."

kit="${1:-target/gpu-kit}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
eval "$(bash scripts/cuda-toolchain.sh --link)"

# cudarc's build script adds CUDA_ROOT/lib and lib/stubs to the link search: the libraries are
# linked by name (libcublas.so …), and the binaries ask for their sonames (libcublas.so.13 …).
cargo build --release -p sdstream --features cudnn --example bench --example attention_bench
test_bin="$(cargo test --release -p sdstream --features cudnn --test cuda --no-run \
  --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda":
        print(m["executable"])')"
bench_bin="$CARGO_TARGET_DIR/release/examples/bench"
attention_bin="$CARGO_TARGET_DIR/release/examples/attention_bench"
if [[ -z "$test_bin" || ! -x "$test_bin" || ! -x "$bench_bin" || ! -x "$attention_bin" ]]; then
  echo "gpu-kit: the binaries were not built" >&2
  exit 1
fi

rm -rf "$kit"
mkdir -p "$kit"
for pair in "bench:$bench_bin" "attention-bench:$attention_bin" "cuda-tests:$test_bin"; do
  name="${pair%%:*}"
  bin="${pair#*:}"
  strip -o "$kit/$name" "$bin"
  xz -9 -T1 -f "$kit/$name"
done

# The fixtures core/tests/cuda.rs reads, as tests/fixtures lays them out.
(
  cd tests/fixtures
  tar -cJf - tiny-sd-turbo tiny-taesd tiny-controlnet-a tiny-controlnet-b frames \
    tiny-sdxl/scheduler tiny-sdxl/tokenizer tiny-sdxl/tokenizer_2 \
    golden/streams.json golden/controlnet_streams.json golden/stream_*.safetensors
) > "$kit/fixtures.tar.xz"
cp tests/reference/full_size_manifest.json tests/reference/full_size_manifest_sdxl.json \
  scripts/gpu-kit/random_weights.py "$kit/"

{
  echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD -- . ':!target' || echo ' (with uncommitted changes)')"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "rustc: $(rustc --version)"
  echo "nvcc: $(nvcc --version | tail -2 | head -1)"
  echo "CUDA_COMPUTE_CAP: $CUDA_COMPUTE_CAP"
  echo "needs: $(cd "$kit" && xz -dc cuda-tests.xz > /tmp/gpu-kit-probe.$$ && \
    readelf -d /tmp/gpu-kit-probe.$$ | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' '; \
    rm -f /tmp/gpu-kit-probe.$$)"
} > "$kit/BUILD.txt"
cat "$kit/BUILD.txt"
du -b "$kit"/* | sort -n
echo "total: $(du -cb "$kit"/* | tail -1 | cut -f1) bytes"
