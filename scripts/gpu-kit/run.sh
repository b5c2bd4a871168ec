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
#     weights-sdxl
#               full-size random sdxl-turbo / TAESDXL weights in float16 (once; about 6 GB)
#     bench-sdxl-f16
#               examples/bench on them at 512² and 1024², 1 step, TAESDXL, no ControlNet
#     multi-stream-f16
#               1/2/4/8 streams batched against one engine per stream (`bench multi-stream`,
#               512², 1 step, TAESD)
#     multi-stream-controlnet-f16
#               the same with the ControlNet on every stream (its calls batched too)
#     processors
#               every image processor's time a frame at 512² on the device (`bench processors`,
#               full-size random networks in f16): the pixel processors on the host's way
#               (download, host, upload; SDSTREAM_CUDA_PREPROCESS=0) and on the device (the
#               default); the network processors once
#     profile-f16, profile-bf16
#               Nsight Compute (ncu) over one 512² frame (TAESD, 1 step, no ControlNet, graphs off):
#               each kernel's GPU time, summed by kernel name, for the frame after the warm-up
#     reference-f16, reference-f32
#               tests/reference/bench_reference.py (streamdiffusion 0.1.1 on diffusers, torch eager)
#               on the same weights and GPU, 1 and 2 steps, TAESD and the full VAE; diffusers,
#               streamdiffusion and importlib_metadata come as wheels in $SDSTREAM_WHEELS (.whl)
#     reference-compiled
#               the same with torch.compile (mode $SDSTREAM_COMPILE_MODE, default max-autotune) on
#               the UNet and TAESD, f16, 1 step, TAESD, the host waiting once a frame
#     reference-graphs
#               diffusers' UNet and TAESD's encoder and decoder alone on the same weights, eager and
#               replayed from a torch CUDA graph, channels first and last, batches 1 and 8, f16
#               (scripts/gpu-kit/graph_reference.py): the torch CUDA-graph UNet issue 46 aims at
#     sdpa      torch's fused attention (flash, cuDNN, memory-efficient, math) on the UNet's
#               attention shapes at 512², f16 (scripts/gpu-kit/sdpa_reference.py)
#     attention sdstream's fused attention and the unfused path on the same shapes, f16
#               (examples/attention_bench)
#     all       info tests weights bench-f16 bench-bf16
# $SDSTREAM_TESTS filters the tests (libtest's name filters; $SDSTREAM_TESTS_TAG names their log);
# $SDSTREAM_REFERENCE_SYNC picks the reference's stage-sync modes (default "on off") and
# $SDSTREAM_REFERENCE_ARGS adds flags to it (a later flag wins).
# Logs and tables go to $OUT (the device tool's folder that comes back) or target/gpu-kit-out: at
# most seven files for `info tests weights bench-f16 reference-f16`.
# Everything unpacks under $SDSTREAM_GPU_WORK (default /tmp/sdstream-gpu), so a later call on the
# same warm machine reuses the binaries and the weights. Extra bench flags: $SDSTREAM_BENCH_ARGS;
# $SDSTREAM_BENCH_TAG is appended to the bench's file names (two runs with different flags).
set -euo pipefail
cd "$(dirname "$0")/../.."

kit="target/gpu-kit"
if [[ "${1:-}" == "--kit" ]]; then
  kit="$2"
  shift 2
fi
if [[ $# -eq 0 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' 
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
    for name in bench attention-bench cuda-tests; do
      xz -dc "$kit/$name.xz" > "$work/$name"
      chmod +x "$work/$name"
    done
    rm -rf "$work/fixtures"
    mkdir -p "$work/fixtures"
    tar -xJf "$kit/fixtures.tar.xz" -C "$work/fixtures"
    cp "$kit/full_size_manifest.json" "$kit/full_size_manifest_sdxl.json" \
      "$kit/random_weights.py" "$work/"
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
    # cuDNN's version too: the binaries load the cuDNN of torch's environment (LD_LIBRARY_PATH).
    "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())' || true
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    ldd "$work/bench" | grep -E 'cu|nvrtc' || true
  } 2>&1 | tee "$out/info.txt"
}

stage_tests() {
  # shellcheck disable=SC2086 # SDSTREAM_TESTS is a list of filters
  SDSTREAM_REQUIRE_CUDA=1 SDSTREAM_FIXTURES="$work/fixtures" \
    "$work/cuda-tests" ${SDSTREAM_TESTS:-} --test-threads=1 --nocapture 2>&1 \
    | tee "$out/cuda-tests${SDSTREAM_TESTS_TAG:-}.log"
  return "${PIPESTATUS[0]}"
}

# Draws full-size random weights from the kit's manifest $1 into $work/$2, once (a "done" file
# marks them), logging to $out/$3.log; the rest are random_weights.py's flags.
draw_weights() {
  local manifest="$1" dir="$2" log="$3"
  shift 3
  if [[ -f "$work/$dir/done" ]]; then
    echo "weights already at $work/$dir"
    return
  fi
  "$python" "$work/random_weights.py" --manifest "$work/$manifest" "$@" --out "$work/$dir" 2>&1 \
    | tee "$out/$log.log"
  touch "$work/$dir/done"
}

