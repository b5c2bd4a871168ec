#!/usr/bin/env bash
# One GPU call's worth of checks (docs/GPU.md, "The GPU kit"): run.sh's stages in the order they
# matter, each under its own time limit, all within $SDSTREAM_SESSION_S seconds (default 560, for
# a call limited to 600), so that a call that runs out of time still brings back what ran.
#
#   bash scripts/gpu-kit/session.sh            # on the GPU machine, the kit carried along
#
# The device tool brings back only a few files: everything a stage prints goes to ONE file,
# $OUT/session.log, the tables to $OUT/tables.md, and the summary (each stage's status and time,
# the tables) to stdout. The stages' own files stay under $SDSTREAM_GPU_WORK/out.
set -u
cd "$(dirname "$0")/../.."

final="${OUT:-target/gpu-kit-out}"
work="${SDSTREAM_GPU_WORK:-/tmp/sdstream-gpu}"
export OUT="$work/out"
mkdir -p "$OUT" "$final"
log="$final/session.log"
budget="${SDSTREAM_SESSION_S:-560}"
start=$(date +%s)
run=(bash scripts/gpu-kit/run.sh)

# stage NAME LIMIT [VAR=VALUE...] STAGE: run.sh STAGE with the variables set, for at most LIMIT
# seconds and never past the budget; what it leaves running is stopped before the next.
stage() {
  local name="$1" limit="$2" left began rc
  shift 2
  left=$((budget - ($(date +%s) - start)))
  if ((left < 20)); then
    echo "== $name skipped: ${left} s of the budget left" | tee -a "$log"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $name (at most ${limit} s): $*" >> "$log"
  began=$(date +%s)
  timeout --kill-after=5 "$limit" env "$@" >> "$log" 2>&1
  rc=$?
  # The bracket keeps each pattern from matching this script's own command line.
  pkill -9 -f 'sdstream-gp[u]/(bench|cuda-tests)|[b]ench_reference|[s]dpa_reference|[r]andom_weights|[n]cu ' || true
  echo "== $name: exit $rc after $(($(date +%s) - began)) s" | tee -a "$log"
  return "$rc"
}

: > "$log"
stage info 30 "${run[@]}" info
stage tests-kernels 90 SDSTREAM_TESTS="cuda_fused_attention cuda_fused_conv cuda_geglu cuda_canny cuda_float_processors cuda_in_place cuda_group_norm cuda_layer_norm cuda_fused_linear cuda_phase_conv cuda_fused_time_projections" SDSTREAM_TESTS_TAG=-kernels "${run[@]}" tests
# Convolutions through engines chosen from cuDNN's graph API (SDSTREAM_CUDA_CONV_ENGINES): each
# geometry's first call builds up to four plans and times them, and the fused ones' engines may
# compile their kernels (NVRTC), for a time no run has measured yet (the test prints it): a
# stage of its own. The test also times the legacy call against the chosen engines.
stage tests-conv-engines 90 SDSTREAM_TESTS=cuda_conv_engines SDSTREAM_TESTS_TAG=-conv-engines \
  "${run[@]}" tests
