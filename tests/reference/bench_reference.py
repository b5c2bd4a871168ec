#!/usr/bin/env python3
"""Time the reference StreamDiffusion (PyPI streamdiffusion 0.1.1 on diffusers) on the full-size
random-weight checkpoints that make_full_size.py (or scripts/gpu-kit/random_weights.py) writes: on the
CPU in float32 (the default), or on a CUDA GPU in float16/float32 (`--device cuda --dtype f16`: torch
eager, diffusers' default attention (SDPA), no TensorRT; `--compile MODE` puts the UNet and TAESD's
encoder and decoder through torch.compile, e.g. `max-autotune` (Inductor's tuned kernels and CUDA
graphs), the best a torch user gets without TensorRT; the warm-up frames then include compiling).

For each resolution x t_index_list x VAE (TAESD or the full AutoencoderKL), with cfg_type "self",
guidance 1.2 (so residual CFG "self"), delta 0.7, 50 inference steps, the stream batch on,
do_add_noise on: one warm-up frame, then N timed frames. A frame is one call as the reference's
own wrapper makes it (StreamDiffusionWrapper.img2img): an RGB PIL frame of width x height in,
`stream(frame)`, then the [-1, 1] output turned into an RGB8 array.

Per frame it records, in milliseconds (host clock; on the CPU the reference's CUDA events are replaced
by host-clock stand-ins and torch.cuda.synchronize by a no-op; on a GPU with `--sync-stages on` each
stage waits for the GPU before and after, so its column is its own work, and with `off` only the total
is meaningful, as a host sees it):
  encode  StreamDiffusion.encode_image  (VAE / TAESD encoder, posterior sample, scaling)
  unet    StreamDiffusion.predict_x0_batch (UNet forward on the stream batch, LCM step, RCFG math)
  decode  StreamDiffusion.decode_image  (VAE / TAESD decoder)
  other   the rest of the frame: PIL -> tensor preprocessing, postprocessing to RGB8, Python glue
  total   the whole frame, in to out; fps = 1000 / total
and, for information, unet_forward (the UNet module's forward alone) and call (stream.__call__,
what the reference's own inference_time_ema measures). The table shows means over the timed frames,
the best frame's total, and "CPU use": the process's CPU time / (threads x wall time); well below
100% means the process waited for cores (a shared machine), and the figures are then inflated.
Beside it: the machine's float32 matmul peak (torch.matmul of 2048 x 2048, best of several),
measured before and after the cases.

Usage (see tests/reference/README.md, "Benchmarks"):
  python tests/reference/bench_reference.py --sd MODEL_DIR --taesd TAESD_DIR --sizes 256 --frames 3 \
      --out ref256.json
--sd and --taesd default to $SDSTREAM_BENCH_MODEL and $SDSTREAM_BENCH_TAESD (what make_full_size.py
wrote there, and what examples/bench.rs reads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BENCH_MODEL_VAR, BENCH_TAESD_VAR, FIXTURES, env_path, patch_cuda_timing, required_path,
)

FRAMES_DIR = FIXTURES / "frames"

# Daydream's StreamDiffusionParams defaults (docs/PARAMS.md) where they apply; guidance 1.2 so
# that cfg "self" really does residual CFG (at 1.0 the reference skips it).
PROMPT = "flowers"
NEGATIVE_PROMPT = "blurry, low quality, flat, 2d"
SEED = 789
NUM_INFERENCE_STEPS = 50
GUIDANCE_SCALE = 1.2
DELTA = 0.7
CFG_TYPE = "self"
# 3 steps: Daydream's default t_index_list. 1 step: its last index (t = 359 on the 50-step grid).
DEFAULT_T_INDEX_LISTS = "32;12,20,32"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class StageTimer:
    """Accumulates wall-clock milliseconds per stage name for the current frame; with a device to wait
    for, each stage waits for it before and after (so a stage's time is its own GPU work)."""

    def __init__(self, sync_device: str | None = None):
        self.ms: dict[str, float] = {}
        self.sync_device = sync_device

    def reset(self) -> None:
        self.ms = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            if self.sync_device:
                sync(self.sync_device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.sync_device:
                    sync(self.sync_device)
                self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1000.0

        return timed


def matmul_peak(n: int = 2048, reps: int = 6, device: str = "cpu", dtype=torch.float32) -> dict:
    """GFLOP/s of torch.matmul on n x n operands (2 n^3 flops per product) on the device, in dtype."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device, dtype)
    b = torch.randn(n, n, generator=generator).to(device, dtype)
    for _ in range(2):
        torch.matmul(a, b)
    sync(device)
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        seconds.append(time.perf_counter() - start)
    flops = 2.0 * n**3
    return {"n": n, "reps": reps, "best_gflops": flops / min(seconds) / 1e9,
            "median_gflops": flops / statistics.median(seconds) / 1e9,
            "best_ms": min(seconds) * 1000.0}


def load_frames(width: int, height: int) -> list[PIL.Image.Image]:
    files = sorted(FRAMES_DIR.glob("*.png"))
    if not files:
        sys.exit(f"no input frames in {FRAMES_DIR}")
    return [PIL.Image.open(f).convert("RGB").resize((width, height), PIL.Image.BICUBIC) for f in files]


def to_rgb8(image: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> HWC uint8, as streamdiffusion's postprocess_image does for output_type "np"/"pil"."""
    x = (image / 2 + 0.5).clamp(0, 1)
    return (x[0].permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)


def load_models(sd_dir: Path, taesd_dir: Path, device: str, dtype):
    from diffusers import AutoencoderTiny, StableDiffusionPipeline

    for folder in (sd_dir, taesd_dir):
        if not folder.exists():
            sys.exit(f"{folder} does not exist: run tests/reference/make_full_size.py first")
    # The float16 variant files when asked for float16 and they exist (random_weights.py writes both).
    variant = "fp16" if dtype == torch.float16 and any(sd_dir.glob("unet/*.fp16.safetensors")) else None
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, torch_dtype=dtype, variant=variant, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    variant = "fp16" if dtype == torch.float16 and any(taesd_dir.glob("*.fp16.safetensors")) else None
    taesd = AutoencoderTiny.from_pretrained(taesd_dir, torch_dtype=dtype, variant=variant).to(device).eval()
    return pipe, taesd


def run_case(pipe, taesd, size: int, t_index_list: list[int], vae: str, warmup: int, frames: int,
             threads: int, device: str = "cpu", dtype=torch.float32, sync_stages: bool = False) -> dict:
    from streamdiffusion import StreamDiffusion

    stream = StreamDiffusion(pipe, t_index_list=t_index_list, torch_dtype=dtype, width=size, height=size,
                             do_add_noise=True, use_denoising_batch=True, frame_buffer_size=1, cfg_type=CFG_TYPE)
    if vae == "taesd":
        stream.vae = taesd  # as StreamDiffusionWrapper does for use_tiny_vae
    timer = StageTimer(device if sync_stages else None)
    stream.encode_image = timer.wrap("encode", stream.encode_image)
    stream.predict_x0_batch = timer.wrap("unet", stream.predict_x0_batch)
    stream.decode_image = timer.wrap("decode", stream.decode_image)
    unet_forward = stream.unet.forward
    stream.unet.forward = timer.wrap("unet_forward", unet_forward)
    try:
        stream.prepare(prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, num_inference_steps=NUM_INFERENCE_STEPS,
                       guidance_scale=GUIDANCE_SCALE, delta=DELTA, generator=torch.Generator(),
                       seed=SEED)
        inputs = load_frames(size, size)
        records, outputs = [], []
        with torch.no_grad():
            for k in range(warmup + frames):
                frame = inputs[k % len(inputs)]
                timer.reset()
                sync(device)
                cpu_start = time.process_time()
                start = time.perf_counter()
                out = stream(frame)
                call_ms = (time.perf_counter() - start) * 1000.0
                to_rgb8(out)
                total_ms = (time.perf_counter() - start) * 1000.0
                cpu_ms = (time.process_time() - cpu_start) * 1000.0
                rec = dict(timer.ms, call=call_ms, total=total_ms, cpu=cpu_ms)
                rec["other"] = total_ms - rec["encode"] - rec["unet"] - rec["decode"]
                if k >= warmup:
                    records.append(rec)
                    outputs.append(out)
                print(f"    {'warm-up' if k < warmup else 'frame'} {k}: " +
                      " ".join(f"{n}={rec[n]:.0f}" for n in ("encode", "unet", "decode", "other", "total")) +
                      f" ms, cpu use {rec['cpu'] / (threads * total_ms):.0%}", flush=True)
    finally:
        del stream.unet.forward  # back to the class's forward: the pipeline is shared between cases
    out = torch.cat(outputs)
    stages = ("encode", "unet", "unet_forward", "decode", "other", "call", "total", "cpu")
    mean = {s: statistics.fmean(r[s] for r in records) for s in stages}
    return {
        "size": size, "t_index_list": t_index_list, "steps": len(t_index_list), "vae": vae,
        "unet_batch": int(stream.batch_size), "warmup_frames": warmup, "timed_frames": frames,
        "mean_ms": mean, "min_ms": {s: min(r[s] for r in records) for s in stages},
        "fps": 1000.0 / mean["total"], "best_fps": 1000.0 / min(r["total"] for r in records),
        "cpu_use": mean["cpu"] / (threads * mean["total"]), "frames_ms": records,
        "output": {"finite": bool(torch.isfinite(out).all()), "mean": float(out.mean()), "std": float(out.std())},
    }


def markdown(results: list[dict], peak: dict, meta: dict) -> str:
    lines = [
        f"Reference StreamDiffusion {meta['streamdiffusion']} (diffusers {meta['diffusers']}, torch {meta['torch']}), "
        f"{meta['device']} {meta['dtype']} (stages synchronised: {meta['sync_stages']}; torch.compile: {meta['compile']}), "
        f"{meta['threads']} threads, cfg {CFG_TYPE}, guidance {GUIDANCE_SCALE}, delta {DELTA}; "
        f"full-size random weights (sd-turbo / taesd shapes); mean of timed frames after {meta['warmup']} warm-up.",
        f"Machine: {meta['cpu']}, {meta['cpus']} CPUs{', ' + meta['gpu'] if meta['gpu'] else ''}; matmul peak "
        f"{peak['best_gflops']:.1f} GFLOP/s ({meta['peak_n']}^2, {meta['dtype']}, {meta['threads']} threads; median {peak['median_gflops']:.1f}) "
        f"before the cases, {meta['peak_after']['best_gflops']:.1f} after. Load average "
        f"{meta['load_average_start'][0]:.2f} at start, {meta['load_average_end'][0]:.2f} at end; "
        f"peak memory {meta['max_rss_gb']:.1f} GB; GPU memory {meta['gpu_max_allocated_gb']:.2f} GB allocated at most.",
        "CPU use = process CPU time / (threads x wall); below 100% the process waited for cores.",
        "",
        "| size | steps (t_index_list) | VAE | encode ms | UNet ms | decode ms | other ms | total ms | fps "
        "| best total ms | CPU use |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r["mean_ms"]
        lines.append(f"| {r['size']}² | {r['steps']} ({','.join(map(str, r['t_index_list']))}) | {r['vae']} | "
                     f"{m['encode']:.2f} | {m['unet']:.2f} | {m['decode']:.2f} | {m['other']:.2f} | "
                     f"{m['total']:.2f} | {r['fps']:.3f} | {r['min_ms']['total']:.2f} | {r['cpu_use']:.0%} |")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd", type=Path, default=env_path(BENCH_MODEL_VAR),
                        help=f"sd-turbo-shaped diffusers folder (default: ${BENCH_MODEL_VAR})")
    parser.add_argument("--taesd", type=Path, default=env_path(BENCH_TAESD_VAR),
                        help=f"taesd-shaped folder (default: ${BENCH_TAESD_VAR})")
    parser.add_argument("--sizes", default="256,512", help="square resolutions, comma-separated")
    parser.add_argument("--t-index-lists", default=DEFAULT_T_INDEX_LISTS,
                        help="t_index_lists separated by ';', each comma-separated (default: %(default)s)")
    parser.add_argument("--vaes", default="taesd,full", help="taesd and/or full, comma-separated")
    parser.add_argument("--warmup", type=int, default=1, help="untimed frames first")
    parser.add_argument("--frames", type=int, default=3, help="timed frames per case")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    parser.add_argument("--dtype", default="f32", choices=("f32", "f16"), help="weights and activations")
    parser.add_argument("--sync-stages", default="on", choices=("on", "off"),
                        help="on a GPU: wait for it around every stage (per-stage columns) or not (the total)")
    parser.add_argument("--compile", default="none",
                        choices=("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                        help="torch.compile mode for the UNet and TAESD's encoder and decoder (default: eager)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    dtype = {"f32": torch.float32, "f16": torch.float16}[args.dtype]
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: torch sees no CUDA device")
    if not on_gpu and dtype != torch.float32:
        sys.exit("--dtype f16 needs --device cuda (the reference runs float16 on GPUs only)")
    args.sd = required_path(args.sd, "--sd", BENCH_MODEL_VAR, "sd-turbo-shaped model folder")
    args.taesd = required_path(args.taesd, "--taesd", BENCH_TAESD_VAR, "TAESD folder")

    sizes = [int(s) for s in args.sizes.split(",") if s]
    t_index_lists = [[int(i) for i in part.split(",")] for part in args.t_index_lists.split(";") if part]
    vaes = [v for v in args.vaes.split(",") if v]
    for v in vaes:
        if v not in ("taesd", "full"):
            sys.exit(f"--vaes: unknown VAE {v!r} (taesd or full)")
    for s in sizes:
        if s % 8:
            sys.exit(f"--sizes: {s} is not a multiple of 8")

    torch.set_num_threads(args.threads)
    if not on_gpu:
        patch_cuda_timing()
    import diffusers
    import importlib.metadata

    meta = {
        "streamdiffusion": importlib.metadata.version("streamdiffusion"), "diffusers": diffusers.__version__,
        "torch": torch.__version__, "threads": args.threads, "cpu": cpu_name(), "cpus": os.cpu_count(),
        "warmup": args.warmup, "frames": args.frames, "sd": str(args.sd), "taesd": str(args.taesd),
        "prompt": PROMPT, "negative_prompt": NEGATIVE_PROMPT, "seed": SEED, "num_inference_steps": NUM_INFERENCE_STEPS,
        "guidance_scale": GUIDANCE_SCALE, "delta": DELTA, "cfg_type": CFG_TYPE,
        "load_average_start": os.getloadavg(), "device": args.device, "dtype": args.dtype,
        "sync_stages": args.sync_stages if on_gpu else "n/a",
        "gpu": torch.cuda.get_device_name() if on_gpu else None, "peak_n": 8192 if on_gpu else 2048,
    }
    peak = matmul_peak(meta["peak_n"], device=args.device, dtype=dtype)
    print(f"float32 matmul peak: {peak['best_gflops']:.1f} GFLOP/s (median {peak['median_gflops']:.1f})", flush=True)

    start = time.perf_counter()
    pipe, taesd = load_models(args.sd, args.taesd, args.device, dtype)
    meta["load_s"] = time.perf_counter() - start
    meta["compile"] = args.compile
    if args.compile != "none":
        # Compiled lazily, at the first (warm-up) call of each shape.
        pipe.unet = torch.compile(pipe.unet, mode=args.compile)
        taesd.encoder = torch.compile(taesd.encoder, mode=args.compile)
        taesd.decoder = torch.compile(taesd.decoder, mode=args.compile)
    print(f"models loaded in {meta['load_s']:.0f} s", flush=True)

    results = []
    for size in sizes:
        for t_index_list in t_index_lists:
            for vae in vaes:
                print(f"  {size}x{size} t_index_list={t_index_list} vae={vae}", flush=True)
                results.append(run_case(pipe, taesd, size, t_index_list, vae, args.warmup, args.frames,
                                        args.threads, args.device, dtype, args.sync_stages == "on"))
    meta["load_average_end"] = os.getloadavg()
    meta["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB
    meta["peak_after"] = matmul_peak(meta["peak_n"], device=args.device, dtype=dtype)
    meta["gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9 if on_gpu else 0.0

    table = markdown(results, peak, meta)
    print()
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "matmul_peak": peak, "results": results, "table": table}, f, indent=2)
            f.write("\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
