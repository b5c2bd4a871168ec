"""Single-file Stable Diffusion checkpoints in the original CompVis / Stability layout (the
"LDM" files model sites distribute: v1-5-pruned-emaonly.safetensors, v2-1_768-ema-pruned.ckpt,
sd_xl_base_1.0.safetensors), made from the tiny diffusers fixtures, and the proof that diffusers'
own `from_single_file` reads each back into exactly the tiny fixture's weights.

Writes under tests/fixtures/single-file/:

  sd15.safetensors   SD 1.x layout (float32, as v1-5-pruned-emaonly): tiny-sd15's UNet and CLIP
                     text encoder, tiny-sd-turbo's VAE (tiny-sd15 has none), under
                       model.diffusion_model.                     the UNet, LDM names
                       first_stage_model.                         the VAE, LDM names (attention
                                                                  q/k/v/proj_out as 1x1 convs)
                       cond_stage_model.transformer.text_model.   HF CLIPTextModel names, with
                                                                  embeddings.position_ids (int64)
                     and the DDPM schedule buffers LatentDiffusion registers (betas,
                     alphas_cumprod, ..., posterior_mean_coef2: float32 [1000], scaled-linear
                     0.00085..0.012, computed as ldm's register_schedule does).
  sd21.ckpt          SD 2.x layout as a torch zip checkpoint {"state_dict": ..., "global_step":
                     110000} (torch.save into a buffer, as PyTorch Lightning saves, so the
                     archive's folder is `archive/`): tiny-sd-turbo's UNet (linear
                     proj_in/proj_out), VAE and text encoder, the latter in OpenCLIP names under
                     cond_stage_model.model. (token_embedding, positional_embedding,
                     transformer.resblocks.I.{ln_1, attn.in_proj_*, attn.out_proj, ln_2,
                     mlp.c_fc, mlp.c_proj}, ln_final, text_projection [D, P], logit_scale) with
                     one resblock more than the diffusers encoder has (SD 2.x files hold 24, the
                     encoder uses 23) and a random text_projection (SD 2 does not use it); the
                     same schedule buffers.
  sdxl.safetensors   SDXL (SGM) layout: tiny-sdxl's UNet (label_emb.0.0 / label_emb.0.2 for
                     add_embedding), VAE, CLIP-L under conditioner.embedders.0.transformer.
                     text_model. (with position_ids) and the second encoder in OpenCLIP names under
                     conditioner.embedders.1.model. (all layers used, text_projection [D, P] =
                     text_encoder_2's text_projection.weight transposed, logit_scale). No schedule
                     buffers (SGM's DiffusionEngine registers none). float32 (the published file is
                     float16; the stand-in keeps the tiny fixture's float32 so that the proof can
                     ask for equality).
  model-root/        config-only copies of the repositories diffusers (and sdstream) read a single
                     file's configs and tokenizers from, under their canonical ids:
                     stable-diffusion-v1-5/stable-diffusion-v1-5 (tiny-sd15's folders and
                     tiny-sd-turbo's vae/config.json), stabilityai/stable-diffusion-2-1
                     (tiny-sd-turbo), stabilityai/stable-diffusion-xl-base-1.0 (tiny-sdxl); no
                     weight files, no safety_checker / feature_extractor (diffusers' from_single_file
                     does not need them), no `_name_or_path` naming a local path.
  manifest.json      per file: family, config repo id, pipeline class, source folders, format,
                     dtypes, tensor counts per component (`tensors`: the diffusers component's
                     state dict; `file_tensors`: the file's keys under its prefix), the file's
                     tensors no component reads (`unread`), the marker keys of diffusers'
                     CHECKPOINT_KEY_NAMES it holds, and what diffusers' infer_diffusers_model_type
                     makes of it (always "v1": the tiny shapes miss its shape tests).

And a single-file ControlNet in the original ControlNet ("cldm") layout, standing in for
CiaraRowles/TemporalNet2 (whose repository holds only temporalnetversion2.ckpt, a ControlLDM
training checkpoint of a ControlNet with a 6-channel hint: the current frame and a flow image):

  tests/fixtures/tiny-controlnet-sd21-6ch/   the diffusers folder (config.json and
                     diffusion_pytorch_model.safetensors, float32): ControlNetModel.from_unet(
                     tiny-sd-turbo's UNet, conditioning_channels 6, conditioning_embedding_out_channels
                     [8, 8, 16, 16]), so the UNet's encoder exactly (block types, widths, heads,
                     linear projections), every tensor then redrawn from CONTROLNET_SEED (norm
                     weights 1 + 0.1 N, norm biases 0.1 N, the hint embedding's conv weights
                     He-normal N(0, 2 / fan_in), all else 0.02 N, zero convs included).
  tests/fixtures/published-root/CiaraRowles/TemporalNet2/temporalnetversion2.ckpt
                     a torch zip checkpoint {"state_dict", "global_step"} saved as Lightning does:
                     the frozen base (tiny-sd-turbo's UNet) under model.diffusion_model. (LDM names)
                     and the ControlNet under control_model. in cldm.ControlNet's names:
                       time_embedding.linear_{1,2}           time_embed.{0,2}
                       conv_in                               input_blocks.0.0
                       down_blocks.*                         input_blocks.* (as the UNet's)
                       mid_block.*                           middle_block.{0,1,2}
                       controlnet_down_blocks.I              zero_convs.I.0
                       controlnet_mid_block                  middle_block_out.0
                       controlnet_cond_embedding.conv_in     input_hint_block.0
                       controlnet_cond_embedding.blocks.K    input_hint_block.{2K + 2}
                       controlnet_cond_embedding.conv_out    input_hint_block.14
                     (input_hint_block is one Sequential with a SiLU after every conv but the
                     last: the convs at the even indices).
Its proof: ControlNetModel.from_single_file(ckpt, config=tiny-controlnet-sd21-6ch,
local_files_only=True, torch_dtype=torch.float32) equals the folder's ControlNetModel, and
UNet2DConditionModel.from_single_file(ckpt, config=tiny-sd-turbo/unet) equals tiny-sd-turbo's
UNet (torch.equal, same key sets); manifest.json's "controlnets" gives its counts.

The proof (always run, after writing): `StableDiffusionPipeline.from_single_file(file,
config=model-root/<repo id>, local_files_only=True, torch_dtype=torch.float32)`
(StableDiffusionXLPipeline for sdxl), then every tensor of unet, vae, text_encoder (and
text_encoder_2) must equal the source fixture's (`torch.equal`, same key sets).

Run from the repository root with the reference environment (tests/reference/README.md), after
make_fixtures.py, make_lora_fixtures.py and make_sdxl_fixtures.py (a few seconds):
    "$REFENV/bin/python" tests/reference/make_single_file.py            # write, then check
    "$REFENV/bin/python" tests/reference/make_single_file.py --check    # check what is there
Deterministic: the same bytes every run (sorted keys, fixed metadata, fixed seeds; torch.save's
zip records carry no time and its serialization id is a hash of the contents).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FIXTURES, write_json  # noqa: E402

OUT = FIXTURES / "single-file"
ROOT = OUT / "model-root"
SEED = 70  # the SD 2 stand-in's extra resblock and text_projection
CONTROLNET_SEED = 71  # the ControlNet's weights

SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD21_REPO = "stabilityai/stable-diffusion-2-1"
SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_CLIP = "cond_stage_model.transformer."
SD2_OPENCLIP = "cond_stage_model.model."
SDXL_CLIP = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP = "conditioner.embedders.1.model."
CONTROL = "control_model."  # ControlLDM's ControlNet (cldm.cldm.ControlNet)

# The TemporalNet2 stand-in: a 6-channel-hint ControlNet for SD 2.1 (tiny-sd-turbo), as a diffusers
# folder and as the cldm training checkpoint CiaraRowles/TemporalNet2 publishes.
CONTROLNET = "tiny-controlnet-sd21-6ch"
CONTROLNET_BASE = "tiny-sd-turbo"
CONTROLNET_REPO = "CiaraRowles/TemporalNet2"
CONTROLNET_FILE = "published-root/CiaraRowles/TemporalNet2/temporalnetversion2.ckpt"
HINT_CHANNELS = 6  # the current frame and its optical-flow image, RGB each
# Four widths as in every published ControlNet (16, 32, 96, 256), only narrower: diffusers'
# converter knows conv_out only as input_hint_block.14, which four widths give.
HINT_WIDTHS = [8, 8, 16, 16]

# safetensors files written by torch's converters carry this and nothing else.
METADATA = {"format": "pt"}
GLOBAL_STEP = 110000
# OpenCLIP stores the log of the logit scale; trained models sit at the clamp, ln 100.
LOGIT_SCALE = float(np.log(100.0))
WEIGHT_FILES = (".safetensors", ".bin")

# --------------------------------------------------------------------------------------
# diffusers -> LDM names
# --------------------------------------------------------------------------------------

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
              "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def rename(state: dict, prefixes: dict, inner: dict) -> dict:
    """Renames every key of `state` by its longest prefix in `prefixes`; `inner[prefix]`, when
    given, renames the module just after that prefix too. Every key must be renamed, once."""
    out = {}
    ordered = sorted(prefixes, key=len, reverse=True)
    for key, value in state.items():
        prefix = next((p for p in ordered if key.startswith(p + ".")), None)
        assert prefix is not None, f"no LDM name for {key}"
        rest = key[len(prefix) + 1:]
        table = inner.get(prefix)
        if table:
            module = next(m for m in sorted(table, key=len, reverse=True) if rest.startswith(m + "."))
            rest = table[module] + rest[len(module):]
        new = f"{prefixes[prefix]}.{rest}"
        assert new not in out, new
        out[new] = value
    return out


def ldm_encoder(config: dict) -> tuple[dict, list]:
    """The LDM names of the half a UNet and its ControlNet share (time embedding, conv_in, input
    blocks, middle block): diffusers prefix -> LDM prefix, and the prefixes that are resnets."""
    n = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    p = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
         "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
         "conv_in": "input_blocks.0.0",
         "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
         "mid_block.resnets.1": "middle_block.2"}
    resnets = ["mid_block.resnets.0", "mid_block.resnets.1"]
    for i in range(levels):
        for j in range(n):
            k = 1 + i * (n + 1) + j
            p[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{k}.0"
            p[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
            resnets.append(f"down_blocks.{i}.resnets.{j}")
        if i < levels - 1:
            p[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{1 + i * (n + 1) + n}.0.op"
    return p, resnets


def ldm_unet(state: dict, config: dict) -> dict:
    """A diffusers UNet2DConditionModel's tensors under the LDM (openaimodel.UNetModel) names."""
    n = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    p, resnets = ldm_encoder(config)
    p.update({"conv_norm_out": "out.0", "conv_out": "out.2"})
    for i in range(levels):
        attention = config["up_block_types"][i].startswith("CrossAttn")
        for j in range(n + 1):
            k = i * (n + 1) + j
            p[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{k}.0"
            p[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
            resnets.append(f"up_blocks.{i}.resnets.{j}")
        if i < levels - 1:
            p[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (n + 1) + n}.{2 if attention else 1}.conv"
    return rename(state, p, {r: UNET_RESNET for r in resnets})


def cldm_controlnet(state: dict, config: dict) -> dict:
    """A diffusers ControlNetModel's tensors under the names of ControlNet's cldm.ControlNet (as
    ControlLDM holds it under control_model.): the UNet encoder's LDM names, then
      controlnet_down_blocks.I                -> zero_convs.I.0       (I = 0 .. 3 * levels - 1)
      controlnet_mid_block                    -> middle_block_out.0
      controlnet_cond_embedding.conv_in       -> input_hint_block.0
      controlnet_cond_embedding.blocks.K      -> input_hint_block.{2K + 2}
      controlnet_cond_embedding.conv_out      -> input_hint_block.{2 * len(blocks) + 2}
    (input_hint_block is one nn.Sequential of convs with a SiLU after each but the last, so the
    convs sit at the even indices; with four hint widths, as every published ControlNet has,
    conv_out is input_hint_block.14, the one index diffusers' converter knows)."""
    p, resnets = ldm_encoder(config)
    zero_convs = 1 + len(config["block_out_channels"]) * (config["layers_per_block"] + 1) - 1
    blocks = 2 * (len(config["conditioning_embedding_out_channels"]) - 1)
    for i in range(zero_convs):
        p[f"controlnet_down_blocks.{i}"] = f"zero_convs.{i}.0"
    p["controlnet_mid_block"] = "middle_block_out.0"
    p["controlnet_cond_embedding.conv_in"] = "input_hint_block.0"
    for k in range(blocks):
        p[f"controlnet_cond_embedding.blocks.{k}"] = f"input_hint_block.{2 * k + 2}"
    p["controlnet_cond_embedding.conv_out"] = f"input_hint_block.{2 * blocks + 2}"
    return rename(state, p, {r: UNET_RESNET for r in resnets})


def ldm_vae(state: dict, config: dict) -> dict:
    """A diffusers AutoencoderKL's tensors under the LDM (ldm.modules.diffusionmodules.model)
    names: decoder levels numbered from the bottom, attention projections as 1x1 convs."""
    n = config["layers_per_block"]
    levels = len(config["block_out_channels"])
    p = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    inner = {}
    for side in ("encoder", "decoder"):
        p.update({f"{side}.conv_in": f"{side}.conv_in", f"{side}.conv_out": f"{side}.conv_out",
                  f"{side}.conv_norm_out": f"{side}.norm_out",
                  f"{side}.mid_block.resnets.0": f"{side}.mid.block_1",
                  f"{side}.mid_block.resnets.1": f"{side}.mid.block_2",
                  f"{side}.mid_block.attentions.0": f"{side}.mid.attn_1"})
        inner[f"{side}.mid_block.resnets.0"] = inner[f"{side}.mid_block.resnets.1"] = VAE_RESNET
        inner[f"{side}.mid_block.attentions.0"] = VAE_ATTENTION
    for i in range(levels):
        for j in range(n):
            p[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
            inner[f"encoder.down_blocks.{i}.resnets.{j}"] = VAE_RESNET
        if i < levels - 1:
            p[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        for j in range(n + 1):
            p[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{levels - 1 - i}.block.{j}"
            inner[f"decoder.up_blocks.{i}.resnets.{j}"] = VAE_RESNET
        if i < levels - 1:
            p[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{levels - 1 - i}.upsample.conv"
    out = rename(state, p, inner)
    for key, value in out.items():
        if ".mid.attn_1." in key and key.split(".")[-2] in ("q", "k", "v", "proj_out") and key.endswith("weight"):
            assert value.ndim == 2, key
            out[key] = value[:, :, None, None].contiguous()
    return out


def ldm_clip(state: dict, prefix: str) -> dict:
    """transformers' CLIPTextModel tensors (text_model.*) under `prefix`, with the position_ids
    buffer the original files carry (int64 [1, 77], saved by the transformers of 2022)."""
    out = {prefix + k: v for k, v in state.items()}
    positions = state["text_model.embeddings.position_embedding.weight"].shape[0]
    out[prefix + "text_model.embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    return out


def open_clip(state: dict, prefix: str, layers: int, text_projection: torch.Tensor) -> dict:
    """transformers' CLIP text tensors under OpenCLIP's names (open_clip.CLIP minus its visual
    tower, as FrozenOpenCLIPEmbedder keeps it): q/k/v fused into attn.in_proj_*."""
    s = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {"token_embedding.weight": s.pop("embeddings.token_embedding.weight"),
           "positional_embedding": s.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": s.pop("final_layer_norm.weight"),
           "ln_final.bias": s.pop("final_layer_norm.bias"),
           "text_projection": text_projection,
           "logit_scale": torch.tensor(LOGIT_SCALE, dtype=torch.float32)}
    s.pop("text_projection.weight", None)
    for i in range(layers):
        h, r = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{r}attn.in_proj_{kind}"] = torch.cat(
                [s.pop(f"{h}self_attn.{q}_proj.{kind}") for q in ("q", "k", "v")])
            for src, dst in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{r}{dst}.{kind}"] = s.pop(f"{h}{src}.{kind}")
    assert not s, sorted(s)
    return {prefix + k: v for k, v in out.items()}


def random_resblock(prefix: str, index: int, width: int, generator: torch.Generator) -> dict:
    """One OpenCLIP resblock of random values (the SD 2 encoder's last block, which it skips)."""
    def randn(*shape, scale=0.02):
        return torch.randn(shape, generator=generator) * scale

    r = f"{prefix}transformer.resblocks.{index}."
    return {f"{r}ln_1.weight": 1.0 + randn(width, scale=0.1), f"{r}ln_1.bias": randn(width),
            f"{r}attn.in_proj_weight": randn(3 * width, width), f"{r}attn.in_proj_bias": randn(3 * width),
            f"{r}attn.out_proj.weight": randn(width, width), f"{r}attn.out_proj.bias": randn(width),
            f"{r}ln_2.weight": 1.0 + randn(width, scale=0.1), f"{r}ln_2.bias": randn(width),
            f"{r}mlp.c_fc.weight": randn(4 * width, width), f"{r}mlp.c_fc.bias": randn(4 * width),
            f"{r}mlp.c_proj.weight": randn(width, 4 * width), f"{r}mlp.c_proj.bias": randn(width)}


def schedule_buffers() -> dict:
    """The buffers ldm's DDPM.register_schedule stores (linear_start 0.00085, linear_end 0.012,
    1000 steps, "linear" = diffusers' scaled_linear; v_posterior 0), float64 math then float32."""
    betas = (torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2).numpy()
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    values = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in values.items()}


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


def weights(folder: Path) -> dict:
    """The folder's one weight file, float tensors as float32 (the fp16 text encoders upcast,
    exactly)."""
    files = [f for f in folder.iterdir() if f.name.endswith(".safetensors")]
    assert len(files) == 1, files
    state = load_file(str(files[0]))
    return {k: v.float().contiguous() if v.is_floating_point() else v for k, v in state.items()}


def config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def with_prefix(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


# --------------------------------------------------------------------------------------
# The files
# --------------------------------------------------------------------------------------

# name -> family, config repo, pipeline class, {component: source folder}, format
FILES = {
    "sd15.safetensors": ("sd1", SD15_REPO, "StableDiffusionPipeline",
                         {"unet": "tiny-sd15/unet", "vae": "tiny-sd-turbo/vae",
                          "text_encoder": "tiny-sd15/text_encoder"}),
    "sd21.ckpt": ("sd2", SD21_REPO, "StableDiffusionPipeline",
                  {"unet": "tiny-sd-turbo/unet", "vae": "tiny-sd-turbo/vae",
                   "text_encoder": "tiny-sd-turbo/text_encoder"}),
    "sdxl.safetensors": ("sdxl", SDXL_REPO, "StableDiffusionXLPipeline",
                         {"unet": "tiny-sdxl/unet", "vae": "tiny-sdxl/vae", "text_encoder": "tiny-sdxl/text_encoder",
                          "text_encoder_2": "tiny-sdxl/text_encoder_2"}),
}
PREFIXES = {
    "sd1": {"unet": UNET, "vae": VAE, "text_encoder": SD1_CLIP},
    "sd2": {"unet": UNET, "vae": VAE, "text_encoder": SD2_OPENCLIP},
    "sdxl": {"unet": UNET, "vae": VAE, "text_encoder": SDXL_CLIP, "text_encoder_2": SDXL_OPENCLIP},
}


def build(name: str) -> dict:
    family, _, _, sources = FILES[name]
    src = {c: FIXTURES / s for c, s in sources.items()}
    state = with_prefix(ldm_unet(weights(src["unet"]), config(src["unet"])), UNET)
    state.update(with_prefix(ldm_vae(weights(src["vae"]), config(src["vae"])), VAE))
    if family == "sd1":
        state.update(ldm_clip(weights(src["text_encoder"]), SD1_CLIP))
        state.update(schedule_buffers())
    elif family == "sd2":
        te = config(src["text_encoder"])
        width, layers = te["hidden_size"], te["num_hidden_layers"]
        g = torch.Generator().manual_seed(SEED)
        projection = torch.randn((width, te["projection_dim"]), generator=g) * width ** -0.5
        state.update(open_clip(weights(src["text_encoder"]), SD2_OPENCLIP, layers, projection))
        state.update(random_resblock(SD2_OPENCLIP, layers, width, g))
        state.update(schedule_buffers())
    else:
        state.update(ldm_clip(weights(src["text_encoder"]), SDXL_CLIP))
        te2 = weights(src["text_encoder_2"])
        layers = config(src["text_encoder_2"])["num_hidden_layers"]
        projection = te2["text_projection.weight"].t().contiguous()  # [D, P]: OpenCLIP's x @ W
        state.update(open_clip(te2, SDXL_OPENCLIP, layers, projection))
    return {k: state[k].contiguous().clone() for k in sorted(state)}


def write(name: str, state: dict, path: Path | None = None) -> None:
    path = path or OUT / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".safetensors"):
        save_file(state, str(path), metadata=METADATA)
        os.chmod(path, 0o644)  # safetensors writes 0600
    else:
        # Saved into a buffer, as PyTorch Lightning's atomic_save does: the zip's folder is
        # `archive/` whatever the file is called.
        buffer = io.BytesIO()
        torch.save({"state_dict": state, "global_step": GLOBAL_STEP}, buffer)
        path.write_bytes(buffer.getvalue())
    print("wrote", path.relative_to(FIXTURES.parent.parent), path.stat().st_size, "bytes,", len(state), "tensors")


def config_copy(src: Path, dst: Path, extra: dict[str, Path] | None = None) -> None:
    """`src` without its weight files (and without safety_checker / feature_extractor), JSON
    configs without a `_name_or_path`; `extra` adds folders (name -> source folder)."""
    if dst.exists():
        shutil.rmtree(dst)
    folders = {d.name: d for d in sorted(src.iterdir()) if d.is_dir()}
    for drop in ("safety_checker", "feature_extractor"):
        folders.pop(drop, None)
    folders.update(extra or {})
    files = [(src / "model_index.json", dst / "model_index.json")]
    for name, folder in folders.items():
        files += [(f, dst / name / f.name) for f in sorted(folder.iterdir())
                  if f.is_file() and not f.name.endswith(WEIGHT_FILES)]
    for f, target in files:
        target.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".json":
            data = json.loads(f.read_text())
            if isinstance(data, dict) and "_name_or_path" in data:
                data.pop("_name_or_path")
                write_json(target, data)
                continue
        shutil.copyfile(f, target)
    index = json.loads((dst / "model_index.json").read_text())
    for name in extra or {}:
        index[name] = ["diffusers", "AutoencoderKL"]
    for drop in ("safety_checker", "feature_extractor"):
        if drop in index:
            index[drop] = [None, None]
    (dst / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    print("wrote", dst.relative_to(FIXTURES.parent.parent), sorted(str(t.relative_to(dst)) for _, t in files))


def make_controlnet():
    """ControlNetModel.from_unet(tiny-sd-turbo's UNet, 6 hint channels, HINT_WIDTHS): the UNet's
    encoder exactly (block types, widths, heads, linear projections), then every tensor drawn
    afresh from CONTROLNET_SEED in sorted-name order (the zero convs too, so that each one
    matters): GroupNorm / LayerNorm weights 1 + 0.1 N(0, 1), their biases 0.1 N(0, 1), the hint
    embedding's conv weights N(0, 2 / fan_in), all else 0.02 N(0, 1)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(FIXTURES / CONTROLNET_BASE / "unet", local_files_only=True,
                                                torch_dtype=torch.float32)
    net = ControlNetModel.from_unet(unet, conditioning_channels=HINT_CHANNELS,
                                    conditioning_embedding_out_channels=tuple(HINT_WIDTHS))
    norms = {n for n, m in net.named_modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}
    g = torch.Generator().manual_seed(CONTROLNET_SEED)
    with torch.no_grad():
        for name, tensor in sorted(net.state_dict(keep_vars=True).items()):
            module, kind = name.rsplit(".", 1)
            noise = torch.randn(tensor.shape, generator=g)
            if module in norms:
                tensor.copy_((1.0 if kind == "weight" else 0.0) + 0.1 * noise)
            elif module.startswith("controlnet_cond_embedding.") and kind == "weight":
                # He-normal: eight convs of 0.02 would shrink the hint a millionfold.
                tensor.copy_(noise * (2.0 / tensor[0].numel()) ** 0.5)
            else:
                tensor.copy_(0.02 * noise)
    return net.eval()


def write_controlnet(net) -> None:
    folder = FIXTURES / CONTROLNET
    if folder.exists():
        shutil.rmtree(folder)
    net.save_pretrained(folder, safe_serialization=True)
    for f in folder.iterdir():
        os.chmod(f, 0o644)  # safetensors writes 0600
    cfg = config(folder)
    assert "_name_or_path" not in cfg, cfg
    print("wrote", folder.relative_to(FIXTURES.parent.parent), sorted(f.name for f in folder.iterdir()),
          (folder / "diffusion_pytorch_model.safetensors").stat().st_size, "bytes,", len(net.state_dict()), "tensors")


def build_controlnet() -> dict:
    """A cldm (ControlLDM) training checkpoint's state dict: the frozen base UNet under
    model.diffusion_model. (LDM names) and the trained ControlNet under control_model. (cldm
    names)."""
    base, folder = FIXTURES / CONTROLNET_BASE / "unet", FIXTURES / CONTROLNET
    state = with_prefix(ldm_unet(weights(base), config(base)), UNET)
    state.update(with_prefix(cldm_controlnet(weights(folder), config(folder)), CONTROL))
    return {k: state[k].contiguous().clone() for k in sorted(state)}


def model_root() -> None:
    config_copy(FIXTURES / "tiny-sd15", ROOT / SD15_REPO, {"vae": FIXTURES / "tiny-sd-turbo" / "vae"})
    config_copy(FIXTURES / "tiny-sd-turbo", ROOT / SD21_REPO)
    config_copy(FIXTURES / "tiny-sdxl", ROOT / SDXL_REPO)


# --------------------------------------------------------------------------------------
# The proof
# --------------------------------------------------------------------------------------


def file_keys(path: Path) -> dict:
    """name -> (dtype, shape) of every tensor in a single file."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            return {k: (str(f.get_slice(k).get_dtype()), list(f.get_slice(k).get_shape())) for k in f.keys()}
    state = torch.load(path, weights_only=True, map_location="cpu")["state_dict"]
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
    return {k: (names[v.dtype], list(v.shape)) for k, v in state.items()}


def source_model(component: str, folder: Path):
    import diffusers
    import transformers

    cls = {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL,
           "text_encoder": transformers.CLIPTextModel,
           "text_encoder_2": transformers.CLIPTextModelWithProjection}[component]
    return cls.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)


# diffusers' CHECKPOINT_KEY_NAMES entries that tell SD 1 / SD 2 / SDXL apart.
MARKERS = ("v1", "v2", "xl_base", "clip", "open_clip", "clip_sdxl", "open_clip_sdxl")


def check(name: str) -> dict:
    import diffusers
    from diffusers.loaders.single_file_utils import (CHECKPOINT_KEY_NAMES, infer_diffusers_model_type,
                                                     load_single_file_checkpoint)

    family, repo, pipeline, sources = FILES[name]
    path = OUT / name
    pipe = getattr(diffusers, pipeline).from_single_file(
        str(path), config=str(ROOT / repo), local_files_only=True, torch_dtype=torch.float32)
    counts, file_counts, worst = {}, {}, 0.0
    for component, source in sources.items():
        got = getattr(pipe, component).state_dict()
        want = source_model(component, FIXTURES / source).state_dict()
        assert got.keys() == want.keys(), f"{name} {component}: {sorted(got.keys() ^ want.keys())}"
        for key in want:
            assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, (name, component, key)
            assert torch.equal(got[key], want[key]), f"{name} {component}.{key} differs"
            if want[key].is_floating_point() and want[key].numel():
                worst = max(worst, (got[key] - want[key]).abs().max().item())
        counts[component] = len(want)
    keys = file_keys(path)
    for component, prefix in PREFIXES[family].items():
        file_counts[component] = sum(k.startswith(prefix) for k in keys)
    # What the file holds that no component reads (diffusers drops it without a word).
    unread = []
    if family == "sd1":
        unread += sorted(k for k in keys if "." not in k) + [SD1_CLIP + "text_model.embeddings.position_ids"]
    elif family == "sd2":
        layers = json.loads((ROOT / repo / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
        unread += sorted(k for k in keys if "." not in k)
        unread += sorted(k for k in keys if k.startswith(f"{SD2_OPENCLIP}transformer.resblocks.{layers}."))
        unread += [SD2_OPENCLIP + "text_projection", SD2_OPENCLIP + "logit_scale"]
    else:
        unread += [SDXL_CLIP + "text_model.embeddings.position_ids", SDXL_OPENCLIP + "logit_scale"]
    assert all(k in keys for k in unread), [k for k in unread if k not in keys]
    assert all(any(k.startswith(p) for p in PREFIXES[family].values()) or "." not in k for k in keys)
    # diffusers tells the families apart by marker keys and shapes only when no config= is given:
    # the tiny files hold the text encoders' markers, not the shape-based UNet ones (v2: attn2.to_k
    # 1024 wide; xl_base: a 10th resblock), so diffusers alone would take all three for v1.
    inferred = infer_diffusers_model_type(load_single_file_checkpoint(str(path), local_files_only=True))
    markers = {kind: CHECKPOINT_KEY_NAMES[kind] for kind in MARKERS if CHECKPOINT_KEY_NAMES[kind] in keys}
    print(f"{name}: {family} via {repo}: " + ", ".join(f"{c} {n} tensors ({file_counts[c]} in the file)"
                                                    for c, n in counts.items())
          + f"; {len(keys)} in the file, {len(unread)} unread; max abs diff {worst:g}"
          + f" (diffusers would infer '{inferred}' without config=)")
    assert worst == 0.0
    dtypes = sorted({d for d, _ in keys.values()})
    return {"family": family, "config": repo, "pipeline": pipeline, "format": path.suffix.lstrip("."),
            "sources": dict(sources), "tensors": len(keys), "dtypes": dtypes,
            "components": {c: {"prefix": PREFIXES[family][c], "tensors": counts[c], "file_tensors": file_counts[c]}
                           for c in sources},
            "unread": unread, "diffusers_markers": markers, "diffusers_infers_without_config": inferred}


def assert_same(label: str, got: dict, want: dict) -> None:
    assert got.keys() == want.keys(), f"{label}: {sorted(got.keys() ^ want.keys())}"
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, (label, key)
        assert torch.equal(got[key], want[key]), f"{label}.{key} differs"


def check_controlnet() -> dict:
    """ControlNetModel.from_single_file(the .ckpt, config=the diffusers folder) gives the folder's
    tensors exactly; UNet2DConditionModel.from_single_file(the .ckpt) gives the base UNet's."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint

    folder, base, path = FIXTURES / CONTROLNET, FIXTURES / CONTROLNET_BASE / "unet", FIXTURES / CONTROLNET_FILE
    cfg, base_cfg = config(folder), config(base)
    # The ControlNet mirrors its base's encoder, as real ControlNets do.
    for key in ("down_block_types", "block_out_channels", "layers_per_block", "attention_head_dim",
                "num_attention_heads", "cross_attention_dim", "use_linear_projection", "upcast_attention",
                "transformer_layers_per_block", "norm_num_groups", "mid_block_type", "in_channels"):
        assert cfg[key] == base_cfg[key], key
    assert cfg["conditioning_channels"] == HINT_CHANNELS and cfg["conditioning_embedding_out_channels"] == HINT_WIDTHS
    want = ControlNetModel.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32).state_dict()
    got = ControlNetModel.from_single_file(str(path), config=str(folder), local_files_only=True,
                                           torch_dtype=torch.float32).state_dict()
    assert_same(CONTROLNET_REPO, got, want)
    got = UNet2DConditionModel.from_single_file(str(path), config=str(base), local_files_only=True,
                                                torch_dtype=torch.float32).state_dict()
    assert_same(CONTROLNET_REPO + " base", got, source_model("unet", base).state_dict())
    keys = file_keys(path)
    control = sum(k.startswith(CONTROL) for k in keys)
    assert all(k.startswith((CONTROL, UNET)) for k in keys)
    assert control == len(want)  # one cldm tensor per diffusers tensor (time_proj holds none)
    assert {d for d, _ in keys.values()} == {"F32"}
    inferred = infer_diffusers_model_type(load_single_file_checkpoint(str(path), local_files_only=True))
    print(f"{CONTROLNET_FILE}: {len(want)} ControlNet tensors ({control} under {CONTROL}), "
          f"{len(keys) - control} base UNet tensors under {UNET}; from_single_file exact for both "
          f"(diffusers would infer '{inferred}' without config=)")
    return {"file": CONTROLNET_FILE, "source": CONTROLNET, "base": CONTROLNET_BASE, "tensors": len(want),
            "control_model_tensors": control, "conditioning_channels": cfg["conditioning_channels"],
            "conditioning_embedding_out_channels": cfg["conditioning_embedding_out_channels"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check the files already written")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not args.check:
        model_root()
        for name in FILES:
            state = build(name)
            # Built twice, the same tensors: nothing depends on state outside the seeds.
            again = build(name)
            assert again.keys() == state.keys() and all(torch.equal(again[k], v) for k, v in state.items())
            write(name, state)
        net = make_controlnet()
        again = make_controlnet().state_dict()
        assert all(torch.equal(again[k], v) for k, v in net.state_dict().items())
        write_controlnet(net)
        state = build_controlnet()
        again = build_controlnet()
        assert again.keys() == state.keys() and all(torch.equal(again[k], v) for k, v in state.items())
        write(CONTROLNET_FILE, state, FIXTURES / CONTROLNET_FILE)
    manifest = {"files": {name: check(name) for name in FILES},
                "controlnets": {CONTROLNET_REPO: check_controlnet()},
                "model_root": "model-root",
                "made_by": "tests/reference/make_single_file.py"}
    if not args.check:
        write_json(OUT / "manifest.json", manifest)
        print("wrote", (OUT / "manifest.json").relative_to(FIXTURES.parent.parent))
    else:
        written = json.loads((OUT / "manifest.json").read_text())
        assert written == json.loads(json.dumps(manifest)), "manifest.json is not what the files give"
        print("manifest.json agrees")


if __name__ == "__main__":
    main()