# The register attention kernel, the fused convolution epilogue, the GroupNorm `_rows` kernels,
# the LayerNorm kernel, the fused linear epilogue, the phase convolutions, the fused time
# projections and the chosen convolution engines are in those tests: each switch whose test
# passed is "proven", and the all-on rows and the profile below run the proven ones (a kernel
# that failed its test would give a figure for wrong pictures). The order below puts the
# figures the issues' targets are judged by first (the all-on frame, its UNet against torch's
# CUDA-graph UNet, 8 streams batched, the profile), then the goldens and every other test,
# then cuDNN's attention, then each switch alone: a call that runs out of its budget loses the
# least.
# Every test of that name's prefix passed (at least one ran, none failed).
passed() {
  grep -qE "^test $1[a-z0-9_]* \.\.\. ok" "$log" && ! grep -qE "^test $1[a-z0-9_]* \.\.\. FAILED" "$log"
}
proven=()
passed cuda_fused_attention && proven+=(SDSTREAM_CUDA_FLASH_ATTENTION=1)
passed cuda_fused_conv && proven+=(SDSTREAM_CUDA_FUSED_CONV=1)
passed cuda_group_norm && proven+=(SDSTREAM_CUDA_GROUP_NORM_ROWS=1)
passed cuda_layer_norm && proven+=(SDSTREAM_CUDA_LAYER_NORM=1)
passed cuda_fused_linear && proven+=(SDSTREAM_CUDA_FUSED_LINEAR=1)
passed cuda_phase_conv && proven+=(SDSTREAM_CUDA_PHASE_CONV=1)
passed cuda_fused_time_projections && proven+=(SDSTREAM_FUSED_TIME_PROJECTIONS=1)
passed cuda_conv_engines && proven+=(SDSTREAM_CUDA_CONV_ENGINES=1)
echo "== proven switches: ${proven[*]:-none}" | tee -a "$log"
# cuDNN's attention engines compile their kernels (NVRTC) as each thread's first call of a
# geometry builds its plan, for a time no run has measured yet. So its test runs after the
# headline rows, the profile and the goldens, which run the other proven switches
# (attention.cu's kernel), and cuDNN's attention has all-on rows of its own after its test.
proven_kernels=("${proven[@]}")
# The convolution engines are chosen per geometry on first use, timing up to four plans each
# (once per process; other threads build the chosen plan alone): a stream alone meets all its
# geometries in the bench's warm-up frames, but a batcher's rounds of every width from 2 to 8
# rows may still be choosing in the measured ones. So the batched rows run without them
# (proven_batched), and 8 streams have a row with them of their own.
proven_batched=()
for switch in "${proven[@]}"; do
  [[ "$switch" == SDSTREAM_CUDA_CONV_ENGINES=1 ]] || proven_batched+=("$switch")
done
# The in-place adds' 16-byte path is in the default path (the same bits as the scalar kernel,
# checked under kernels/emulate): should its test fail on the device, every later stage runs
# the scalar kernel instead of failing with it.
if ! passed cuda_in_place; then
  export SDSTREAM_CUDA_VECTOR_ADDS=0
  echo "== cuda_in_place failed: the stages below run the scalar adds" | tee -a "$log"
fi
stage weights 150 "${run[@]}" weights
# Should CUDA graphs fail on the device again (as they did on an H200 before the key/value memo
# was made the CPU's only), the figures come op by op instead of not at all.
stage bench-f16 120 SDSTREAM_BENCH_ARGS="--vaes taesd --controlnet-counts 0,1 --t-index-lists 32 --frames 100" \
  "${run[@]}" bench-f16 \
  || stage bench-f16-nographs 90 SDSTREAM_CUDA_GRAPHS=0 SDSTREAM_BENCH_TAG=-nographs \
    SDSTREAM_BENCH_ARGS="--vaes taesd --frames 50" "${run[@]}" bench-f16
# Every prepared switch on at once (channels last and canny on the device, both the defaults
# now, set here to say so; pinned transfers; the proven switches), the host waiting once a
# frame: the figure to hold against the 100 fps target. (Rows an H200 measured in the last kit
# and that no change since touched are left out: channels first, canny on the host, attention
# unfused; docs/GPU.md has them.)
stage bench-f16-all-on 60 SDSTREAM_CHANNELS_LAST=1 SDSTREAM_CUDA_PINNED=1 SDSTREAM_CUDA_PREPROCESS=1 \
  "${proven_kernels[@]}" SDSTREAM_BENCH_TAG=-all-on \
  SDSTREAM_BENCH_ARGS="--vaes taesd --controlnet-counts 0,1 --t-index-lists 32 --frames 100 --sync-stages off" \
  "${run[@]}" bench-f16
# The same switches with each stage waiting for the device: the UNet's own time with every
# proven switch, to hold against torch's CUDA-graph UNet (reference-graphs, below).
stage bench-f16-all-on-sync 60 SDSTREAM_CHANNELS_LAST=1 SDSTREAM_CUDA_PINNED=1 SDSTREAM_CUDA_PREPROCESS=1 \
  "${proven_kernels[@]}" SDSTREAM_BENCH_TAG=-all-on-sync \
  SDSTREAM_BENCH_ARGS="--vaes taesd --controlnet-counts 0 --t-index-lists 32 --frames 60 --sync-stages on" \
  "${run[@]}" bench-f16
