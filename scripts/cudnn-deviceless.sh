#!/usr/bin/env bash
# Asks cuDNN, on a machine with no GPU, whether it takes the attention graph that
# kernels/src/cudnn_attention.rs builds (docs/GPU.md, "Attention through cuDNN"): runs the
# ignored test `deviceless_plans_exist`, which hands cuDNN's heuristic an H100's properties (a
# device-properties descriptor, cuDNN 9.8 and later) instead of a device.
#
#   bash scripts/cudnn-deviceless.sh
#
# cuDNN itself: $SDSTREAM_CUDNN_LIB (a folder with libcudnn.so.9 and its engine libraries), else
# the pinned nvidia-cudnn-cu13 wheel from the package index, installed once under
# target/cudnn-deviceless (about 1 GB). The CUDA libraries the test binary links against come from
# the CUDA toolchain (scripts/cuda-toolchain.sh --link). libcuda is the driver's and there is none:
# cuDNN loads it and looks a list of its functions up before its heuristic checks an engine, so a
# stand-in exports each of them (and every driver function the test binary imports), returning
# success and touching nothing; the heuristic's checks never call them. Building the plans
# themselves needs the real driver (those engines compile their kernels then): that is the GPU
# kit's device test.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-target}"
work="$target/cudnn-deviceless"
mkdir -p "$work"

cudnn="${SDSTREAM_CUDNN_LIB:-}"
if [[ -z "$cudnn" ]]; then
  cudnn="$work/site/nvidia/cudnn/lib"
  if [[ ! -f "$cudnn/libcudnn.so.9" ]]; then
    echo "installing nvidia-cudnn-cu13 9.26.0.51 under $work/site (once)" >&2
    python3 -m pip install -q --no-deps --target "$work/site" nvidia-cudnn-cu13==9.26.0.51
  fi
fi
[[ -f "$cudnn/libcudnn.so.9" ]] || { echo "no libcudnn.so.9 in $cudnn" >&2; exit 1; }

eval "$(bash scripts/cuda-toolchain.sh --link)"
built="$(cargo test -p sdstream-kernels --features cudnn --lib --no-run 2>&1 | tee /dev/stderr)"
binary="$(sed -n 's/.*Executable unittests src\/lib.rs (\(.*\))$/\1/p' <<< "$built" | tail -n 1)"
[[ -x "$binary" ]] || { echo "no test binary found in cargo's output" >&2; exit 1; }

# The stand-in driver: every cu* function the binary imports, and those cuDNN looks up.
cudnn_wants=(cuInit cuDriverGetVersion cuGetProcAddress cuGetProcAddress_v2 cuCtxGetCurrent
  cuCtxGetLimit cuCtxPopCurrent cuCtxPushCurrent cuDeviceGet cuDeviceGetCount cuGetErrorName
  cuGetErrorString cuKernelGetAttribute cuKernelGetFunction cuKernelSetAttribute
  cuLaunchCooperativeKernel cuLaunchKernel cuLaunchKernelEx cuLibraryGetKernel cuLibraryLoadData
  cuLibraryLoadFromFile cuLibraryUnload cuLinkAddData cuLinkComplete cuLinkCreate cuLinkDestroy
  cuOccupancyMaxPotentialClusterSize cuStreamGetCtx)
mapfile -t imported < <(nm -D --undefined-only "$binary" | awk '{print $2}' | sed 's/@.*//' | grep -E '^cu[A-Z]')
{
  echo '/* A stand-in for libcuda.so.1 (scripts/cudnn-deviceless.sh): each function succeeds. */'
  echo 'int cuDriverGetVersion(int *version) { *version = 13000; return 0; }'
  printf '%s\n' "${cudnn_wants[@]}" "${imported[@]}" | sort -u | grep -vx cuDriverGetVersion |
    sed 's/.*/int &(void) { return 0; }/'
} > "$work/libcuda.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$work/libcuda.so.1" "$work/libcuda.c"

cuda_libs="$(dirname "$(readlink -f "$CUDA_ROOT/lib/libcudart.so")")"
LD_LIBRARY_PATH="$work:$cudnn:$cuda_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  "$binary" deviceless_plans_exist --ignored --nocapture
