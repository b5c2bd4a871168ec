#!/usr/bin/env bash
# Asks cuDNN, on a machine with no GPU, whether it takes the attention graph that
# kernels/src/cudnn_attention.rs builds (docs/GPU.md, "Attention through cuDNN") and which
# engines it offers the convolution graphs of kernels/src/cudnn_conv_graph.rs: runs the ignored
# tests `deviceless_plans_exist` and `deviceless_convolution_engines_exist`, which hand cuDNN's
# heuristic an H100's properties (a device-properties descriptor, cuDNN 9.8 and later) instead
# of a device, for each attention graph as it is and as the dynamic-shape graph whose kernel
# cache batched calls share, and for each convolution of the UNet and TAESD with its epilogue.
#
#   bash scripts/cudnn-deviceless.sh
#
# cuDNN itself: $SDSTREAM_CUDNN_LIB (a folder with libcudnn.so.9 and its engine libraries), else
# the nvidia-cudnn-cu13 wheel $SDSTREAM_CUDNN_VERSION from the package index, installed once
# under target/cudnn-deviceless/VERSION (about 1 GB each). The default, 9.19.0.56, is the one
# torch 2.11 pins, which the kit's GPU machine loads (its torch 2.11.0+cu130 ships the CUDA
# libraries the kit runs on); 9.26.0.51, the newest when the graph was written, gives the same
# answers. The CUDA libraries the test binary links against come from
# the CUDA toolchain (scripts/cuda-toolchain.sh --link). libcuda is the driver's and there is none:
# cuDNN loads it and looks a list of its functions up before its heuristic checks an engine, so a
# stand-in exports each of them (and every driver function the test binary imports), returning
# success and touching nothing; the heuristic's checks never call them. Building the plans
# themselves needs the real driver, although cuDNN accepts a device-properties descriptor for a
# plan too: finalizing one for these properties reaches NVRTC with options cuDNN obfuscates, and
# NVRTC then faults on state this stand-in never sets up (cuDNN 9.19, NVRTC 13.0 and 13.2; NVRTC
# alone compiles for sm_90 here). The plans, their compile time and the numbers are the GPU kit's
# device test.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${CARGO_TARGET_DIR:-target}"
work="$target/cudnn-deviceless"
mkdir -p "$work"

cudnn="${SDSTREAM_CUDNN_LIB:-}"
if [[ -z "$cudnn" ]]; then
  version="${SDSTREAM_CUDNN_VERSION:-9.19.0.56}"
  cudnn="$work/$version/nvidia/cudnn/lib"
  if [[ ! -f "$cudnn/libcudnn.so.9" ]]; then
    echo "installing nvidia-cudnn-cu13 $version under $work/$version (once)" >&2
    python3 -m pip install -q --no-deps --target "$work/$version" "nvidia-cudnn-cu13==$version"
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
  "$binary" deviceless_ --ignored --nocapture --test-threads 1