# Issue 44's target (8 streams at 30 fps each) with every prepared switch on: batched UNet calls
# of up to 8 rows spend most of their time in attention.
stage multi-stream-f16-all-on 60 SDSTREAM_CUDA_PINNED=1 "${proven_batched[@]}" \
  SDSTREAM_BENCH_TAG=-all-on SDSTREAM_MULTI_ARGS="--streams 1,8 --frames 40" "${run[@]}" multi-stream-f16
# The same with each convolution's engine chosen by timing, where its test passed: batches of
# 8 rows are where the convolutions' arithmetic rate counts most (the choices' count and time
# follow the table).
if passed cuda_conv_engines; then
  stage multi-stream-f16-all-on-conv-engines 50 SDSTREAM_CUDA_PINNED=1 "${proven_batched[@]}" \
    SDSTREAM_CUDA_CONV_ENGINES=1 SDSTREAM_BENCH_TAG=-all-on-conv-engines \
    SDSTREAM_MULTI_ARGS="--streams 8 --frames 40" "${run[@]}" multi-stream-f16
fi
# diffusers' UNet and TAESD alone replayed from torch CUDA graphs, batches 1 and 8: the UNet
# time issue 46 aims at, and what a batched round of eight streams costs torch.
stage reference-graphs 60 "${run[@]}" reference-graphs
# The frame as it will run next (pinned transfers and the proven switches), kernel by kernel:
# what is left between it and the target.
stage profile-f16 120 SDSTREAM_CUDA_PINNED=1 "${proven_kernels[@]}" "${run[@]}" profile-f16
# The f32 goldens with the switches that change f32 arithmetic on (GroupNorm's `_rows` kernels,
# the LayerNorm kernel, the fused convolution and linear epilogues, the chosen convolution
# engines, the phase convolutions, the fused time projections; f32 attention runs unfused
# whatever the switch).
stage tests-all-on-f32 60 SDSTREAM_CUDA_GROUP_NORM_ROWS=1 SDSTREAM_CUDA_LAYER_NORM=1 SDSTREAM_CUDA_FUSED_CONV=1 \
  SDSTREAM_CUDA_CONV_ENGINES=1 SDSTREAM_CUDA_FUSED_LINEAR=1 SDSTREAM_CUDA_PHASE_CONV=1 SDSTREAM_FUSED_TIME_PROJECTIONS=1 \
  SDSTREAM_TESTS=cuda_f32_streams SDSTREAM_TESTS_TAG=-all-on-f32 "${run[@]}" tests
# Every stream case in f16 and bf16 against f32 with the register attention kernel, the
# GroupNorm `_rows` kernels, the LayerNorm kernel, the fused linear epilogue, the phase
# convolutions, the fused time projections and the chosen convolution engines (each checked
# alone above; cuDNN's attention has a stage of its own after its test).
stage tests-flash 60 SDSTREAM_CUDA_FLASH_ATTENTION=1 \
  SDSTREAM_CUDA_GROUP_NORM_ROWS=1 SDSTREAM_CUDA_LAYER_NORM=1 \
  SDSTREAM_CUDA_FUSED_LINEAR=1 SDSTREAM_CUDA_PHASE_CONV=1 SDSTREAM_FUSED_TIME_PROJECTIONS=1 \
  SDSTREAM_CUDA_CONV_ENGINES=1 SDSTREAM_TESTS=cuda_half_precision_streams \
  SDSTREAM_TESTS_TAG=-flash "${run[@]}" tests
