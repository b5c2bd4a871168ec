#!/usr/bin/env python3
"""Re-implement the stream arithmetic of docs/ALGORITHM.md (sections 1-4) independently, on top of
the diffusers networks, and compare with the reference's stream goldens in tests/fixtures/golden/.

It answers "does the arithmetic ALGORITHM.md describes reproduce what streamdiffusion 0.1.1
computes, and where exactly do sdstream's choices part from it?" case by case: the variants switch
between sdstream's grid (S = 100) and the reference's (S = 50), with and without the step-by-step
path's init_noise overwrite, and f64 or f32 coefficients. The results are in
tests/reference/README.md. Nothing here is written to disk.

Usage: python tests/reference/check_algorithm.py
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

torch.set_num_threads(1)


def timestep_grid(n: int, original_steps: int) -> list[int]:
    """Section 1: T[i] = origin[floor(i*S/N)], origin = reversed(k*j - 1 for j = 1..S), k = 1000 // S."""
    k = 1000 // original_steps
    origin = [k * j - 1 for j in range(1, original_steps + 1)][::-1]
    return [origin[(i * original_steps) // n] for i in range(n)]


def alphas_cumprod_f64() -> np.ndarray:
    j = np.arange(1000, dtype=np.float64)
    betas = (math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * j / 999) ** 2
    return np.cumprod(1 - betas)


class TorchSerialNormal:
    """torch's CPU randn for tensors it cannot fill with the vectorised path (fewer than 16 values,
    or not contiguous, e.g. randn_like of a channels-last tensor): per value, two 53-bit uniforms
    u1, u2 from MT19937 (hi word first), r = sqrt(-2 log1p(-u2)), theta = 2 pi u1, value r cos(theta)
    and the next value r sin(theta) (cached in the generator), rounded to float32, written in the
    tensor's memory order."""

    def __init__(self, seed: int):
        self.mt = np.random.RandomState(seed)._bit_generator  # same MT19937 seeding as torch
        self.cached = None

    def uniform53(self) -> float:
        hi, lo = int(self.mt.random_raw()), int(self.mt.random_raw())
        return (((hi << 32) | lo) & ((1 << 53) - 1)) * 2.0**-53

    def normal(self) -> float:
        if self.cached is not None:
            value, self.cached = self.cached, None
            return value
        u1, u2 = self.uniform53(), self.uniform53()
        r, theta = math.sqrt(-2.0 * math.log1p(-u2)), 2.0 * math.pi * u1
        self.cached = r * math.sin(theta)
        return r * math.cos(theta)

    def randn_like_channels_last(self, shape) -> torch.Tensor:
        n, c, h, w = shape
        values = np.array([self.normal() for _ in range(n * c * h * w)], dtype=np.float64)
        return torch.from_numpy(values.astype(np.float32).reshape(n, h, w, c)).permute(0, 3, 1, 2)


class SpecStream:
    """Sections 2-4 of docs/ALGORITHM.md, frame_buffer_size 1."""

    def __init__(self, s: dict, pipe, taesd, original_steps: int, nonbatch_overwrites_init_noise: bool,
                 f32_coefficients: bool = False):
        self.s, self.pipe = s, pipe
        self.vae = taesd if s["vae"] == "taesd" else pipe.vae
        self.scaling = self.vae.config.scaling_factor
        self.n = len(s["t_index_list"])
        self.quirk = nonbatch_overwrites_init_noise
        grid = timestep_grid(s["num_inference_steps"], original_steps)
        self.t = [grid[i] for i in s["t_index_list"]]
        ac = alphas_cumprod_f64()
        self.a = [math.sqrt(ac[t]) for t in self.t]
        self.b = [math.sqrt(1 - ac[t]) for t in self.t]
        sigma = 0.5
        self.c_skip = [sigma**2 / ((10 * t) ** 2 + sigma**2) for t in self.t]
        self.c_out = [10 * t / math.sqrt((10 * t) ** 2 + sigma**2) for t in self.t]
        if f32_coefficients:  # as diffusers computes them: float32 betas, cumprod, sqrt, scalings
            sched = load_file(mf.GOLDEN_DIR / "scheduler.safetensors")
            ac32 = sched["alphas_cumprod"]
            self.a = [ac32[t].sqrt().item() for t in self.t]
            self.b = [(1 - ac32[t]).sqrt().item() for t in self.t]
            self.c_skip = [sched["c_skip"][t].item() for t in self.t]
            self.c_out = [sched["c_out"][t].item() for t in self.t]
        self.g = 1.0 if s["cfg_type"] == "none" else s["guidance_scale"]
        self.gen = torch.Generator().manual_seed(s["seed"])
        rows = self.n if s["use_denoising_batch"] else 1
        h, w = s["height"] // 8, s["width"] // 8
        self.init_noise = torch.randn((rows, 4, h, w), generator=self.gen)
        self.stock = torch.zeros_like(self.init_noise)
        self.buffer = torch.zeros((self.n - 1, 4, h, w))
        self.global_gen = torch.Generator().manual_seed(s["global_seed"])
        # The step-by-step path re-noises with torch.randn_like(x0) on the global generator; x0 comes
        # out of the diffusers UNet in channels-last layout, so torch takes its serial path.
        self.global_serial = TorchSerialNormal(s["global_seed"])
        self.cond = self.encode(s["prompt"])
        self.uncond = self.encode(s["negative_prompt"])

    def encode(self, text: str) -> torch.Tensor:
        ids = self.pipe.tokenizer([text], padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids
        return self.pipe.text_encoder(ids)[0]

    def col(self, values, rows=None) -> torch.Tensor:
        v = torch.tensor(values, dtype=torch.float64).to(torch.float32).view(-1, 1, 1, 1)
        return v if rows is None else v[rows]

    def guided_eps(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """Section 4 for the rows `rows` of the schedule, x holding exactly those rows."""
        t = torch.tensor(self.t[rows], dtype=torch.int64)
        cfg, m = self.s["cfg_type"], x.shape[0]
        cond = self.cond.repeat(m, 1, 1)
        if self.g > 1 and cfg == "full":
            eps = self.pipe.unet(torch.cat([x, x]), torch.cat([t, t]),
                                 encoder_hidden_states=torch.cat([self.uncond.repeat(m, 1, 1), cond])).sample
            eps_u, eps_c = eps.chunk(2)
        elif self.g > 1 and cfg == "initialize":
            eps = self.pipe.unet(torch.cat([x[:1], x]), torch.cat([t[:1], t]),
                                 encoder_hidden_states=torch.cat([self.uncond, cond])).sample
            self.stock = torch.cat([eps[:1], self.stock[1:]])
            eps_c = eps[1:]
            eps_u = self.s["delta"] * self.stock
        else:
            eps_c = self.pipe.unet(x, t, encoder_hidden_states=cond).sample
            eps_u = self.s["delta"] * self.stock if cfg == "self" else None
        if self.g > 1:
            return eps_u + self.g * (eps_c - eps_u)
        return eps_c

    def x0(self, x, eps, rows):
        a, b, cs, co = (self.col(v)[rows] for v in (self.a, self.b, self.c_skip, self.c_out))
        return co * (x - b * eps) / a + cs * x

    def frame(self, image: PIL.Image.Image | None) -> torch.Tensor:
        s = self.s
        if image is None:  # txt2img: a fresh randn latent instead of step 3
            x_new = torch.randn((1, 4, s["height"] // 8, s["width"] // 8), generator=self.global_gen)
        else:
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
            x = pixels * 2 - 1
            if s["vae"] == "taesd":
                z0 = self.vae.encode(x).latents
            else:
                dist = self.vae.encode(x).latent_dist
                z0 = dist.mean + torch.exp(0.5 * dist.logvar.clamp(-30, 20)) * torch.randn(
                    dist.mean.shape, generator=self.gen)
            z0 = self.scaling * z0
            x_new = self.col(self.a)[0] * z0 + self.col(self.b)[0] * self.init_noise[0]
        out = self.batch_step(x_new) if s["use_denoising_batch"] else self.sequential_step(x_new)
        decoded = self.vae.decode(out / self.scaling).sample
        return (decoded / 2 + 0.5).clamp(0, 1)

    def batch_step(self, x_new):
        n = self.n
        X = torch.cat([x_new, self.buffer]) if n > 1 else x_new
        if n > 1:
            self.stock = torch.cat([self.init_noise[:1], self.stock[:-1]])
        eps = self.guided_eps(X, slice(0, n))
        x0 = self.x0(X, eps, slice(0, n))
        if self.s["cfg_type"] in ("self", "initialize"):
            a, b = self.col(self.a), self.col(self.b)
            a_next = torch.cat([a[1:], torch.ones(1, 1, 1, 1)])
            b_next = torch.cat([b[1:], torch.ones(1, 1, 1, 1)])
            cs, co = self.col(self.c_skip), self.col(self.c_out)
            rolled = torch.cat([self.init_noise[1:], self.init_noise[:1]])
            self.stock = rolled + (a_next / b_next) * (
                co * (b * self.stock - b * eps) / a + cs * b * self.stock)
        if n > 1:
            a, b = self.col(self.a), self.col(self.b)
            self.buffer = a[1:] * x0[:-1] + (b[1:] * self.init_noise[1:] if self.s["do_add_noise"] else 0)
        return x0[-1:]

    def sequential_step(self, x):
        if self.quirk:  # the reference stores the noisy latent as init_noise (used by the next encode)
            self.init_noise = x
        for i in range(self.n):
            eps = self.guided_eps(x, slice(i, i + 1))
            x0 = self.x0(x, eps, slice(i, i + 1))
            if i < self.n - 1:
                x = self.col(self.a)[i + 1] * x0
                if self.s["do_add_noise"]:
                    x = x + self.col(self.b)[i + 1] * self.global_serial.randn_like_channels_last(x0.shape)
        return x0


def run(case: dict, pipe, taesd, original_steps: int, quirk: bool, f32: bool) -> torch.Tensor:
    stream = SpecStream(case, pipe, taesd, original_steps, quirk, f32)
    outs = []
    with torch.no_grad():
        for k in range(case["num_frames"]):
            for update in case["updates"]:
                if update["before_frame"] == k:
                    stream.cond = stream.encode(update["prompt"])
            image = None if case["mode"] == "txt2img" else PIL.Image.open(mf.FIXTURES / case["frames"][k]).convert("RGB")
            outs.append(stream.frame(image))
    return torch.cat(outs)


def main() -> None:
    pipe, taesd = mf.load_sd_pipeline(), mf.load_taesd()
    cases = json.loads((mf.GOLDEN_DIR / "streams.json").read_text())["cases"]
    variants = [  # (label, original_inference_steps, step-by-step init_noise quirk, f32 coefficients)
        ("S=100", 100, False, False),
        ("S=50", 50, False, False),
        ("S=50+quirk", 50, True, False),
        ("S=50+quirk+f32", 50, True, True),
    ]
    print("max abs error of the output [F,3,64,64] in [0,1] against the reference's")
    print(f"{'case':26s}" + "".join(f"{label:>20s}" for label, *_ in variants))
    for case in cases:
        golden = load_file(mf.FIXTURES / case["file"])["output"]
        row = f"{case['name']:26s}"
        for _, steps, quirk, f32 in variants:
            error = (run(case, pipe, taesd, steps, quirk, f32) - golden).abs().max().item()
            row += f"{error:20.2e}"
        print(row)


if __name__ == "__main__":
    main()
