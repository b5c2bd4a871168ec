#!/usr/bin/env python3
"""Tiny IP-Adapter Plus checkpoints (h94/IP-Adapter's layout: a Resampler image projection) and
goldens from diffusers' IP-Adapter Plus path. Run after make_ip_adapter_fixtures.py, whose image
encoders and style picture it reuses.

Writes, under tests/fixtures/model-root/h94/IP-Adapter/:
  models/ip-adapter-plus_sd15.bin              torch.save({"image_proj": …, "ip_adapter": …}) as
                                               h94 ships it; image_proj in h94's Resampler names
                                               (latents, proj_in, layers.<i>.0.{norm1, norm2,
                                               to_q, to_kv, to_out}, layers.<i>.1.{0, 1, 3},
                                               proj_out, norm_out): width 32, 2 heads of 64, depth
                                               4 (diffusers builds 4), 16 tokens, reading the models/image_encoder's
                                               hidden states
  sdxl_models/ip-adapter-plus_sdxl_vit-h.bin   the same for tiny-sdxl's UNet, reading the ViT-H
                                               folder's encoder (models/image_encoder), as h94's
                                               `_vit-h` SDXL checkpoints do

and tests/fixtures/golden/ip_adapter_plus_<family>.safetensors with
  hidden, negative_hidden  [1, 50, E]  the encoder's hidden_states[-2] for the processed style
                                       picture (clip_input of ip_adapter_<family>) and for zeros
  tokens, negative_tokens  [1, 16, D]  diffusers' IPAdapterPlusImageProjection of those
  out_scale_1.0            the UNet (inputs of ip_adapter_<family>) with the adapter loaded by
                           diffusers (`_load_ip_adapter_weights`) at scale 1; row 0 the negative
                           tokens, row 1 the positive ones

Needs torch, transformers, diffusers, safetensors.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

import _common
from make_ip_adapter_fixtures import ROOT, cross_attention_layers, set_scales

TOKENS, WIDTH, INNER, DEPTH = 16, 32, 128, 4

FAMILIES = {
    # family: (UNet fixture, checkpoint path under ROOT)
    "sd15": ("tiny-sd15", "models/ip-adapter-plus_sd15.bin"),
    "sdxl": ("tiny-sdxl", "sdxl_models/ip-adapter-plus_sdxl_vit-h.bin"),
}


def adapter_state(unet, embed: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    d = unet.config.cross_attention_dim

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).contiguous()

    def norm(prefix, n):
        return {f"{prefix}.weight": 1.0 + rnd(n, scale=0.2), f"{prefix}.bias": rnd(n, scale=0.2)}

    proj = {"latents": rnd(1, TOKENS, WIDTH, scale=WIDTH ** -0.5),
            "proj_in.weight": rnd(WIDTH, embed, scale=0.3), "proj_in.bias": rnd(WIDTH, scale=0.1),
            "proj_out.weight": rnd(d, WIDTH, scale=0.2), "proj_out.bias": rnd(d, scale=0.1)}
    proj.update(norm("norm_out", d))
    for i in range(DEPTH):
        a, f = f"layers.{i}.0", f"layers.{i}.1"
        proj.update(norm(f"{a}.norm1", WIDTH))
        proj.update(norm(f"{a}.norm2", WIDTH))
        proj[f"{a}.to_q.weight"] = rnd(INNER, WIDTH, scale=0.2)
        proj[f"{a}.to_kv.weight"] = rnd(2 * INNER, WIDTH, scale=0.2)
        proj[f"{a}.to_out.weight"] = rnd(WIDTH, INNER, scale=0.1)
        proj.update(norm(f"{f}.0", WIDTH))
        proj[f"{f}.1.weight"] = rnd(4 * WIDTH, WIDTH, scale=0.15)
        proj[f"{f}.3.weight"] = rnd(WIDTH, 4 * WIDTH, scale=0.08)
    ip_adapter = {}
    for i, (_, hidden) in enumerate(cross_attention_layers(unet)):
        ip_adapter[f"{2 * i + 1}.to_k_ip.weight"] = rnd(hidden, d, scale=0.5)
        ip_adapter[f"{2 * i + 1}.to_v_ip.weight"] = rnd(hidden, d, scale=0.5)
    return {"image_proj": proj, "ip_adapter": ip_adapter}


def main() -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection.from_pretrained(ROOT / "models" / "image_encoder").eval()
    embed = encoder.config.hidden_size
    for seed, (family, (fixture, checkpoint)) in enumerate(FAMILIES.items()):
        inputs = load_file(str(_common.GOLDEN_DIR / f"ip_adapter_{family}.safetensors"))
        unet = UNet2DConditionModel.from_pretrained(_common.FIXTURES / fixture / "unet").eval()
        state = adapter_state(unet, embed, 400 + seed)
        torch.save(state, ROOT / checkpoint)
        clip_input = inputs["clip_input"]
        tensors = {}
        with torch.no_grad():
            hidden = encoder(clip_input, output_hidden_states=True).hidden_states[-2]
            negative = encoder(torch.zeros_like(clip_input), output_hidden_states=True).hidden_states[-2]
            unet._load_ip_adapter_weights([state])
            projection = unet.encoder_hid_proj.image_projection_layers[0]
            assert type(projection).__name__ == "IPAdapterPlusImageProjection", type(projection)
            tensors["hidden"], tensors["negative_hidden"] = hidden, negative
            tensors["tokens"], tensors["negative_tokens"] = projection(hidden), projection(negative)
            embeds = torch.cat([negative, hidden])[:, None]
            kwargs = {"image_embeds": [embeds]}
            if family == "sdxl":
                kwargs.update(text_embeds=inputs["text_embeds"], time_ids=inputs["time_ids"])
            set_scales(unet, [1.0] * len(cross_attention_layers(unet)))
            out = unet(inputs["sample"], inputs["timesteps"], encoder_hidden_states=inputs["text"],
                       added_cond_kwargs=kwargs).sample
            tensors["out_scale_1.0"] = out
            print(f"{family}: max |plus - plain| = {(out - inputs['plain']).abs().max().item():.4f}")
        path = _common.GOLDEN_DIR / f"ip_adapter_plus_{family}.safetensors"
        save_file({k: v.contiguous().float() for k, v in tensors.items()}, str(path))
        print("wrote", path)


if __name__ == "__main__":
    main()