# Every other CUDA test: the defaults (and the stream goldens) after the changes since the
# last run.
stage tests 240 SDSTREAM_TESTS="--skip cuda_fused_attention --skip cuda_cudnn_attention --skip cuda_cudnn_kernel_cache --skip cuda_fused_conv --skip cuda_geglu --skip cuda_canny --skip cuda_float_processors --skip cuda_in_place --skip cuda_group_norm --skip cuda_layer_norm --skip cuda_fused_linear --skip cuda_phase_conv --skip cuda_fused_time_projections --skip cuda_conv_engines" "${run[@]}" tests
# The same 8 streams with each batch handed back by a CUDA event instead of the running thread
# waiting for the device (the host queues a round's next batch while this one runs), where its
# test passed (in the full tests, above): against multi-stream-f16-all-on's 8-stream row, what the
# host's waits at each stage change cost.
if passed cuda_streams_batched_with_events; then
  stage multi-stream-f16-all-on-events 50 SDSTREAM_CUDA_PINNED=1 "${proven_batched[@]}" \
    SDSTREAM_CUDA_BATCH_EVENTS=1 SDSTREAM_BENCH_TAG=-all-on-events \
    SDSTREAM_MULTI_ARGS="--streams 8 --frames 40" "${run[@]}" multi-stream-f16
fi
# cuDNN's fused attention in a stage of its own, after the headline rows, the profile and the
# goldens: its engines compile their kernels (NVRTC) when
# a shape's plan is built, for a time no run has measured yet (the test prints it as it goes),
# which must not take the other kernels' time. Up to 44 plans (11 shapes, f16 and bf16, both
# arrangements), each a compile: the limit allows 3 s each.
stage tests-cudnn-attention 150 SDSTREAM_TESTS=cuda_cudnn_attention SDSTREAM_TESTS_TAG=-cudnn-attention \
  "${run[@]}" tests
passed cuda_cudnn_attention && proven+=(SDSTREAM_CUDA_CUDNN_ATTENTION=1)
echo "== proven switches with cuDNN's attention: ${proven[*]:-none}" | tee -a "$log"
# The stream cases in f16 and bf16 with cuDNN's attention too, where its test passed.
if passed cuda_cudnn_attention; then
  stage tests-cudnn-streams 60 "${proven[@]}" SDSTREAM_TESTS=cuda_half_precision_streams \
    SDSTREAM_TESTS_TAG=-cudnn-streams "${run[@]}" tests
fi
# The same frame with cuDNN's attention as well, where its test passed: the host waiting once
# a frame, then each stage waiting (the bench prints how long its plans took to build).
if passed cuda_cudnn_attention; then
  stage bench-f16-all-on-cudnn 60 SDSTREAM_CHANNELS_LAST=1 SDSTREAM_CUDA_PINNED=1 SDSTREAM_CUDA_PREPROCESS=1 \
    "${proven[@]}" SDSTREAM_BENCH_TAG=-all-on-cudnn \
    SDSTREAM_BENCH_ARGS="--vaes taesd --controlnet-counts 0,1 --t-index-lists 32 --frames 100 --sync-stages off" \
    "${run[@]}" bench-f16
  stage bench-f16-all-on-cudnn-sync 60 SDSTREAM_CHANNELS_LAST=1 SDSTREAM_CUDA_PINNED=1 SDSTREAM_CUDA_PREPROCESS=1 \
    "${proven[@]}" SDSTREAM_BENCH_TAG=-all-on-cudnn-sync \
    SDSTREAM_BENCH_ARGS="--vaes taesd --controlnet-counts 0 --t-index-lists 32 --frames 60 --sync-stages on" \
    "${run[@]}" bench-f16
fi
# cuDNN's attention in batched rounds (issue 44): calls of 2 to 4 rows built as dynamic-shape
# plans sharing each geometry's kernel cache (SDSTREAM_CUDA_CUDNN_KERNEL_CACHE), so that the
# widths a batcher forms do not each compile the engine's kernel; the test prints each build's
# time. Where it passes, the batched 1- and 8-stream rows with cuDNN's attention.
if passed cuda_cudnn_attention; then
  stage tests-cudnn-kernel-cache 60 SDSTREAM_TESTS=cuda_cudnn_kernel_cache \
    SDSTREAM_TESTS_TAG=-cudnn-kernel-cache "${run[@]}" tests
  if passed cuda_cudnn_kernel_cache; then
    stage multi-stream-f16-all-on-cudnn 60 SDSTREAM_CUDA_PINNED=1 "${proven_batched[@]}" \
      SDSTREAM_CUDA_CUDNN_ATTENTION=1 SDSTREAM_CUDA_CUDNN_KERNEL_CACHE=1 SDSTREAM_BENCH_TAG=-all-on-cudnn \
      SDSTREAM_MULTI_ARGS="--streams 1,8 --frames 40" "${run[@]}" multi-stream-f16
  fi
