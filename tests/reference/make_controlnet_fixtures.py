#!/usr/bin/env python3
"""Build tiny random-weight ControlNets for tiny-sd-turbo and the ControlNet goldens.

Writes under tests/fixtures/ (see tests/reference/README.md, "ControlNet fixtures"):

  tiny-controlnet-a/   ControlNetModel.from_unet(tiny-sd-turbo's UNet): attention at every level,
                       UNetMidBlock2DCrossAttn; encoder weights copied from the UNet
  tiny-controlnet-b/   a lighter net of the same widths: cross-attention only at level 0,
                       UNetMidBlock2D (no attention), its own random encoder weights
  tiny-controlnet-temporal/  net b's shape with 6 conditioning channels, as TemporalNet2
                       (daydreamlive/TemporalNet2-*) takes the previous frame and the flow image
  golden/controlnet_temporal_net.safetensors  its residuals for a 6-channel control image
  golden/controlnet_net.safetensors       net-level residuals of both nets (diffusers)
  golden/stream_cn_*.safetensors          StreamDiffusion 0.1.1 outputs with ControlNet residuals
  golden/controlnet_streams.json          the stream cases

Both nets get random (seeded) zero convolutions and conditioning embeddings: diffusers initialises
them to zero, which would make every residual zero and test nothing. Weights are stored as float16
(`diffusion_pytorch_model.fp16.safetensors`) to keep the fixtures small; every golden is computed
from the nets as reloaded from disk, upcast to float32.

The reference StreamDiffusion does not know ControlNets; its UNet is wrapped so that each call first
runs the enabled nets on the same latents, timesteps and embeddings with the control image repeated
over the rows, multiplies their residuals by conditioning_scale and by diffusers' keep mask
(`not (i/N < start or (i+1)/N > end)` for the row's step i of N), sums them over the nets and passes
them as down_block_additional_residuals / mid_block_additional_residual.

Usage: python tests/reference/make_controlnet_fixtures.py   (after make_fixtures.py)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (shares the pipeline loader and the stream driver)
from _common import FIXTURES, GOLDEN_DIR, jitter_norms, write_json  # noqa: E402

torch.set_num_threads(1)

NET_A = FIXTURES / "tiny-controlnet-a"
NET_B = FIXTURES / "tiny-controlnet-b"
NET_TEMPORAL = FIXTURES / "tiny-controlnet-temporal"
# 64x64 frames, 8x8 latents: the conditioning embedding must downscale 8x (4 widths).
EMBEDDING_CHANNELS = (8, 8, 16, 16)
ZERO_CONV_GAIN = 1.0


def randomize_control_parts(net, seed: int) -> None:
    """Give the zero convs and the conditioning embedding PyTorch's default (non-zero) init."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in list(net.controlnet_down_blocks) + [net.controlnet_mid_block]:
            module.reset_parameters()
            module.weight.mul_(ZERO_CONV_GAIN)
        for module in net.controlnet_cond_embedding.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.reset_parameters()


def light_net(unet, conditioning_channels: int):
    """Net b's shape for the fixture UNet: cross-attention only at level 0, no mid attention."""
    from diffusers import ControlNetModel

    cfg = unet.config
    return ControlNetModel(
        in_channels=cfg.in_channels,
        conditioning_channels=conditioning_channels,
        flip_sin_to_cos=cfg.flip_sin_to_cos,
        freq_shift=cfg.freq_shift,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2D",
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.attention_head_dim,
        use_linear_projection=cfg.use_linear_projection,
        norm_num_groups=cfg.norm_num_groups,
        conditioning_embedding_out_channels=EMBEDDING_CHANNELS,
    )


def save_net(net, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()
    net.to(torch.float16).save_pretrained(out, variant="fp16", safe_serialization=True)
    for f in out.iterdir():
        os.chmod(f, 0o644)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"  {out.name}: {size / 1e6:.2f} MB")


