"""Extra network fixtures for the `nets` tests, beyond what make_fixtures.py builds.

They cover configurations the tiny sd-turbo checkpoint does not:
  * nets-clip-quick-gelu/: CLIPTextModel with hidden_act "quick_gelu" (SD1.5's CLIP-L), 3 layers,
    saved by transformers 5 (keys without the `text_model.` prefix); golden last hidden state and
    penultimate hidden state (`hidden_states[-2]`, what SDXL uses).
  * nets-clip-projection/: CLIPTextModelWithProjection as SDXL's second text encoder
    (OpenCLIP bigG: gelu, `text_projection` without bias, eos_token_id 2 so the pooled token is
    the argmax of the ids, padding with id 0 after the end token); golden penultimate hidden
    state and the projected pooled output (`text_embeds`, SDXL's added conditioning).
  * nets-vae-odd/: AutoencoderKL with 3 levels, layers_per_block 2, norm_num_groups 2, non-trivial
    GroupNorm affine parameters and biases, weights stored only as `.fp16.safetensors`; golden on a
    batch of 2 non-square images whose latent size is odd (exercises the asymmetric padding).

Run: python tests/reference/make_nets_fixtures.py   (CPU, float32, deterministic)
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel
from diffusers import AutoencoderKL

ROOT = Path(__file__).resolve().parents[1] / "fixtures"
torch.set_num_threads(1)


def perturb(module, generator):
    """Random norm affines and biases, so that they matter in the comparison."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=generator))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def round_to_f16(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())


def make_clip():
    torch.manual_seed(11)
    g = torch.Generator().manual_seed(11)
    cfg = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                         projection_dim=16, bos_token_id=62, eos_token_id=63, pad_token_id=63)
    model = CLIPTextModel(cfg).eval()
    perturb(model, g)
    out_dir = ROOT / "nets-clip-quick-gelu"
    model.save_pretrained(out_dir)
    ids = torch.randint(0, 62, (2, 77), generator=g)
    ids[:, 0] = 62
    ids[0, 9:] = 63
    ids[1, 40:] = 63
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    save_file({
        "input_ids": ids.to(torch.int64).contiguous(),
        "last_hidden_state": out.last_hidden_state.contiguous(),
        "penultimate_hidden_state": out.hidden_states[-2].contiguous(),
    }, ROOT / "golden" / "nets_clip_quick_gelu.safetensors")


def make_clip_projection():
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(13)
    g = torch.Generator().manual_seed(13)
    cfg = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
                         projection_dim=12, bos_token_id=62, eos_token_id=2, pad_token_id=1)
    model = CLIPTextModelWithProjection(cfg).eval()
    perturb(model, g)
    out_dir = ROOT / "nets-clip-projection"
    model.save_pretrained(out_dir)
    # Start token, words, the end token (63, the largest id), then SDXL tokenizer_2's padding (0).
    ids = torch.randint(3, 62, (3, 77), generator=g)
    ids[:, 0] = 62
    for row, end in enumerate([9, 40, 76]):
        ids[row, end] = 63
        ids[row, end + 1:] = 0
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    save_file({
        "input_ids": ids.to(torch.int64).contiguous(),
        "last_hidden_state": out.last_hidden_state.contiguous(),
        "penultimate_hidden_state": out.hidden_states[-2].contiguous(),
        "text_embeds": out.text_embeds.contiguous(),
    }, ROOT / "golden" / "nets_clip_projection.safetensors")


def make_vae():
    torch.manual_seed(12)
    g = torch.Generator().manual_seed(12)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[4, 8, 8],
                        layers_per_block=2, latent_channels=4, norm_num_groups=2, sample_size=32,
                        scaling_factor=0.5).eval()
    perturb(vae, g)
    round_to_f16(vae)
    out_dir = ROOT / "nets-vae-odd"
    vae.half().save_pretrained(out_dir, variant="fp16")
    vae.float()
    # Keep only the half-precision file; the float32 one would be a duplicate.
    full = out_dir / "diffusion_pytorch_model.safetensors"
    if full.exists():
        full.unlink()
    image = torch.rand(2, 3, 20, 28, generator=g) * 2 - 1
    latent = torch.randn(2, 4, 5, 7, generator=g)
    with torch.no_grad():
        dist = vae.encode(image).latent_dist
        decoded = vae.decode(latent).sample
    save_file({
        "image": image.contiguous(),
        "posterior_mean": dist.mean.contiguous(),
        "posterior_logvar": dist.logvar.contiguous(),
        "latent": latent.contiguous(),
        "decoded": decoded.contiguous(),
    }, ROOT / "golden" / "nets_vae_odd.safetensors")


if __name__ == "__main__":
    (ROOT / "golden").mkdir(parents=True, exist_ok=True)
    make_clip()
    make_clip_projection()
    make_vae()
    print("ok")
