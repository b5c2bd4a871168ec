#!/usr/bin/env python3
"""Describe make_full_size.py's random checkpoints without their weights, so a machine without
diffusers or transformers (the GPU machine of docs/GPU.md: torch and safetensors only) can draw
weights in the same shapes and with the same per-tensor spread.

Writes one JSON file (default tests/reference/full_size_manifest.json, committed):
  {"folders": {"sd": {"model_index.json": {...}, "scheduler/scheduler_config.json": {...},
                      "unet/config.json": {...}, ...},
               "taesd": {"config.json": {...}}, "controlnet": {"config.json": {...}}},
   "weights": {"sd/unet/diffusion_pytorch_model": [[name, shape, mean, std], ...], ...}}
mean and std are those of each tensor as make_full_size.py initialises it (its TAESD and VAE
rescalings included), rounded to 6 significant digits; scripts/gpu-kit/random_weights.py draws
normal(mean, std) per tensor (std 0: the constant mean). The tokenizer is not described: the
writer copies tests/fixtures/tiny-sd-turbo/tokenizer, as make_full_size.py does.

With --sdxl it describes make_full_size.py's sdxl-turbo-shaped checkpoint and TAESDXL instead
(default out tests/reference/full_size_manifest_sdxl.json, committed): folders "sdxl" and
"taesdxl", written by random_weights.py in float16 only ("half": true, as the published fp16
files; 2.6 G UNet values in float32 would be 10 GB), with the scheduler and both tokenizers
copied from the tiny SDXL fixture ("copy").

Usage: "$REFENV/bin/python" tests/reference/make_full_size_manifest.py [--sdxl] [--out FILE]
(about a minute on 2 cores, five with --sdxl: it builds each network once, in float32, on the
CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_full_size as full  # noqa: E402


def describe(state: dict[str, torch.Tensor]) -> list:
    rows = []
    for name, t in state.items():
        if not t.is_floating_point():
            raise SystemExit(f"{name}: {t.dtype} tensors are not described (only float weights)")
        t = t.detach().float()
        mean = float(t.mean()) if t.numel() else 0.0
        std = float(t.std()) if t.numel() > 1 else 0.0
        rows.append([name, list(t.shape), float(f"{mean:.6g}"), float(f"{std:.6g}")])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).resolve().parent
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--sdxl", action="store_true", help="sdxl-turbo and TAESDXL instead of sd-turbo")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.sdxl:
        out = args.out or here / "full_size_manifest_sdxl.json"
        write(out, sdxl_manifest())
        return
    args.out = args.out or here / "full_size_manifest.json"

    folders = {
        "sd": {
            "model_index.json": full.SD_TURBO_MODEL_INDEX,
            "scheduler/scheduler_config.json": full.SD_TURBO_SCHEDULER,
            "unet/config.json": full.SD_TURBO_UNET,
            "text_encoder/config.json": full.SD_TURBO_TEXT_ENCODER,
            "vae/config.json": full.SD_TURBO_VAE,
        },
        "taesd": {"config.json": full.TAESD},
        "controlnet": {"config.json": full.SD21_CONTROLNET},
    }
    weights = {}
    for key, build in [
        ("sd/unet/diffusion_pytorch_model", full.make_unet),
        ("sd/text_encoder/model", full.make_text_encoder),
        ("sd/vae/diffusion_pytorch_model", full.make_vae),
        ("taesd/diffusion_pytorch_model", full.make_taesd),
        ("controlnet/diffusion_pytorch_model", full.make_controlnet),
    ]:
        module = build()
        state = module.state_dict()
        if key == "sd/text_encoder/model" and not all(k.startswith("text_model.") for k in state):
            state = {f"text_model.{k}": v for k, v in state.items()}
        weights[key] = describe(state)
        print(f"{key}: {len(state)} tensors, {sum(t.numel() for t in state.values()):,d} values", flush=True)
        del module, state
    write(args.out, {"folders": folders, "weights": weights})


def write(out: Path, manifest: dict) -> None:
    out.write_text(json.dumps(manifest, indent=0) + "\n")
    print(f"wrote {out} ({out.stat().st_size:,d} bytes)")


def sdxl_manifest() -> dict:
    """sdxl-turbo's shapes (make_full_size.make_sdxl's networks, same seeds) and TAESDXL."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text_config(config: dict) -> CLIPTextConfig:
        return CLIPTextConfig(**{k: v for k, v in config.items()
                                 if k not in ("architectures", "model_type", "torch_dtype")})

    def unet():
        torch.manual_seed(5)
        return UNet2DConditionModel(**full.diffusers_kwargs(full.SDXL_TURBO_UNET)).eval()

    def text_encoder():
        torch.manual_seed(6)
        return CLIPTextModel(text_config(full.SDXL_TURBO_TEXT_ENCODER)).eval()

    def text_encoder_2():
        torch.manual_seed(7)
        return CLIPTextModelWithProjection(text_config(full.SDXL_TURBO_TEXT_ENCODER_2)).eval()

    folders = {
        "sdxl": {
            "model_index.json": full.SDXL_TURBO_MODEL_INDEX,
            "unet/config.json": full.SDXL_TURBO_UNET,
            "text_encoder/config.json": full.SDXL_TURBO_TEXT_ENCODER,
            "text_encoder_2/config.json": full.SDXL_TURBO_TEXT_ENCODER_2,
        },
        "taesdxl": {"config.json": full.TAESDXL},
    }
    weights = {}
    for key, build in [
        ("sdxl/text_encoder/model", text_encoder),
        ("sdxl/text_encoder_2/model", text_encoder_2),
        ("sdxl/unet/diffusion_pytorch_model", unet),
        ("taesdxl/diffusion_pytorch_model", lambda: full.make_taesd(seed=8)),
    ]:
        module = build()
        state = module.state_dict()
        if key.startswith("sdxl/text_encoder"):
            # transformers 4's key names, as the published files (make_full_size.make_sdxl).
            state = {k if k.startswith(("text_model.", "text_projection."))
                     else f"text_model.{k}": v for k, v in state.items()}
        weights[key] = describe(state)
        print(f"{key}: {len(state)} tensors, {sum(t.numel() for t in state.values()):,d} values", flush=True)
        del module, state
    copy = {f"sdxl/{name}": f"tiny-sdxl/{name}" for name in ["scheduler", "tokenizer", "tokenizer_2"]}
    return {"folders": folders, "weights": weights, "half": True, "copy": copy}


if __name__ == "__main__":
    main()