fi
# Each prepared switch alone, against bench-f16's rows: what each adds to the all-on figure.
# The register-level attention kernel (SDSTREAM_CUDA_FLASH_ATTENTION, off by default until this
# row and the tests below have run): against bench-f16's rows, which run the WMMA kernel.
stage bench-f16-flash 60 SDSTREAM_CUDA_FLASH_ATTENTION=1 SDSTREAM_BENCH_TAG=-flash \
  SDSTREAM_BENCH_ARGS="--vaes taesd --controlnet-counts 0,1 --t-index-lists 32 --frames 100" "${run[@]}" bench-f16
# cuDNN's fused attention through its backend graph (SDSTREAM_CUDA_CUDNN_ATTENTION, off by
# default until this row and cuda_cudnn_attention have run; attention.cu's kernel where cuDNN
# refuses a shape): against bench-f16's rows and the register kernel's.
stage bench-f16-cudnn-attention 60 SDSTREAM_CUDA_CUDNN_ATTENTION=1 SDSTREAM_BENCH_TAG=-cudnn-attention \
  SDSTREAM_BENCH_ARGS="--vaes taesd --controlnet-counts 0,1 --t-index-lists 32 --frames 100" "${run[@]}" bench-f16
# Each fused attention kernel alone on the UNet's shapes (WMMA, register-level, cuDNN's,
# unfused): five seconds that say whether the register kernel closed the gap to cuDNN's.
stage attention 40 "${run[@]}" attention
# Convolutions with their bias, residual and ReLU in cuDNN's call (SDSTREAM_CUDA_FUSED_CONV, off
# by default until this row and cuda_fused_conv have run): against bench-f16's rows.
stage bench-f16-fused-conv 45 SDSTREAM_CUDA_FUSED_CONV=1 SDSTREAM_BENCH_TAG=-fused-conv \
  SDSTREAM_BENCH_ARGS="--vaes taesd --controlnet-counts 0 --t-index-lists 32 --frames 100" "${run[@]}" bench-f16
# The same with each convolution's engine chosen from cuDNN's graph API by timing
# (SDSTREAM_CUDA_CONV_ENGINES, off by default until this row and cuda_conv_engines have run):
# against the row above.
stage bench-f16-conv-engines 45 SDSTREAM_CUDA_FUSED_CONV=1 SDSTREAM_CUDA_CONV_ENGINES=1 \
  SDSTREAM_BENCH_TAG=-conv-engines \
  SDSTREAM_BENCH_ARGS="--vaes taesd --controlnet-counts 0 --t-index-lists 32 --frames 100" "${run[@]}" bench-f16
# Channels-last GroupNorm through the `_rows` kernels (SDSTREAM_CUDA_GROUP_NORM_ROWS, off by
# default until this row and cuda_group_norm have run): against bench-f16's rows.
stage bench-f16-group-norm-rows 45 SDSTREAM_CUDA_GROUP_NORM_ROWS=1 SDSTREAM_BENCH_TAG=-group-norm-rows \
  SDSTREAM_BENCH_ARGS="--vaes taesd --controlnet-counts 0 --t-index-lists 32 --frames 100" "${run[@]}" bench-f16
# Linear layers with their bias and residual in cuBLASLt's epilogue (SDSTREAM_CUDA_FUSED_LINEAR,
# off by default until this row and cuda_fused_linear have run): against bench-f16's rows.
stage bench-f16-fused-linear 45 SDSTREAM_CUDA_FUSED_LINEAR=1 SDSTREAM_BENCH_TAG=-fused-linear \
  SDSTREAM_BENCH_ARGS="--vaes taesd --controlnet-counts 0 --t-index-lists 32 --frames 100" "${run[@]}" bench-f16
