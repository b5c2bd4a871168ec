#!/usr/bin/env python3
"""Tiny IP-Adapter checkpoints (h94/IP-Adapter's layout) and goldens from diffusers' IP-Adapter
path, for SD 1.5 (tiny-sd15's UNet) and SDXL (tiny-sdxl's UNet).

Writes, under tests/fixtures/model-root/h94/IP-Adapter/ (found like the hub id `h94/IP-Adapter`):
  models/image_encoder/{config.json, model.safetensors}      CLIPVisionModelWithProjection
  models/ip-adapter_sd15.bin                                 torch.save({"image_proj": …,
                                                             "ip_adapter": …}) as h94 ships it
  sdxl_models/image_encoder/…, sdxl_models/ip-adapter_sdxl.bin

and tests/fixtures/golden/ip_adapter_<family>.safetensors with
  clip_input      [1, 3, 224, 224]  transformers' CLIP image processor (PIL backend) with
                                    Lanczos resampling, as Daydream's IPAdapter builds it, of
                                    tests/fixtures/golden/ip_adapter_style.png
  image_embeds    [1, P]            CLIPVisionModelWithProjection(...).image_embeds
  tokens          [1, 4, D]         the image projection (diffusers' ImageProjection)
  negative_tokens [1, 4, D]         the projection of zero embeddings (the unconditional rows)
  sample [2, 4, 8, 8], timesteps [2], text [2, 77, D] (+ text_embeds, time_ids for SDXL)
  plain           the UNet without IP-Adapter
  out_scale_<s>   the UNet with the adapter loaded by diffusers (`_load_ip_adapter_weights`,
                  what `load_ip_adapter` calls) at scale s in (1.0, 0.5, 0.0); row 0 carries
                  the negative tokens, row 1 the positive ones
  out_layers      every IP layer at its own scale: `layer_scales` below (Daydream's
                  "ease in" weights at scale 0.8)

Needs torch, transformers (>= 5, for CLIPImageProcessorPil), diffusers, pillow, safetensors.
"""

from __future__ import annotations

import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import _common

ROOT = _common.FIXTURES / "model-root" / "h94" / "IP-Adapter"
STYLE = _common.GOLDEN_DIR / "ip_adapter_style.png"
TOKENS = 4

FAMILIES = {
    # family: (UNet fixture, IP-Adapter folder, weights file, projection_dim)
    "sd15": ("tiny-sd15", "models", "ip-adapter_sd15.bin", 16),
    "sdxl": ("tiny-sdxl", "sdxl_models", "ip-adapter_sdxl.bin", 24),
}


def style_image() -> Image.Image:
    """A 96×64 picture with structure in every channel (not square: the processor crops)."""
    y, x = np.mgrid[0:64, 0:96].astype(np.float32)
    rgb = np.stack(
        [
            127 + 120 * np.sin(x / 7.0),
            127 + 120 * np.cos(y / 5.0 + x / 11.0),
            (x * 2 + y * 3) % 256,
        ],
        axis=-1,
    )
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


def image_encoder(projection_dim: int, seed: int):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,
        patch_size=32,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )
    return CLIPVisionModelWithProjection(config).eval()


def cross_attention_layers(unet) -> list[tuple[str, int]]:
    """(processor name, hidden size) of every attn2, in `attn_processors` order (h94 numbers
    them 1, 3, 5, …: the attn1 between them hold no weights)."""
    out = []
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            module = unet.get_submodule(name[: -len(".processor")])
            out.append((name, module.to_q.out_features))
    return out


def adapter_state(unet, projection_dim: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    d = unet.config.cross_attention_dim

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).contiguous()

    image_proj = {
        "proj.weight": rnd(TOKENS * d, projection_dim, scale=0.3),
        "proj.bias": rnd(TOKENS * d, scale=0.3),
        "norm.weight": 1.0 + rnd(d, scale=0.2),
        "norm.bias": rnd(d, scale=0.2),
    }
    ip_adapter = {}
    for i, (_, hidden) in enumerate(cross_attention_layers(unet)):
        ip_adapter[f"{2 * i + 1}.to_k_ip.weight"] = rnd(hidden, d, scale=0.5)
        ip_adapter[f"{2 * i + 1}.to_v_ip.weight"] = rnd(hidden, d, scale=0.5)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def layer_scales(n: int, scale: float) -> list[float]:
    """Daydream's "ease in" (diffusers_ipadapter's build_layer_weights): layer i of n at
    scale · (0.05 + 0.95 · (1 − i / max(1, n)))."""
    return [scale * (0.05 + 0.95 * (1.0 - i / max(1, n))) for i in range(n)]