stage_weights() {
  draw_weights full_size_manifest.json fullsize weights \
    --tokenizer "$work/fixtures/tiny-sd-turbo/tokenizer"
}

stage_weights_sdxl() {
  draw_weights full_size_manifest_sdxl.json fullsize-sdxl weights-sdxl --fixtures "$work/fixtures"
}

# examples/bench on the GPU in dtype $2, its table to $out/$1-$2$SDSTREAM_BENCH_TAG.md and its
# log beside it; the rest are the row's flags, then $SDSTREAM_BENCH_ARGS (a later flag wins).
run_bench() {
  local name="$1-$2${SDSTREAM_BENCH_TAG:-}" dtype="$2"
  shift 2
  # shellcheck disable=SC2086 # SDSTREAM_BENCH_ARGS is a list of flags
  "$work/bench" --device cuda --dtype "$dtype" --warmup 3 --frames 20 "$@" \
    ${SDSTREAM_BENCH_ARGS:-} 2> "$out/$name.log" | tee "$out/$name.md"
  return "${PIPESTATUS[0]}"
}

# sd-turbo's shapes at 512², 1 and 2 steps, TAESD and the full VAE, 0/1/2 ControlNets.
stage_bench() {
  if [[ ! -f "$work/fullsize/done" ]]; then
    stage_weights
  fi
  run_bench bench "$1" --model "$work/fullsize/sd" --taesd "$work/fullsize/taesd" \
    --sizes 512 --t-index-lists '32;16,32' \
    --controlnet "$work/fullsize/controlnet" --controlnet-counts 0,1,2
}

# sdxl-turbo's shapes at 512² and 1024², one step, TAESDXL (the issue's SDXL rows).
stage_bench_sdxl() {
  if [[ ! -f "$work/fullsize-sdxl/done" ]]; then
    stage_weights_sdxl
  fi
  run_bench bench-sdxl "$1" --model "$work/fullsize-sdxl/sdxl" \
    --taesd "$work/fullsize-sdxl/taesdxl" --sizes 512,1024 --t-index-lists 32 --vaes taesd
}

# N streams of one model, their UNet calls batched across streams, against one engine per
# stream (docs/MULTI_STREAM.md), at 512², 1 step, TAESD.
stage_multi_stream() {
  local dtype="$1"
  if [[ ! -f "$work/fullsize/done" ]]; then
    stage_weights
  fi
  # shellcheck disable=SC2086 # SDSTREAM_MULTI_ARGS is a list of flags
  local name="bench-multi-stream-$dtype${SDSTREAM_BENCH_TAG:-}"
  "$work/bench" multi-stream --model "$work/fullsize/sd" --taesd "$work/fullsize/taesd" \
    --device cuda --dtype "$dtype" --size 512 --t-index-list 32 --streams 1,2,4,8 \
    --warmup 5 --frames 60 ${SDSTREAM_MULTI_ARGS:-} 2> "$out/$name.log" | tee "$out/$name.md"
  return "${PIPESTATUS[0]}"
}

# `bench processors` at 512² in f16: the pixel processors on the host's way
# (SDSTREAM_CUDA_PREPROCESS=0) and on the device (the default; two tables), the network
# processors once (in the second).
stage_processors() {
  local pixel="canny,soft_edge,blur,sharpen,upscale,standard_lineart"
  # The repository's frame (the binary's default names the build machine's checkout).
  local frame="examples/frames/000.png"
  SDSTREAM_CUDA_PREPROCESS=0 "$work/bench" processors --device cuda --dtype f16 --frames 10 \
    --frame "$frame" --only "$pixel" \
    2> "$out/bench-processors-host.log" | tee "$out/bench-processors-host.md"
  "$work/bench" processors --device cuda --dtype f16 --frames 10 --frame "$frame" \
    2> "$out/bench-processors-device.log" | tee "$out/bench-processors-device.md"
  return "${PIPESTATUS[0]}"
}

stage_profile() {
  local dtype="$1" ncu
  ncu="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1 || true)"
  if [[ -z "$ncu" ]]; then
    echo "no ncu on this machine" >&2
    return 1
  fi
  if [[ ! -f "$work/fullsize/done" ]]; then
    stage_weights
  fi
  SDSTREAM_CUDA_GRAPHS=0 "$ncu" --metrics gpu__time_duration.sum --csv --page raw \
    "$work/bench" --model "$work/fullsize/sd" --taesd "$work/fullsize/taesd" --vaes taesd \
    --device cuda --dtype "$dtype" --sizes 512 --warmup 1 --frames 1 --t-index-lists 32 \
    > "$work/profile-$dtype.csv" 2> "$work/profile-$dtype.log" || return 1
  xz -T0 -c "$work/profile-$dtype.csv" > "$out/profile-$dtype.csv.xz"
  "$python" - "$work/profile-$dtype.csv" <<'PY' | tee "$out/profile-$dtype.txt"
import collections, csv, sys
# ncu's table follows the program's own output (whose lines may hold commas too).
rows = list(csv.reader(open(sys.argv[1])))
at = next(i for i, r in enumerate(rows) if "Kernel Name" in r and "gpu__time_duration.sum" in r)
head, unit, rows = rows[at], rows[at + 1], rows[at + 2:]
name, dur = head.index("Kernel Name"), head.index("gpu__time_duration.sum")
scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0}.get(unit[dur], 1e-6)
kernels = [(r[name], float(r[dur].replace(",", "")) * scale) for r in rows
           if len(r) > dur and r[dur].replace(",", "").replace(".", "", 1).isdigit()]
