"""Helpers shared by the scripts in tests/reference/ (paths, JSON writing, bit dumps, the CPU
stand-ins for the reference's CUDA timing, the rescalings that make random weights usable, and
folders given by flag or environment variable).

The scripts run as `python tests/reference/NAME.py`, which puts this folder on sys.path, so a
plain `import _common` finds this file.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
# SDSTREAM_FIXTURES moves the fixtures (as the Rust tests allow): a GPU machine reads them from
# the unpacked GPU kit (scripts/gpu-kit/run.sh).
FIXTURES = Path(os.environ.get("SDSTREAM_FIXTURES") or REPO / "tests" / "fixtures")
GOLDEN_DIR = FIXTURES / "golden"

# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    """Indented JSON (UTF-8, non-ASCII kept as is) with a final newline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_json_dense(path, obj, ensure_ascii: bool = True) -> None:
    """JSON without spaces (large goldens) with a final newline; says what it wrote."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=ensure_ascii, separators=(",", ":"))
        f.write("\n")
    print("wrote", os.path.normpath(path), os.path.getsize(path), "bytes")


def hexbits(t) -> str:
    """The float32 bit patterns of a tensor (or anything torch.as_tensor takes), 8 hex digits
    each, in row-major order: a golden that compares bit for bit."""
    a = torch.as_tensor(t).detach().reshape(-1).to(torch.float32).numpy()
    return "".join(f"{b:08x}" for b in a.view(np.uint32).tolist())


# --------------------------------------------------------------------------------------
# Running the reference on a CPU
# --------------------------------------------------------------------------------------


class HostEvent:
    """Stand-in for torch.cuda.Event on CPU: host clock, elapsed_time in milliseconds."""

    def __init__(self, enable_timing: bool = False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def elapsed_time(self, end: "HostEvent") -> float:
        return (end.t - self.t) * 1000.0


def timed(fn, frames: int) -> tuple[float, float]:
    """Runs `fn` once to warm up, then `frames` times: (median, best) milliseconds."""
    import statistics

    fn()
    times = []
    for _ in range(frames):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), min(times)


def patch_cuda_timing() -> None:
    """The reference times every frame with CUDA events; make them host-clock ones, for good."""
    torch.cuda.Event = HostEvent
    torch.cuda.synchronize = lambda *a, **k: None


# --------------------------------------------------------------------------------------
# Random weights that behave like trained ones (used by the tiny fixtures and the full-size
# benchmark checkpoints alike; see README.md, "Random weights")
# --------------------------------------------------------------------------------------

# AutoencoderKL: the mean half of quant_conv is scaled so that scaled latents have a real VAE's spread.
VAE_MEAN_SCALE = 20.0
# UNet-like nets: norm affines jittered around (1, 0) so that all-zero inputs stay well-conditioned.
UNET_NORM_JITTER = 0.2
# TAESD: He-init gain of every conv, then gains on the encoder's and decoder's last convs.
TAESD_INIT_GAIN = 0.8
TAESD_ENCODER_SCALE = 1.3
TAESD_DECODER_SCALE = 0.035
TAESD_DECODER_SHIFT = 0.47


def scale_vae_mean(vae) -> None:
    """Scale the posterior-mean half (output channels 0..3) of an AutoencoderKL's quant_conv."""
    with torch.no_grad():
        vae.quant_conv.weight[:4] *= VAE_MEAN_SCALE
        vae.quant_conv.bias[:4] *= VAE_MEAN_SCALE


def jitter_norms(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every GroupNorm / LayerNorm a random affine: weight 1 + j·N(0,1), bias j·N(0,1)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(1.0 + UNET_NORM_JITTER * torch.randn(m.weight.shape, generator=generator))
                m.bias.copy_(UNET_NORM_JITTER * torch.randn(m.bias.shape, generator=generator))


def tune_taesd(taesd, seed: int) -> None:
    """Re-initialise an AutoencoderTiny so that its latents depend on the input.

    diffusers' default init shrinks activations through TAESD's ~40 relu convs: latents come out
    nearly the same for every input. Every conv gets a variance-preserving (He) normal init, the
    encoder's last conv a gain (latents std ~1), and the decoder's last conv a gain and a shift so
    that what the streams decode (x0 latents of std ~8, squashed by TAESD's tanh) lands near 0 in
    [-1, 1] with few clamped pixels.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in taesd.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                std = TAESD_INIT_GAIN * math.sqrt(2.0 / fan_in)
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if module.bias is not None:
                    module.bias.copy_((torch.rand(module.bias.shape, generator=generator) - 0.5) * 0.1)
        taesd.encoder.layers[-1].weight *= TAESD_ENCODER_SCALE
        taesd.encoder.layers[-1].bias *= TAESD_ENCODER_SCALE
        taesd.decoder.layers[-1].weight *= TAESD_DECODER_SCALE
        taesd.decoder.layers[-1].bias.mul_(TAESD_DECODER_SCALE).add_(TAESD_DECODER_SHIFT)


# --------------------------------------------------------------------------------------
# Folders outside the repository
# --------------------------------------------------------------------------------------

# Where the benchmark checkpoints live (make_full_size.py writes them, bench_reference.py and
# examples/bench.rs read them): the same variables everywhere.
BENCH_MODEL_VAR = "SDSTREAM_BENCH_MODEL"
BENCH_TAESD_VAR = "SDSTREAM_BENCH_TAESD"


def env_path(var: str) -> Path | None:
    """The folder named by environment variable `var`, or None when it is unset or empty."""
    value = os.environ.get(var, "").strip()
    return Path(value) if value else None


def required_path(value: Path | None, flag: str, var: str, what: str) -> Path:
    """`value` (from `flag`, defaulting to `var`), or exit with a message saying how to give it."""
    if value is None:
        sys.exit(f"no {what}: pass {flag} DIR or set {var}")
    return value
