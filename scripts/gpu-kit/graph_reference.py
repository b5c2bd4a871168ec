#!/usr/bin/env python3
"""Times diffusers' networks alone, as a torch user at their fastest without TensorRT runs them:
the UNet (UNet2DConditionModel) and TAESD's encoder and decoder (AutoencoderTiny) at one size
and batch, eager and replayed from a torch CUDA graph, channels first and channels last, with
torch's default choice of fused attention and with cuDNN's. Issue 46's target "the UNet at or
under the torch CUDA-graph UNet's time on the same GPU" is held against these figures; the
batch-8 rows are what issue 44's batched round of eight streams costs torch.

Each figure is the mean of CUDA-event-timed calls (or replays) after warm-up calls, on the
weights scripts/gpu-kit/random_weights.py wrote (sd-turbo's and TAESD's shapes). The inputs are
those of a one-step stream at SIZE²: latents [B, 4, SIZE/8, SIZE/8], the timestep as a device
tensor (as StreamDiffusion passes it; a host integer would be a copy inside the capture), the
prompt's hidden states [B, 77, cross_attention_dim], images [B, 3, SIZE, SIZE] for the encoder.

On the CPU (`--device cpu`, a smoke test on the tiny fixtures) only the eager rows run, timed by
the host clock.

  python scripts/gpu-kit/graph_reference.py --sd DIR --taesd DIR [--dtype f16] [--size 512]
      [--batches 1,8] [--reps 50] [--eager-reps 20] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


def load(args: argparse.Namespace, dtype: torch.dtype):
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    # The kit writes float16 copies beside the float32 files: read those for f16 (seconds, not
    # tens of seconds), the float32 ones otherwise.
    def variant(folder: Path) -> str | None:
        half = dtype == torch.float16 and (folder / "diffusion_pytorch_model.fp16.safetensors").exists()
        return "fp16" if half else None

    unet_dir = args.sd / "unet"
    unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=dtype, variant=variant(unet_dir))
    taesd = AutoencoderTiny.from_pretrained(args.taesd, torch_dtype=dtype, variant=variant(args.taesd))
    return unet.to(args.device).eval(), taesd.to(args.device).eval()


def timed(fn, device: str, warmup: int, reps: int) -> float:
    """Milliseconds per call of fn, the mean of reps calls after warmup calls."""
    for _ in range(warmup):
        fn()
    if device == "cpu":
        began = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - began) * 1000 / reps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def graphed(fn, warmup: int):
    """fn captured in a CUDA graph (after warm-up calls on a side stream, as torch asks), and the
    replay that stands for it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd", type=Path, required=True, help="diffusers folder with unet/")
    parser.add_argument("--taesd", type=Path, required=True, help="AutoencoderTiny folder")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", default="f16", choices=tuple(DTYPES))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=50, help="timed replays of each CUDA graph")
    parser.add_argument("--eager-reps", type=int, default=20,
                        help="timed eager calls (an eager UNet call is host-bound: tens of ms)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.size % 8 != 0:
        parser.error(f"--size {args.size} is not a multiple of 8 (the autoencoder's scale)")
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--batches {args.batches!r}: expected comma-separated integers")
    if not batches or min(batches) < 1:
        parser.error(f"--batches {args.batches!r}: every batch must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    unet, taesd = load(args, dtype)
    cuda = args.device == "cuda"
    latent = args.size // 8
    hidden = unet.config.cross_attention_dim
    where = torch.cuda.get_device_name() if cuda else "CPU"
    lines = [
        f"torch {torch.__version__}, diffusers networks alone, {where}, {args.dtype}, {args.size}², "
        f"mean of {args.eager_reps} eager calls and {args.reps} graph replays "
        f"({'CUDA events' if cuda else 'host clock'}) after {args.warmup} warm-up; the UNet's timestep a device tensor; TAESD's encoder and decoder modules alone "
        "(no scaling around them)",
        "",
        "| network | batch | memory format | attention | eager ms | CUDA graph ms |",
        "|---|---:|---|---|---:|---:|",
    ]
    print(lines[0], flush=True)
    backends = [("torch's default", None)]
    if cuda:
        backends.append(("cuDNN", SDPBackend.CUDNN_ATTENTION))
    with torch.inference_mode():
        for batch in batches:
            sample = torch.randn(batch, 4, latent, latent, device=args.device, dtype=dtype)
            timestep = torch.full((batch,), 999, device=args.device, dtype=torch.long)
            states = torch.randn(batch, 77, hidden, device=args.device, dtype=dtype)
            image = torch.rand(batch, 3, args.size, args.size, device=args.device, dtype=dtype) * 2 - 1
            for layout in ("channels first", "channels last"):
                fmt = torch.channels_last if layout == "channels last" else torch.contiguous_format
                unet.to(memory_format=fmt)
                taesd.to(memory_format=fmt)
                x = sample.contiguous(memory_format=fmt)
                img = image.contiguous(memory_format=fmt)
                cases = [
                    ("UNet", lambda: unet(x, timestep, encoder_hidden_states=states, return_dict=False)[0], backends),
                    ("TAESD encoder", lambda: taesd.encoder(img), backends[:1]),
                    ("TAESD decoder", lambda: taesd.decoder(x), backends[:1]),
                ]
                for name, fn, attention in cases:
                    for label, backend in attention:
                        context = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
                        with context:
                            try:
                                eager = f"{timed(fn, args.device, args.warmup, args.eager_reps):.3f}"
                            except RuntimeError as e:  # a backend that refuses the shapes
                                eager = f"failed: {str(e).splitlines()[0][:80]}"
                            graph = "–"
                            if cuda and not eager.startswith("failed"):
                                try:
                                    replay = graphed(fn, args.warmup)
                                    graph = f"{timed(replay, args.device, args.warmup, args.reps):.3f}"
                                except RuntimeError as e:
                                    graph = f"failed: {str(e).splitlines()[0][:80]}"
                        row = f"| {name} | {batch} | {layout} | {label if name == 'UNet' else '–'} | {eager} | {graph} |"
                        lines.append(row)
                        print(row, flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