def make_temporal_net() -> None:
    """tiny-controlnet-temporal and its residuals (diffusers) for a 6-channel control image."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(mf.SD_DIR / "unet", torch_dtype=torch.float32)
    torch.manual_seed(26)
    net = light_net(unet, conditioning_channels=6)
    jitter_norms(net, torch.Generator().manual_seed(27))
    randomize_control_parts(net, 28)
    save_net(net, NET_TEMPORAL)

    net_residuals("controlnet_temporal_net.safetensors", 401, 6, (("t", NET_TEMPORAL),))


def make_nets() -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(mf.SD_DIR / "unet", torch_dtype=torch.float32)
    net_a = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING_CHANNELS)
    randomize_control_parts(net_a, 21)

    torch.manual_seed(22)
    net_b = light_net(unet, conditioning_channels=3)
    # Trained-looking norms, as the fixture UNet (see make_fixtures.make_unet).
    jitter_norms(net_b, torch.Generator().manual_seed(23))
    randomize_control_parts(net_b, 24)

    for net, out in ((net_a, NET_A), (net_b, NET_B)):
        save_net(net, out)


def load_net(path: Path):
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(path, variant="fp16", torch_dtype=torch.float16).float().eval()


# --------------------------------------------------------------------------------------
# Net-level golden
# --------------------------------------------------------------------------------------


def net_residuals(golden_name: str, seed: int, channels: int, nets) -> None:
    """Writes golden/<golden_name>: the inputs (two latent rows, two timesteps, two prompts, a
    `channels`-channel control image) and each net's residuals, as `<prefix>_down_NN` and
    `<prefix>_mid` for the (prefix, folder) pairs of `nets`."""
    pipe = mf.load_sd_pipeline()
    g = torch.Generator().manual_seed(seed)
    # 8x16 latents: at 8x8 the deepest level is 1x1, where GroupNorm sees 2 values per group and
    # amplifies float rounding (the tiny fixture's 64 channels in 32 groups); 1x2 keeps it tame.
    sample = torch.randn(2, 4, 8, 16, generator=g)
    timesteps = torch.tensor([759, 359], dtype=torch.int64)
    cond = torch.rand(1, channels, 64, 128, generator=g)
    ids = pipe.tokenizer(["a photo of a cat", "flowers"], padding="max_length", max_length=77,
                         truncation=True, return_tensors="pt").input_ids
    tensors = {"sample": sample, "timesteps": timesteps, "controlnet_cond": cond}
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0]
        tensors["encoder_hidden_states"] = embeds
        for name, path in nets:
            net = load_net(path)
            down, mid = net(sample, timesteps, encoder_hidden_states=embeds,
                            controlnet_cond=cond.repeat(2, 1, 1, 1), conditioning_scale=1.0,
                            return_dict=False)
            for i, d in enumerate(down):
                tensors[f"{name}_down_{i:02d}"] = d
            tensors[f"{name}_mid"] = mid
            print(f"  net {name}: {len(down)} down residuals, std {torch.cat([d.flatten() for d in down]).std():.3f}, "
                  f"mid std {mid.std():.3f}")
    mf.save_golden(golden_name, tensors)


def golden_nets() -> None:
    net_residuals("controlnet_net.safetensors", 400, 3, (("a", NET_A), ("b", NET_B)))


# --------------------------------------------------------------------------------------
# Stream goldens
# --------------------------------------------------------------------------------------

# Each case overrides make_fixtures.STREAM_DEFAULTS; `controlnets` as in the Daydream body, with the
# fixture folder names as model ids; `updates` change the nets before a frame.
CN_CASES = {
    "cn1_self_t3": dict(controlnets=[dict(model_id="tiny-controlnet-a", conditioning_scale=0.3)]),
    "cn2_window_self_t3": dict(controlnets=[
        dict(model_id="tiny-controlnet-a", conditioning_scale=0.3),
        dict(model_id="tiny-controlnet-b", conditioning_scale=0.7,
             control_guidance_start=0.0, control_guidance_end=0.5),
    ]),
    "cn2_window_full_t2": dict(cfg_type="full", t_index_list=[12, 32], controlnets=[
        dict(model_id="tiny-controlnet-a", conditioning_scale=0.3),
        dict(model_id="tiny-controlnet-b", conditioning_scale=0.7,
             control_guidance_start=0.0, control_guidance_end=0.5),
    ]),
    "cn2_window_initialize_t3": dict(cfg_type="initialize", controlnets=[
        dict(model_id="tiny-controlnet-a", conditioning_scale=0.3, control_guidance_start=0.3),
        dict(model_id="tiny-controlnet-b", conditioning_scale=0.7, control_guidance_end=0.7),
    ]),
    "cn2_window_none_t3_nobatch_nonoise": dict(
        cfg_type="none", use_denoising_batch=False, do_add_noise=False, controlnets=[
            dict(model_id="tiny-controlnet-a", conditioning_scale=0.3),
            dict(model_id="tiny-controlnet-b", conditioning_scale=0.7, control_guidance_end=0.5),
        ]),
    "cn1_scale_update": dict(
        controlnets=[dict(model_id="tiny-controlnet-a", conditioning_scale=0.3)],
        updates=[dict(before_frame=3, set={"0": dict(conditioning_scale=0.8)})],
    ),
    "cn_add_net": dict(
        controlnets=[dict(model_id="tiny-controlnet-a", conditioning_scale=0.3)],
        updates=[dict(before_frame=3, add=[dict(model_id="tiny-controlnet-b", conditioning_scale=0.7)])],
    ),
}

NET_DEFAULTS = dict(conditioning_scale=1.0, enabled=True, control_guidance_start=0.0, control_guidance_end=1.0,
                    preprocessor="passthrough")


class ControlledUNet:
    """The stream's UNet with ControlNet residuals added, as sdstream computes them."""

    def __init__(self, unet, stream, nets: dict[str, object]):
        self.unet = unet
        self.stream = stream
        self.nets = nets
        self.configs: list[dict] = []
        self.control_image: torch.Tensor | None = None

    def row_steps(self, t: torch.Tensor) -> list[int]:
        steps = self.stream.sub_timesteps_tensor.tolist()
        return [steps.index(v) for v in t.tolist()]

    def __call__(self, x, t, encoder_hidden_states, return_dict=False):
        n = len(self.stream.t_list)
        rows = self.row_steps(t)
        down_sum, mid_sum = None, None
        for cfg in self.configs:
            if not cfg["enabled"] or cfg["conditioning_scale"] == 0:
                continue
            s, e = cfg["control_guidance_start"], cfg["control_guidance_end"]
            keep = [not (i / n < s or (i + 1) / n > e) for i in rows]
            if not any(keep):
                continue
            net = self.nets[cfg["model_id"]]
            cond = self.control_image.repeat(x.shape[0], 1, 1, 1)
            down, mid = net(x, t, encoder_hidden_states=encoder_hidden_states, controlnet_cond=cond,
                            conditioning_scale=1.0, return_dict=False)
            mask = torch.tensor(keep, dtype=x.dtype).view(-1, 1, 1, 1) * cfg["conditioning_scale"]
            down = [d * mask for d in down]
            mid = mid * mask
            if down_sum is None:
                down_sum, mid_sum = down, mid
            else:
                down_sum = [a + b for a, b in zip(down_sum, down)]
                mid_sum = mid_sum + mid
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states,
                         down_block_additional_residuals=down_sum, mid_block_additional_residual=mid_sum,
                         return_dict=return_dict)


