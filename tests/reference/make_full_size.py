#!/usr/bin/env python3
"""Build full-size random-weight checkpoints in the exact shapes of stabilityai/sd-turbo and
madebyollin/taesd, for benchmarks (never for correctness goldens, never committed).

  SD_OUT/            diffusers folder laid out like stabilityai/sd-turbo
    model_index.json, scheduler/, tokenizer/ (copied from tests/fixtures/tiny-sd-turbo),
    text_encoder/ (OpenCLIP-H text tower, 23 layers), unet/ (SD 2.1 UNet), vae/ (SD AutoencoderKL)
  TAESD_OUT/         AutoencoderTiny laid out like madebyollin/taesd
  CONTROLNET_OUT/    (with --controlnet-out) a ControlNetModel in the shapes of the SD 2.1
                     ControlNets Daydream streams with sd-turbo (thibaud/controlnet-sd21-*-diffusers);
                     with --controlnet-as-published, in their published form (a lone fp16 .bin)
  SDXL_OUT/          (with --sdxl-out) a folder laid out like stabilityai/sdxl-turbo without its VAE
                     (the SDXL rows use TAESDXL): both tokenizers (copied from tests/fixtures/tiny-sdxl),
                     text_encoder (CLIP ViT-L/14 text), text_encoder_2 (OpenCLIP bigG text with its
                     projection), unet (SDXL's, 2.6 B parameters); weights stored as float16 only
                     (a float32 load casts them; the f32 UNet file alone would be 10 GB)
  TAESDXL_OUT/       (with --taesdxl-out) AutoencoderTiny laid out like madebyollin/taesdxl

The config.json files are sd-turbo's / taesd's own (written out below as dicts), so a loader sees
exactly what it would see in the real checkpoints. Weights: float32 `*.safetensors`, plus float16
`*.fp16.safetensors` variants as the real repositories have (skip with --no-fp16).

Usage (see tests/reference/README.md, "Benchmarks"):
  python tests/reference/make_full_size.py [--sd-out DIR] [--taesd-out DIR] [--no-fp16]
  python tests/reference/make_full_size.py --sdxl-out DIR --taesdxl-out DIR   (SDXL only)
--sd-out and --taesd-out default to $SDSTREAM_BENCH_MODEL and $SDSTREAM_BENCH_TAESD, the folders
bench_reference.py and examples/bench.rs read; they must lie outside the repository.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BENCH_MODEL_VAR, BENCH_TAESD_VAR, FIXTURES, REPO, env_path, required_path, scale_vae_mean, tune_taesd,
    write_json,
)

TOKENIZER_SRC = FIXTURES / "tiny-sd-turbo" / "tokenizer"


# --------------------------------------------------------------------------------------
# Configs: stabilityai/sd-turbo and madebyollin/taesd, as in their config.json files
# --------------------------------------------------------------------------------------

SD_TURBO_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.24.0.dev0",
    "feature_extractor": [None, None],
    "requires_safety_checker": True,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SD_TURBO_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.24.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# SD 2.1 UNet. "attention_head_dim" is, in diffusers' naming for this family, the number of heads
# per level (5, 10, 20, 20 heads of 64 channels); the mid block uses the last.
SD_TURBO_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.24.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": None,
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": None,
    "attention_head_dim": [5, 10, 20, 20],
    "attention_type": "default",
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 1024,
    "cross_attention_norm": None,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dropout": 0.0,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": None,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "reverse_transformer_layers_per_block": None,
    "sample_size": 64,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": 1,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# OpenCLIP ViT-H/14 text tower as transformers' CLIPTextModel (the penultimate layer: 23 of 24).
SD_TURBO_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "torch_dtype": "float32",
    "transformers_version": "4.36.0.dev0",
    "vocab_size": 49408,
}

SD_TURBO_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.24.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# An SD 2.1 ControlNet (thibaud/controlnet-sd21-*-diffusers): the UNet's encoder half with the same
# block sizes, heads and cross-attention width, a 3-channel conditioning embedding.
SD21_CONTROLNET = {
    "_class_name": "ControlNetModel",
    "_diffusers_version": "0.14.0",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "class_embed_type": None,
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default",
    "upcast_attention": False,
    "use_linear_projection": True,
}

# madebyollin/taesd: AutoencoderTiny's defaults (64 channels everywhere).
TAESD = {
    "_class_name": "AutoencoderTiny",
    "_diffusers_version": "0.20.0.dev0",
    "act_fn": "relu",
    "decoder_block_out_channels": [64, 64, 64, 64],
    "encoder_block_out_channels": [64, 64, 64, 64],
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 4,
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "num_decoder_blocks": [3, 3, 3, 1],
    "num_encoder_blocks": [1, 3, 3, 3],
    "out_channels": 3,
    "scaling_factor": 1.0,
    "upsampling_scaling_factor": 2,
}

# The VAE and TAESD get the rescalings of the tiny checkpoints (_common.py), so that decoded images
# are neither constant nor saturated (not needed for timing, but it keeps every activation in a
# normal float range: no NaN, inf or denormals).


# stabilityai/sdxl-turbo (model_index, unet, both text encoders; its scheduler and tokenizers are
# copied from tests/fixtures/tiny-sdxl, which has sdxl-turbo's tokenizer settings) and
# madebyollin/taesdxl, as in their config.json files.
SDXL_TURBO_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.24.0.dev0",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": [None, None],
}

SDXL_TURBO_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.24.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 64,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

SDXL_TURBO_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float16",
    "vocab_size": 49408,
}

SDXL_TURBO_TEXT_ENCODER_2 = {
    "architectures": ["CLIPTextModelWithProjection"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "torch_dtype": "float16",
    "vocab_size": 49408,
}

# madebyollin/taesdxl has taesd's shapes and config.
TAESDXL = TAESD


def diffusers_kwargs(config: dict) -> dict:
    """A config.json dict minus the bookkeeping keys that are not constructor arguments."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def save_weights(state: dict[str, torch.Tensor], folder: Path, stem: str, fp16: bool) -> list[Path]:
    """Write STEM.safetensors (float32) and, if asked, STEM.fp16.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"{stem}.safetensors"]
    save_file({k: v.detach().contiguous() for k, v in state.items()}, files[0], metadata={"format": "pt"})
    if fp16:
        files.append(folder / f"{stem}.fp16.safetensors")
        save_file({k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}, files[1],
                  metadata={"format": "pt"})
    for f in files:
        os.chmod(f, 0o644)  # safetensors writes 0600; other users of the machine read these
    return files


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def report(name: str, module: torch.nn.Module, files: list[Path], seconds: float) -> dict:
    params = count_params(module)
    sizes = {f.name: f.stat().st_size for f in files}
    size_text = ", ".join(f"{n} {s / 1e9:.3f} GB" for n, s in sizes.items())
    print(f"  {name:13s} {params:>13,d} params ({params / 1e6:.1f} M)  {size_text}  [{seconds:.0f} s]", flush=True)
    return {"params": params, "files": {str(f): sizes[f.name] for f in files}}


# --------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------


def make_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)
    return UNet2DConditionModel(**diffusers_kwargs(SD_TURBO_UNET)).eval()


def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(**{k: v for k, v in SD_TURBO_TEXT_ENCODER.items()
                               if k not in ("architectures", "model_type", "torch_dtype", "transformers_version")})
    return CLIPTextModel(config).eval()


def make_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    vae = AutoencoderKL(**diffusers_kwargs(SD_TURBO_VAE)).eval()
    scale_vae_mean(vae)  # posterior mean std ~5, i.e. ~1 after x0.18215 (see make_fixtures.py)
    return vae


def make_controlnet():
    from diffusers import ControlNetModel

    torch.manual_seed(4)
    controlnet = ControlNetModel(**diffusers_kwargs(SD21_CONTROLNET)).eval()
    # Trained ControlNets' "zero" convs are not zero; small random weights keep the residuals real.
    generator = torch.Generator().manual_seed(4)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                  controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.01)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.01)
    return controlnet


def make_sdxl(sdxl_out: Path, taesdxl_out: Path) -> None:
    """sdxl-turbo-shaped random weights (float16 on disk) and TAESDXL (float32, as taesdxl's)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    print(f"writing {sdxl_out} and {taesdxl_out}")
    tiny = FIXTURES / "tiny-sdxl"
    write_json(sdxl_out / "model_index.json", SDXL_TURBO_MODEL_INDEX)
    for name in ["scheduler", "tokenizer", "tokenizer_2"]:
        if (sdxl_out / name).exists():
            shutil.rmtree(sdxl_out / name)
        shutil.copytree(tiny / name, sdxl_out / name)

    def text_config(config: dict) -> CLIPTextConfig:
        return CLIPTextConfig(**{k: v for k, v in config.items()
                                 if k not in ("architectures", "model_type", "torch_dtype")})

    def unet():
        torch.manual_seed(5)
        return UNet2DConditionModel(**diffusers_kwargs(SDXL_TURBO_UNET)).eval()

    def text_encoder():
        torch.manual_seed(6)
        return CLIPTextModel(text_config(SDXL_TURBO_TEXT_ENCODER)).eval()

    def text_encoder_2():
        torch.manual_seed(7)
        return CLIPTextModelWithProjection(text_config(SDXL_TURBO_TEXT_ENCODER_2)).eval()

    for name, build, stem, config in [
        ("text_encoder", text_encoder, "model", SDXL_TURBO_TEXT_ENCODER),
        ("text_encoder_2", text_encoder_2, "model", SDXL_TURBO_TEXT_ENCODER_2),
        ("unet", unet, "diffusion_pytorch_model", SDXL_TURBO_UNET),
    ]:
        start = time.perf_counter()
        folder = sdxl_out / name
        module = build().to(torch.float16)
        state = module.state_dict()
        if name.startswith("text_encoder"):
            # transformers 4's key names, as the published files (see the SD branch below).
            state = {k if k.startswith(("text_model.", "text_projection."))
                     else f"text_model.{k}": v for k, v in state.items()}
        write_json(folder / "config.json", config)
        files = save_weights(state, folder, stem, fp16=False)
        report(name, module, files, time.perf_counter() - start)
        del module, state
    start = time.perf_counter()
    taesdxl = make_taesd(seed=8)
    write_json(taesdxl_out / "config.json", TAESDXL)
    files = save_weights(taesdxl.state_dict(), taesdxl_out, "diffusion_pytorch_model", fp16=False)
    report("taesdxl", taesdxl, files, time.perf_counter() - start)


def make_taesd(seed: int = 3):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    taesd = AutoencoderTiny(**diffusers_kwargs(TAESD)).eval()
    # The default init makes TAESD's outputs nearly input-independent (see make_fixtures.py).
    tune_taesd(taesd, seed)
    return taesd


# --------------------------------------------------------------------------------------
# Sanity: one pass through every network in float32, from the files as written
# --------------------------------------------------------------------------------------


def describe(name: str, t: torch.Tensor) -> None:
    finite = bool(torch.isfinite(t).all())
    tiny = float((t.abs() < 1e-30).float().mean() - (t == 0).float().mean())
    print(f"    {name:16s} shape={list(t.shape)} mean={t.mean():+.4f} std={t.std():.4f} "
          f"min={t.min():+.4f} max={t.max():+.4f} finite={finite} denormal-ish={tiny:.1e}", flush=True)
    if not finite:
        raise SystemExit(f"{name}: NaN or inf in the output of the random network")


def check(sd_dir: Path, taesd_dir: Path, image_size: int) -> None:
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    latent_size = image_size // 8
    print(f"  sanity pass, float32 (UNet at {latent_size}x{latent_size} latents, VAEs at {image_size}^2):")
    with torch.no_grad():
        tokenizer = CLIPTokenizer.from_pretrained(sd_dir / "tokenizer")
        ids = tokenizer(["a photo of a cat"], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        text_encoder = CLIPTextModel.from_pretrained(sd_dir / "text_encoder", torch_dtype=torch.float32).eval()
        embeds = text_encoder(ids)[0]
        describe("text_encoder", embeds)
        del text_encoder

        generator = torch.Generator().manual_seed(0)
        latent = torch.randn(1, 4, latent_size, latent_size, generator=generator)
        unet = UNet2DConditionModel.from_pretrained(sd_dir / "unet", torch_dtype=torch.float32).eval()
        for t in (999, 359, 99):
            describe(f"unet t={t}", unet(latent, t, encoder_hidden_states=embeds).sample)
        del unet

        y = torch.linspace(-1, 1, image_size)
        image = torch.stack([y[:, None].expand(image_size, image_size), y[None, :].expand(image_size, image_size),
                             (y[:, None] * y[None, :])])[None]
        vae = AutoencoderKL.from_pretrained(sd_dir / "vae", torch_dtype=torch.float32).eval()
        describe("vae.encode mean", vae.encode(image).latent_dist.mean * vae.config.scaling_factor)
        describe("vae.decode", vae.decode(latent / vae.config.scaling_factor).sample)
        del vae

        taesd = AutoencoderTiny.from_pretrained(taesd_dir, torch_dtype=torch.float32).eval()
        describe("taesd.encode", taesd.encode(image).latents)
        describe("taesd.decode", taesd.decode(latent).sample)


# --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd-out", type=Path, default=env_path(BENCH_MODEL_VAR),
                        help=f"sd-turbo-shaped folder to write (default: ${BENCH_MODEL_VAR})")
    parser.add_argument("--taesd-out", type=Path, default=env_path(BENCH_TAESD_VAR),
                        help=f"TAESD folder to write (default: ${BENCH_TAESD_VAR})")
    parser.add_argument("--controlnet-out", type=Path, default=None,
                        help="also (or, with --controlnet-only, only) write a full-size SD 2.1 ControlNet here")
    parser.add_argument("--controlnet-only", action="store_true")
    parser.add_argument("--controlnet-as-published", action="store_true",
                        help="write the ControlNet as thibaud/controlnet-sd21-*-diffusers publish it: a lone "
                             "fp16 diffusion_pytorch_model.bin (torch.save) beside its config")
    parser.add_argument("--no-fp16", action="store_true", help="do not write the *.fp16.safetensors variants")
    parser.add_argument("--check-only", action="store_true", help="only run the sanity pass on existing folders")
    parser.add_argument("--check-size", type=int, default=256, help="image size of the sanity pass (UNet at /8)")
    parser.add_argument("--sdxl-out", type=Path, default=None,
                        help="write only an sdxl-turbo-shaped folder here (with --taesdxl-out)")
    parser.add_argument("--taesdxl-out", type=Path, default=None, help="TAESDXL folder (with --sdxl-out)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.sdxl_out is not None or args.taesdxl_out is not None:
        if args.sdxl_out is None or args.taesdxl_out is None:
            sys.exit("--sdxl-out and --taesdxl-out go together")
        outs = (args.sdxl_out.resolve(), args.taesdxl_out.resolve())
        if any(REPO in out.parents for out in outs):
            sys.exit(f"refusing to write weights inside the repository ({REPO}); choose a folder outside it")
        make_sdxl(*outs)
        print("done")
        return
    fp16 = not args.no_fp16
    controlnet_out = args.controlnet_out.resolve() if args.controlnet_out else None
    if args.controlnet_only:
        sd_out = taesd_out = None
    else:
        sd_out = required_path(args.sd_out, "--sd-out", BENCH_MODEL_VAR, "output folder for the model").resolve()
        taesd_out = required_path(args.taesd_out, "--taesd-out", BENCH_TAESD_VAR, "output folder for TAESD").resolve()
    if any(REPO in out.parents for out in (sd_out, taesd_out, controlnet_out) if out is not None):
        sys.exit(f"refusing to write weights inside the repository ({REPO}); choose a folder outside it")
    if controlnet_out is not None:
        start = time.perf_counter()
        controlnet = make_controlnet()
        write_json(controlnet_out / "config.json", SD21_CONTROLNET)
        if args.controlnet_as_published:
            controlnet_out.mkdir(parents=True, exist_ok=True)
            files = [controlnet_out / "diffusion_pytorch_model.bin"]
            torch.save({k: v.detach().to(torch.float16).contiguous() for k, v in controlnet.state_dict().items()},
                       files[0])
        else:
            files = save_weights(controlnet.state_dict(), controlnet_out, "diffusion_pytorch_model", fp16)
        report("controlnet", controlnet, files, time.perf_counter() - start)
        del controlnet
    if args.controlnet_only:
        print("done")
        return

    if not args.check_only:
        print(f"writing {sd_out} and {taesd_out} (float32{' + fp16 variants' if fp16 else ''})")
        summary = {}
        write_json(sd_out / "model_index.json", SD_TURBO_MODEL_INDEX)
        write_json(sd_out / "scheduler" / "scheduler_config.json", SD_TURBO_SCHEDULER)
        if (sd_out / "tokenizer").exists():
            shutil.rmtree(sd_out / "tokenizer")
        shutil.copytree(TOKENIZER_SRC, sd_out / "tokenizer")

        for name, build, folder, stem, config_name, config in [
            ("unet", make_unet, sd_out / "unet", "diffusion_pytorch_model", "config.json", SD_TURBO_UNET),
            ("text_encoder", make_text_encoder, sd_out / "text_encoder", "model", "config.json",
             SD_TURBO_TEXT_ENCODER),
            ("vae", make_vae, sd_out / "vae", "diffusion_pytorch_model", "config.json", SD_TURBO_VAE),
            ("taesd", make_taesd, taesd_out, "diffusion_pytorch_model", "config.json", TAESD),
        ]:
            start = time.perf_counter()
            module = build()
            state = module.state_dict()
            if name == "text_encoder" and not all(k.startswith("text_model.") for k in state):
                # sd-turbo's file (transformers 4) prefixes every key with "text_model."; transformers 5
                # has no such submodule but still loads the prefixed names.
                state = {f"text_model.{k}": v for k, v in state.items()}
            write_json(folder / config_name, config)
            files = save_weights(state, folder, stem, fp16)
            summary[name] = report(name, module, files, time.perf_counter() - start)
            del module, state
        total = sum(v["params"] for k, v in summary.items() if k != "taesd")
        print(f"  sd-turbo total {total:,d} params ({total / 1e6:.1f} M)")
        write_json(sd_out / "random_weights_summary.json", summary)

    check(sd_out, taesd_out, args.check_size)
    print("done")


if __name__ == "__main__":
    main()