def set_scales(unet, scales: list[float]) -> None:
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    procs = [p for p in unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]
    assert len(procs) == len(scales), (len(procs), len(scales))
    for proc, s in zip(procs, scales):
        proc.scale = [s]


def main() -> None:
    from diffusers import UNet2DConditionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    STYLE.parent.mkdir(parents=True, exist_ok=True)
    style_image().save(STYLE)
    processor = CLIPImageProcessorPil(resample=Image.Resampling.LANCZOS)
    clip_input = processor(images=Image.open(STYLE).convert("RGB"), return_tensors="pt").pixel_values

    for seed, (family, (fixture, folder, weights_name, projection_dim)) in enumerate(FAMILIES.items()):
        out_dir = ROOT / folder
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        encoder = image_encoder(projection_dim, 100 + seed)
        encoder.save_pretrained(out_dir / "image_encoder", safe_serialization=True)

        unet = UNet2DConditionModel.from_pretrained(_common.FIXTURES / fixture / "unet").eval()
        state = adapter_state(unet, projection_dim, 200 + seed)
        torch.save(state, out_dir / weights_name)

        g = torch.Generator().manual_seed(300 + seed)
        d = unet.config.cross_attention_dim
        sample = torch.randn(2, 4, 8, 8, generator=g)
        timesteps = torch.tensor([999.0, 499.0])
        text = torch.randn(2, 77, d, generator=g)
        tensors = {"clip_input": clip_input, "sample": sample, "timesteps": timesteps, "text": text}
        added = None
        if family == "sdxl":
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            text_embeds = torch.randn(2, pooled, generator=g)
            time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
            tensors["text_embeds"], tensors["time_ids"] = text_embeds, time_ids
            added = {"text_embeds": text_embeds, "time_ids": time_ids}

        with torch.no_grad():
            image_embeds = encoder(clip_input).image_embeds
            tensors["image_embeds"] = image_embeds
            tensors["plain"] = unet(sample, timesteps, encoder_hidden_states=text,
                                    added_cond_kwargs=added).sample

            unet._load_ip_adapter_weights([state])
            projection = unet.encoder_hid_proj.image_projection_layers[0]
            tensors["tokens"] = projection(image_embeds)
            tensors["negative_tokens"] = projection(torch.zeros_like(image_embeds))
            # Row 0 unconditional (zero embeddings), row 1 the style image: [B, 1 image, P].
            embeds = torch.cat([torch.zeros_like(image_embeds), image_embeds])[:, None]
            kwargs = dict(added or {})
            kwargs["image_embeds"] = [embeds]
            n = len(cross_attention_layers(unet))
            for s in (1.0, 0.5, 0.0):
                set_scales(unet, [s] * n)
                out = unet(sample, timesteps, encoder_hidden_states=text, added_cond_kwargs=kwargs).sample
                tensors[f"out_scale_{s}"] = out
                moved = (out - tensors["plain"]).abs().max().item()
                print(f"{family} scale {s}: max |ip - plain| = {moved:.4f}")
            scales = layer_scales(n, 0.8)
            set_scales(unet, scales)
            tensors["out_layers"] = unet(sample, timesteps, encoder_hidden_states=text,
                                         added_cond_kwargs=kwargs).sample
            tensors["layer_scales"] = torch.tensor(scales)
        path = _common.GOLDEN_DIR / f"ip_adapter_{family}.safetensors"
        save_file({k: v.contiguous().float() for k, v in tensors.items()}, str(path))
        print("wrote", path, f"({n} IP layers)")


if __name__ == "__main__":
    main()