# Upsample-then-convolve layers as four phase convolutions (SDSTREAM_CUDA_PHASE_CONV, off by default
# until this row and cuda_phase_conv have run): against bench-f16's rows, TAESD and the full VAE
# (whose decoder's upsampling convolutions are most of its work).
stage bench-f16-phase-conv 45 SDSTREAM_CUDA_PHASE_CONV=1 SDSTREAM_BENCH_TAG=-phase-conv \
  SDSTREAM_BENCH_ARGS="--vaes taesd,full --controlnet-counts 0 --t-index-lists 32 --frames 60" "${run[@]}" bench-f16
# sdxl-turbo's shapes, 1 step, TAESDXL, 512² and 1024² (drawing its 3.5 G weights first), with
# pinned transfers and the proven switches (the defaults' figures are in docs/GPU.md).
stage bench-sdxl-f16 150 SDSTREAM_CUDA_PINNED=1 "${proven_kernels[@]}" "${run[@]}" bench-sdxl-f16
stage bench-f16-off 45 SDSTREAM_BENCH_TAG=-off \
  SDSTREAM_BENCH_ARGS="--vaes taesd --controlnet-counts 0,1 --t-index-lists 32 --frames 100 --sync-stages off" \
  "${run[@]}" bench-f16
# Frames through page-locked host buffers: against bench-f16-off's first row (both sync off).
stage bench-f16-pinned 45 SDSTREAM_CUDA_PINNED=1 SDSTREAM_BENCH_TAG=-pinned \
  SDSTREAM_BENCH_ARGS="--vaes taesd --controlnet-counts 0 --t-index-lists 32 --frames 100 --sync-stages off" \
  "${run[@]}" bench-f16
stage reference-f16 90 SDSTREAM_REFERENCE_SYNC=off SDSTREAM_REFERENCE_ARGS="--vaes taesd" "${run[@]}" reference-f16
stage sdpa 40 "${run[@]}" sdpa
# The defaults' batched rows (the last H200 kit measured 1/2/4/8 streams with them), to hold the
# all-on rows against in the same run.
stage multi-stream-f16 60 SDSTREAM_MULTI_ARGS="--streams 1,8 --frames 30" "${run[@]}" multi-stream-f16
stage bench-bf16 45 SDSTREAM_BENCH_ARGS="--vaes taesd --controlnet-counts 0,1 --t-index-lists 32" "${run[@]}" bench-bf16
# torch.compile's max-autotune took more than 400 s on an H200 (it did not finish): it gets what is
# left but the last two stages' minute, and reduce-overhead (CUDA graphs, no tuning) when too
# little is.
left=$((budget - ($(date +%s) - start) - 60))
mode=reduce-overhead
((left > 420)) && mode=max-autotune
if ((left >= 30)); then
  stage "reference-compiled-$mode" "$left" SDSTREAM_COMPILE_MODE="$mode" "${run[@]}" reference-compiled
else
  echo "== reference-compiled skipped: ${left} s of the budget left for it" | tee -a "$log"
fi
# Every image processor's time on the device (the pixel ones on the host's way and on the device).
stage processors 30 "${run[@]}" processors
# ControlNet calls batched across streams: 1 and 4 streams, each with the ControlNet.
stage multi-stream-controlnet-f16 30 SDSTREAM_MULTI_ARGS="--streams 1,4 --frames 30" \
  "${run[@]}" multi-stream-controlnet-f16

for table in "$OUT"/bench-*.md "$OUT"/reference-graphs-*.md "$OUT"/sdpa-*.md "$OUT"/attention-*.md "$OUT"/profile-*.txt; do
  [[ -f "$table" ]] || continue
  printf '\n### %s\n\n' "$(basename "$table")"
  cat "$table"
done > "$final/tables.md"
for json in "$OUT"/reference-*.json; do
  [[ -f "$json" ]] || continue
  printf '\n### %s\n\n' "$(basename "$json")"
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["table"])' "$json"
done >> "$final/tables.md"
grep -E '^== ' "$log"
grep -E '^test result|panicked|FAILED|> [0-9.e+-]+' "$log" | head -20
cat "$final/tables.md"
