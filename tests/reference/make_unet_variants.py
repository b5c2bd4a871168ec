"""Makes tests/fixtures/unet-variants/: tiny random-weight diffusers UNet2DConditionModels that
exercise the config options the sd-turbo-shaped fixture does not (1x1-conv projections, odd latent
sizes, per-level lists, only_cross_attention, scale_shift time conditioning, a mid block without
attention, non-silu activations, SDXL's text_time added conditioning, ...), with their inputs and
diffusers' outputs (f32, CPU).

Each case folder holds config.json + diffusion_pytorch_model.safetensors (diffusers' own
save_pretrained, weights in f16) and io.safetensors with:
  sample, encoder_hidden_states, timesteps (one per row, int64), single_timestep,
  output, output_single_timestep, control_down_residual_NN, control_mid_residual, output_control,
  and for SDXL text_embeds, time_ids.

Run: python tests/reference/make_unet_variants.py   (from the repository root)
"""

import math
import os
import sys

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "unet-variants")

CASES = {
    # SD 1.5-style 1x1-conv projections, per-level lists, odd latent size (upsample sizes forwarded),
    # upcast attention, flip_sin_to_cos false with freq_shift 1, and an LCM guidance projection
    # (time_cond_proj_dim) whose weights exist but are unused without timestep_cond.
    "conv_proj_odd_size": dict(
        config=dict(
            block_out_channels=(4, 8, 8),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=(1, 2, 1),
            transformer_layers_per_block=(2, 1, 1),
            attention_head_dim=2,
            cross_attention_dim=6,
            use_linear_projection=False,
            upcast_attention=True,
            flip_sin_to_cos=False,
            freq_shift=1,
            norm_num_groups=2,
            norm_eps=1e-6,
            time_cond_proj_dim=5,
        ),
        sample=(3, 4, 10, 6),
        timesteps=(759, 599, 359),
    ),
    # only_cross_attention on one level, scale_shift resnets, a mid block without attention and a
    # scaled output, gelu nonlinearity, time embedding activations, padding-0 downsampling,
    # centred input, odd conv kernels, time_embedding_dim override.
    "options": dict(
        config=dict(
            block_out_channels=(4, 8),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            mid_block_type="UNetMidBlock2D",
            mid_block_scale_factor=1.5,
            layers_per_block=1,
            attention_head_dim=(2, 2),
            cross_attention_dim=6,
            only_cross_attention=(True, False),
            use_linear_projection=True,
            resnet_time_scale_shift="scale_shift",
            act_fn="gelu",
            time_embedding_act_fn="silu",
            timestep_post_act="gelu",
            time_embedding_dim=24,
            downsample_padding=0,
            center_input_sample=True,
            conv_in_kernel=5,
            conv_out_kernel=1,
            norm_num_groups=2,
        ),
        sample=(2, 4, 8, 8),
        timesteps=(999, 250),
    ),
    # SDXL layout: plain first level, more transformer layers deeper, text_time conditioning.
    "sdxl_text_time": dict(
        config=dict(
            block_out_channels=(4, 8),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 2),
            cross_attention_dim=6,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 + 6 * 4,
            norm_num_groups=2,
        ),
        sample=(2, 4, 8, 8),
        timesteps=(999, 1),
        text_embeds=6,
    ),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, norms included, so that a misplaced tensor shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def skip_shapes(unet, sample, timesteps, context, added):
    """Shapes of the skip connections and of the mid-block output, from hooks on a forward pass."""
    down, mid = [], []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: down.append(o.shape))]
    for block in unet.down_blocks:
        hooks.append(block.register_forward_hook(lambda m, i, o: down.extend(r.shape for r in o[1])))
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: mid.append(o.shape)))
    unet(sample, timesteps, encoder_hidden_states=context, added_cond_kwargs=added)
    for h in hooks:
        h.remove()
    return down, mid[0]


def make(name: str, case: dict, seed: int) -> None:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, sample_size=8, **case["config"]).eval()
    randomize(unet, seed)
    # Weights are stored in f16 (half the bytes); the reference runs on the f16-rounded values in f32.
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(p.half().float())
    g = torch.Generator().manual_seed(seed + 1000)
    b = case["sample"][0]
    sample = torch.randn(case["sample"], generator=g)
    context = torch.randn(b, 7, case["config"]["cross_attention_dim"], generator=g)
    timesteps = torch.tensor(case["timesteps"], dtype=torch.int64)
    single = torch.tensor([599], dtype=torch.int64)
    io = {"sample": sample, "encoder_hidden_states": context, "timesteps": timesteps, "single_timestep": single}
    added = None
    if "text_embeds" in case:
        text_embeds = torch.randn(b, case["text_embeds"], generator=g)
        time_ids = torch.tensor([[64.0, 48.0, 0.0, 8.0, 64.0, 64.0], [32.0, 32.0, 4.0, 0.0, 40.0, 24.0]][:b])
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        io.update(text_embeds=text_embeds, time_ids=time_ids)
    with torch.no_grad():
        io["output"] = unet(sample, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample
        io["output_single_timestep"] = unet(
            sample, single[0], encoder_hidden_states=context, added_cond_kwargs=added
        ).sample
        down_shapes, mid_shape = skip_shapes(unet, sample, timesteps, context, added)
        down_res = [torch.randn(s, generator=g) * 0.5 for s in down_shapes]
        mid_res = torch.randn(mid_shape, generator=g) * 0.5
        io["output_control"] = unet(
            sample,
            timesteps,
            encoder_hidden_states=context,
            added_cond_kwargs=added,
            down_block_additional_residuals=down_res,
            mid_block_additional_residual=mid_res,
        ).sample
    for i, r in enumerate(down_res):
        io[f"control_down_residual_{i:02d}"] = r
    io["control_mid_residual"] = mid_res
    assert all(torch.isfinite(v.float()).all() for v in io.values())
    assert io["output"].std() > 0.05, f"{name}: output nearly constant"

    out = os.path.join(ROOT, name)
    os.makedirs(out, exist_ok=True)
    unet.half().save_pretrained(out, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(out, "io.safetensors"))
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{name}: {sum(p.numel() for p in unet.parameters())} parameters, {size / 1024:.0f} KiB,"
          f" output std {io['output'].std():.3f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    only = sys.argv[1:]
    for i, (name, case) in enumerate(CASES.items()):
        if not only or name in only:
            make(name, case, seed=10 + i)