starts = [i for i, (n, _) in enumerate(kernels) if n.startswith("rgb8_to_unit_planes")]
frame = kernels[starts[-1]:] if starts else kernels
total = sum(d for _, d in frame)
by = collections.defaultdict(lambda: [0, 0.0])
for n, d in frame:
    key = n.split("(")[0][:90]
    by[key][0] += 1
    by[key][1] += d
print(f"one frame: {len(frame)} kernels, {total:.2f} ms of GPU time (ncu)")
for key, (count, d) in sorted(by.items(), key=lambda kv: -kv[1][1])[:40]:
    print(f"{d:8.3f} ms {100 * d / total:5.1f}% {count:5d}x  {key}")
PY
}

# The weights and the reference's packages (diffusers, streamdiffusion, importlib_metadata from
# the wheels in $SDSTREAM_WHEELS, default .whl), each once while the machine stays warm.
reference_ready() {
  local wheels="${SDSTREAM_WHEELS:-.whl}"
  if [[ ! -f "$work/fullsize/done" ]]; then
    stage_weights
  fi
  if [[ ! -d "$work/site/streamdiffusion" ]]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" \
      "$wheels"/*.whl
  fi
}

stage_reference() {
  local dtype="$1"
  reference_ready
  local sync
  # shellcheck disable=SC2086 # SDSTREAM_REFERENCE_SYNC and SDSTREAM_REFERENCE_ARGS are lists
  for sync in ${SDSTREAM_REFERENCE_SYNC:-on off}; do
    PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}" SDSTREAM_FIXTURES="$work/fixtures" PYTHONUNBUFFERED=1 \
      "$python" tests/reference/bench_reference.py --sd "$work/fullsize/sd" --taesd "$work/fullsize/taesd" \
      --device cuda --dtype "$dtype" --sync-stages "$sync" --sizes 512 --t-index-lists '32;16,32' \
      --warmup 3 --frames 20 --out "$out/reference-$dtype-sync-$sync.json" ${SDSTREAM_REFERENCE_ARGS:-} 2>&1 \
      | tail -n 12
  done
}

stage_reference_compiled() {
  local mode="${SDSTREAM_COMPILE_MODE:-max-autotune}"
  reference_ready
  PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}" SDSTREAM_FIXTURES="$work/fixtures" PYTHONUNBUFFERED=1 \
    "$python" tests/reference/bench_reference.py --sd "$work/fullsize/sd" --taesd "$work/fullsize/taesd" \
    --device cuda --dtype f16 --sync-stages off --sizes 512 --t-index-lists 32 --vaes taesd \
    --compile "$mode" --warmup 4 --frames 20 --out "$out/reference-f16-$mode.json" 2>&1 \
    | tee "$work/reference-compiled.log" | grep -v "^    warm-up" | tail -n 30
}

stage_reference_graphs() {
  reference_ready
  PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
    "$python" scripts/gpu-kit/graph_reference.py --sd "$work/fullsize/sd" --taesd "$work/fullsize/taesd" \
    --device cuda --dtype f16 --size 512 --batches "${SDSTREAM_GRAPH_BATCHES:-1,8}" \
    --out "$out/reference-graphs-f16.md" 2>&1
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
    weights-sdxl) stage_weights_sdxl ;;
    bench-sdxl-f16) stage_bench_sdxl f16 ;;
    multi-stream-f16) stage_multi_stream f16 ;;
    multi-stream-controlnet-f16)
      SDSTREAM_BENCH_TAG="-controlnet${SDSTREAM_BENCH_TAG:-}" \
        SDSTREAM_MULTI_ARGS="--controlnet $work/fullsize/controlnet ${SDSTREAM_MULTI_ARGS:-}" \
        stage_multi_stream f16 ;;
    processors) stage_processors ;;
    profile-f16) stage_profile f16 ;;
    profile-bf16) stage_profile bf16 ;;
    reference-f16) stage_reference f16 ;;
    reference-f32) stage_reference f32 ;;
    reference-compiled) stage_reference_compiled ;;
    reference-graphs) stage_reference_graphs ;;
    sdpa) "$python" scripts/gpu-kit/sdpa_reference.py --dtype f16 --out "$out/sdpa-f16.md" ;;
    attention) "$work/attention-bench" --device cuda --dtype f16 --reps 50 | tee "$out/attention-f16.md" ;;
    all) stage_info; stage_tests; stage_weights; stage_bench f16; stage_bench bf16 ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
