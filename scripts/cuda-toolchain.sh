#!/usr/bin/env bash
# The CUDA toolchain that builds the `cuda` feature on a machine with no GPU and no CUDA install,
# from the package index's pinned NVIDIA wheels (CUDA 13.0), in a virtualenv under the target dir.
#
#   eval "$(bash scripts/cuda-toolchain.sh)"          # nvcc and headers: enough for check/clippy
#   eval "$(bash scripts/cuda-toolchain.sh --link)"   # + the libraries a binary links against
#
# It installs once (a stamp file records the pinned set; run again, it only prints), reports on
# stderr and prints on stdout the `export` lines the build needs:
#   PATH              nvcc first: candle-kernels' build script (cudaforge) finds nvcc on PATH and
#                     takes the headers from the folder beside its bin/; cudarc's build script runs
#                     `nvcc --version` for the CUDA version;
#   CUDARC_CUDA_VERSION  the same version spelled for cudarc (13000), so it need not parse nvcc;
#   CUDA_COMPUTE_CAP  the GPU architecture to compile for (default 90, the H100; no nvidia-smi
#                     here to ask); override by setting it before running this script;
#   CUDAFORGE_THREADS how many kernels cudaforge compiles at once (default: all cores);
#   CUDA_ROOT         where cudarc's build script looks for the libraries (lib/, lib/stubs/): a
#                     folder of links to the wheels' libraries under unversioned names, and, with
#                     --link, a libcuda.so.1 link stub (libcuda is the driver's: it comes with the
#                     GPU's driver, never with a wheel; the stub exports the driver functions
#                     cudarc declares and is never loaded at run time).
# `cargo check` and `cargo clippy` link nothing: they need no --link. The folder is
# $CARGO_TARGET_DIR/cuda-toolchain (or target/cuda-toolchain), or $SDSTREAM_CUDA_TOOLCHAIN.
set -euo pipefail
cd "$(dirname "$0")/.."

link=0
for arg in "$@"; do
  case "$arg" in
    --link) link=1 ;;
    *) echo "usage: $0 [--link]" >&2; exit 2 ;;
  esac
done

# CUDA 13.0, every wheel pinned (nvcc's own requirements are unpinned upstream: pinned here so a
# newer nvvm or runtime never pairs with this nvcc). --no-deps installs exactly this set.
compile_wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
link_wheels=(
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
  nvidia-cuda-nvrtc==13.0.88
)

target_dir="${CARGO_TARGET_DIR:-target}"
tc="${SDSTREAM_CUDA_TOOLCHAIN:-$target_dir/cuda-toolchain}"
mkdir -p "$tc"
tc="$(cd "$tc" && pwd)"
venv="$tc/venv"
python="${PYTHON:-python3}"

wheels=("${compile_wheels[@]}")
if [[ "$link" == 1 ]]; then
  wheels+=("${link_wheels[@]}")
fi
stamp="$tc/installed-${link}.txt"
if [[ ! -f "$stamp" ]] || [[ "$(cat "$stamp")" != "${wheels[*]}" ]]; then
  echo "cuda-toolchain: installing ${wheels[*]} into $venv" >&2
  if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "${wheels[@]}" >&2
  printf '%s' "${wheels[*]}" > "$stamp"
fi

cu="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
if [[ ! -x "$cu/bin/nvcc" ]]; then
  echo "cuda-toolchain: no nvcc at $cu/bin/nvcc" >&2
  exit 1
fi

# CUDA_ROOT: lib/ holds the unversioned names a linker looks for.
root="$tc/root"
mkdir -p "$root/lib" "$root/lib/stubs"
ln -sfn "$cu/include" "$root/include"
ln -sfn "$cu/bin" "$root/bin"
ln -sf "$cu/lib/libcudart.so.13" "$root/lib/libcudart.so"
if [[ "$link" == 1 ]]; then
  for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    if [[ ! -e "$cu/lib/$lib" ]]; then
      echo "cuda-toolchain: the wheels gave no $cu/lib/$lib" >&2
      exit 1
    fi
    ln -sf "$cu/lib/$lib" "$root/lib/${lib%%.so.*}.so"
  done
  # Link stubs: every function cudarc's bindings of a library declare (its sources in cargo's
  # registry, found through cargo metadata), as an empty function in a library whose soname is
  # the real one's, so the binary asks for that soname and gets the real library at run time.
  # libcuda is the driver's (never in a wheel); libcudnn (the `cudnn` feature) comes in a wheel
  # of hundreds of MB of which only the names are needed here (a GPU machine's PyTorch
  # environment has the real libcudnn.so.9).
  cudarc_dir=""
  link_stub() {  # NAME SONAME BINDINGS(relative to cudarc's src/) DECLARATION PREFIX
    local name="$1" soname="$2" bindings="$3" declaration="$4" prefix="$5"
    local stub="$root/lib/stubs/lib$name.so"
    if [[ ! -f "$stub" ]]; then
      if [[ -z "$cudarc_dir" ]]; then
        cudarc_dir="$(cargo metadata --format-version 1 --features sdstream/cuda 2>/dev/null \
          | "$venv/bin/python" -c 'import json, os, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "cudarc":
        print(os.path.dirname(p["manifest_path"]))')"
      fi
      local sys_rs="$cudarc_dir/src/$bindings"
      if [[ ! -f "$sys_rs" ]]; then
        echo "cuda-toolchain: cudarc's $name bindings not found (run cargo fetch first)" >&2
        exit 1
      fi
      grep -oE "^\s+${declaration}${prefix}[A-Za-z0-9_]+\(" "$sys_rs" \
        | grep -oE "${prefix}[A-Za-z0-9_]+" \
        | sort -u | awk '{ print "void " $1 "(void) {}" }' > "$tc/lib$name-stub.c"
      cc -shared -fPIC -Wl,-soname,"$soname" -o "$stub" "$tc/lib$name-stub.c"
      echo "cuda-toolchain: lib$name link stub with $(wc -l < "$tc/lib$name-stub.c") functions" >&2
    fi
    ln -sf "stubs/lib$name.so" "$root/lib/lib$name.so"
  }
  link_stub cuda libcuda.so.1 driver/sys/mod.rs 'fn ' cu
  link_stub cudnn libcudnn.so.9 cudnn/sys/mod.rs '(pub )?fn ' cudnn
fi

cat <<EOF
export PATH="$cu/bin:\$PATH"
export CUDARC_CUDA_VERSION=13000
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
export CUDA_ROOT="$root"
EOF
