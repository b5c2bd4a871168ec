#!/usr/bin/env bash
# Runs the GPU kit (scripts/gpu-kit/build.sh) on a machine with an NVIDIA GPU, its driver and a
# Python with torch (CUDA 13 build) and safetensors; no Rust toolchain, no network (docs/GPU.md).
#
#   bash scripts/gpu-kit/run.sh [--kit DIR] STAGE...
#     info      the GPU, the driver, the libraries the binaries will load
#     tests     core/tests/cuda.rs with SDSTREAM_REQUIRE_CUDA=1 (a missing device fails)
#     weights   full-size random sd-turbo / TAESD / ControlNet weights (once; about 5 GB on disk)
#     bench-f16, bench-bf16, bench-f32
#               examples/bench at 512², 1 and 2 steps, TAESD and the full VAE, 0/1/2 ControlNets
#     all       info tests weights bench-f16 bench-bf16
# Logs and tables go to $OUT (the device tool's folder that comes back) or target/gpu-kit-out.
# Everything unpacks under $SDSTREAM_GPU_WORK (default /tmp/sdstream-gpu), so a later call on the
# same warm machine reuses the binaries and the weights. Extra bench flags: $SDSTREAM_BENCH_ARGS.
set -euo pipefail
cd "$(dirname "$0")/../.."

kit="target/gpu-kit"
if [[ "${1:-}" == "--kit" ]]; then
  kit="$2"
  shift 2
fi
if [[ $# -eq 0 ]]; then
  sed -n '2,16p' "$0"
  exit 2
fi
work="${SDSTREAM_GPU_WORK:-/tmp/sdstream-gpu}"
out="${OUT:-target/gpu-kit-out}"
python="${PYTHON:-python3}"
mkdir -p "$work" "$out"

unpack() {
  if [[ ! -f "$kit/BUILD.txt" ]]; then
    echo "no kit at $kit: build it with scripts/gpu-kit/build.sh and carry it" >&2
    exit 1
  fi
  if ! cmp -s "$kit/BUILD.txt" "$work/BUILD.txt"; then
    for name in bench cuda-tests; do
      xz -dc "$kit/$name.xz" > "$work/$name"
      chmod +x "$work/$name"
    done
    rm -rf "$work/fixtures"
    mkdir -p "$work/fixtures"
    tar -xJf "$kit/fixtures.tar.xz" -C "$work/fixtures"
    cp "$kit/full_size_manifest.json" "$kit/random_weights.py" "$work/"
    cp "$kit/BUILD.txt" "$work/BUILD.txt"
  fi
  # CUDA 13's libraries from the Python environment: torch's own lib/ and the nvidia-* wheels'.
  local dirs
  dirs="$("$python" - <<'PY'
import glob, os, site, sys
dirs = []
try:
    import torch
    dirs.append(os.path.join(os.path.dirname(torch.__file__), "lib"))
except Exception as e:
    print(f"no torch: {e}", file=sys.stderr)
roots = site.getsitepackages() + [site.getusersitepackages()]
for root in roots:
    dirs += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib")))
print(":".join(d for d in dict.fromkeys(dirs) if os.path.isdir(d)))
PY
)"
  export LD_LIBRARY_PATH="${dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  local missing
  missing="$(ldd "$work/cuda-tests" | grep 'not found' || true)"
  if [[ -n "$missing" ]]; then
    echo "libraries not found (LD_LIBRARY_PATH=$LD_LIBRARY_PATH):" >&2
    echo "$missing" >&2
    exit 1
  fi
}

stage_info() {
  {
    cat "$work/BUILD.txt"
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
    "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' || true
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    ldd "$work/bench" | grep -E 'cu|nvrtc' || true
  } 2>&1 | tee "$out/info.txt"
}

stage_tests() {
  SDSTREAM_REQUIRE_CUDA=1 SDSTREAM_FIXTURES="$work/fixtures" \
    "$work/cuda-tests" --test-threads=1 --nocapture 2>&1 | tee "$out/cuda-tests.log"
  return "${PIPESTATUS[0]}"
}

stage_weights() {
  if [[ -f "$work/fullsize/done" ]]; then
    echo "weights already at $work/fullsize"
    return
  fi
  "$python" "$work/random_weights.py" --manifest "$work/full_size_manifest.json" \
    --tokenizer "$work/fixtures/tiny-sd-turbo/tokenizer" --out "$work/fullsize" 2>&1 \
    | tee "$out/weights.log"
  touch "$work/fullsize/done"
}

stage_bench() {
  local dtype="$1"
  if [[ ! -f "$work/fullsize/done" ]]; then
    stage_weights
  fi
  # shellcheck disable=SC2086 # SDSTREAM_BENCH_ARGS is a list of flags
  "$work/bench" --model "$work/fullsize/sd" --taesd "$work/fullsize/taesd" \
    --device cuda --dtype "$dtype" --sizes 512 --frames 10 --t-index-lists '32;16,32' \
    --controlnet "$work/fullsize/controlnet" --controlnet-counts 0,1,2 \
    ${SDSTREAM_BENCH_ARGS:-} 2> "$out/bench-$dtype.log" | tee "$out/bench-$dtype.md"
  return "${PIPESTATUS[0]}"
}

unpack
for stage in "$@"; do
  case "$stage" in
    info) stage_info ;;
    tests) stage_tests ;;
    weights) stage_weights ;;
    bench-f16) stage_bench f16 ;;
    bench-bf16) stage_bench bf16 ;;
    bench-f32) stage_bench f32 ;;
    all) stage_info; stage_tests; stage_weights; stage_bench f16; stage_bench bf16 ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