def case_settings(name: str) -> dict:
    settings = dict(mf.STREAM_DEFAULTS, **CN_CASES[name])
    settings["name"] = name
    settings["file"] = f"golden/stream_{name}.safetensors"
    settings["frames"] = mf.frame_files()[: settings["num_frames"]]
    settings["controlnets"] = [dict(NET_DEFAULTS, **c) for c in settings["controlnets"]]
    return settings


def run_case(settings: dict, nets: dict) -> dict[str, torch.Tensor]:
    controlled = None

    def control_unet(stream) -> None:
        nonlocal controlled
        controlled = ControlledUNet(stream.unet, stream, nets)
        controlled.configs = [dict(c) for c in settings["controlnets"]]
        stream.unet = controlled

    def before_frame(k: int, stream, frame) -> None:
        for update in settings["updates"]:
            if update["before_frame"] != k:
                continue
            for index, fields in update.get("set", {}).items():
                controlled.configs[int(index)].update(fields)
            for added in update.get("add", []):
                controlled.configs.append(dict(NET_DEFAULTS, **added))
        image = np.asarray(frame, dtype=np.float32) / 255.0
        controlled.control_image = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).contiguous()

    _, prepared, outputs, patches = mf.drive_stream(settings, control_unet, before_frame)
    assert not patches.randn_like_draws, "cases must not draw from the global generator"
    return {"init_noise": prepared["init_noise"], "output": torch.cat(outputs)}


def golden_streams() -> None:
    nets = {"tiny-controlnet-a": load_net(NET_A), "tiny-controlnet-b": load_net(NET_B)}
    manifest = []
    for name in CN_CASES:
        settings = case_settings(name)
        with torch.no_grad():
            first = run_case(settings, nets)
            second = run_case(settings, nets)
        same = all(torch.equal(first[k], second[k]) for k in first)
        mf.save_golden(f"stream_{name}.safetensors", first)
        out = first["output"]
        print(f"  {name:36s} output {list(out.shape)} mean={out.mean():.4f} std={out.std():.4f} "
              f"deterministic={same}")
        manifest.append(settings | {"deterministic": same})
    # How much the nets change the picture (so the goldens test something): the no-net outputs.
    write_json(GOLDEN_DIR / "controlnet_streams.json", {
        "description": "StreamDiffusion (PyPI streamdiffusion 0.1.1) on diffusers, CPU, float32, tiny-sd-turbo + "
                       "tiny-taesd, with ControlNet residuals added to every UNet call (see "
                       "tests/reference/make_controlnet_fixtures.py). ControlNet model_ids are folders under "
                       "tests/fixtures/. Control images: the input frame in [0, 1] (passthrough). updates: "
                       "before frame `before_frame`, `set` changes fields of the net at that index, `add` "
                       "appends nets. Tensors: init_noise, output [frames, 3, 64, 64] in [0, 1].",
        "cases": manifest,
    })


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="all", choices=["nets", "temporal", "net-golden", "streams", "all"])
    stage = parser.parse_args().stage
    if stage in ("nets", "all"):
        print("[controlnets]")
        make_nets()
    if stage in ("temporal", "all"):
        print("[6-channel controlnet]")
        make_temporal_net()
    if stage in ("net-golden", "all"):
        print("[net goldens]")
        golden_nets()
    if stage in ("streams", "all"):
        print("[stream goldens]")
        golden_streams()


if __name__ == "__main__":
    main()
