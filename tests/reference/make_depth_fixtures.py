#!/usr/bin/env python3
"""Build a tiny random-weight Depth Anything V2 checkpoint and its reference outputs.

Writes under tests/fixtures/depth-anything/ (the folder is found from this file's location, or
from $SDSTREAM_FIXTURES as for the other scripts here):

  model-root/depth-anything/Depth-Anything-V2-Small-hf/{config.json, model.safetensors}
      transformers' `DepthAnythingForDepthEstimation.save_pretrained`, float32: a Dinov2 backbone
      with the real Small checkpoint's layout (patch 14, image_size 518, so 37x37 learned
      positions; apply_layernorm, reshape_hidden_states false) but hidden 32, 4 heads, 4 layers,
      out_indices [1, 2, 3, 4] (every layer, as the real one takes every third of 12); a neck
      with reassemble_factors (4, 2, 1, 0.5), neck_hidden_sizes (8, 16, 24, 32),
      fusion_hidden_size 8; head_hidden_size 8; depth_estimation_type "relative".
      Key names are the Hugging Face checkpoint's (`backbone.encoder.layer.N.attention.attention.
      query.weight`, `neck.fusion_stage.layers.N...`, `head.conv1.weight`, ...).
  golden.safetensors
      predicted_depth_518x518        [1, 518, 518]  Daydream's size (no position interpolation)
      predicted_depth_196x280        [1, 196, 280]  14x20 patches: bicubic position interpolation
      predicted_depth_metric_70x98   [1, 70, 98]    the same weights with
                                                    depth_estimation_type "metric", max_depth 20
      input_70x98                    [1, 3, 70, 98] uint8: the input pattern below, stored so a
                                                    port of the pattern can check itself
      backbone_features_70x98        [4, 1, 36, 32] the backbone's feature maps (tokens, CLS first)

Weights: transformers' own initialisation (normal std 0.02 for every linear and convolution,
truncated normal for the embeddings), seed 0. That initialisation sets every bias to zero, every
LayerNorm to weight 1 / bias 0 and every layer scale to 1; a port that dropped or swapped one of
those would still match. And at std 0.02 the outputs are degenerate: the relative depth is zero
everywhere (the final ReLU of a negative value) and the metric depth constant to 4e-5. So every
linear and convolution weight is then multiplied by 1 / (0.02 sqrt(fan_in)), giving std
1 / sqrt(fan_in) (variance-preserving; a transposed convolution whose kernel equals its stride
has fan-in = its input channels), and every bias, LayerNorm weight and bias and layer-scale
vector is redrawn from a seeded normal (biases and LayerNorm biases std 0.1, LayerNorm weights and
layer scales 1 + 0.1 N(0, 1)). The relative depth then spans 0 to 3.7 (17 % of the pixels
non-zero after the final ReLU), the metric depth 1.1 to 18.5.

Inputs are not stored (a 518x518 float image alone would exceed the fixtures' size budget). They
are an integer pattern that the Rust tests compute the same way, mapped exactly into [-1, 1)
(the range Daydream's tensor path feeds):

  v[c, y, x] = (3x + 5y + 40c + ((x * y) >> 4) + ((x ^ y) & 31)) & 255
  pixel      = (v - 128) / 128            (exact in float32)

Run from the repository root, in an environment with torch and transformers (versions used:
Python 3.11, torch 2.15.0 CPU, transformers 5.23.0, safetensors 0.8.0, numpy 2.4.6):

  python tests/reference/make_depth_fixtures.py

CPU, float32, one thread, fixed seeds: running it twice writes identical files.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("SDSTREAM_FIXTURES") or REPO / "tests" / "fixtures")
OUT = FIXTURES / "depth-anything"
# The checkpoint sits where the model root tests/fixtures/model-root finds the real one.
TINY = FIXTURES / "model-root" / "depth-anything" / "Depth-Anything-V2-Small-hf"


def input_pattern(height: int, width: int) -> np.ndarray:
    """The uint8 test image [1, 3, H, W] described in the module docstring."""
    y, x = np.meshgrid(np.arange(height, dtype=np.int64), np.arange(width, dtype=np.int64), indexing="ij")
    planes = [(3 * x + 5 * y + 40 * c + ((x * y) >> 4) + ((x ^ y) & 31)) & 255 for c in range(3)]
    return np.stack(planes)[None].astype(np.uint8)


def pixel_values(height: int, width: int) -> torch.Tensor:
    v = torch.from_numpy(input_pattern(height, width)).to(torch.float32)
    return (v - 128.0) / 128.0


def tiny_config():
    from transformers import DepthAnythingConfig, Dinov2Config

    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        mlp_ratio=4,
        image_size=518,
        patch_size=14,
        out_indices=[1, 2, 3, 4],
        apply_layernorm=True,
        reshape_hidden_states=False,
    )
    return DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=14,
        reassemble_hidden_size=32,
        reassemble_factors=[4, 2, 1, 0.5],
        neck_hidden_sizes=[8, 16, 24, 32],
        fusion_hidden_size=8,
        head_hidden_size=8,
        depth_estimation_type="relative",
    )


def rescale_weights(model: torch.nn.Module) -> None:
    """Every linear and convolution weight times 1 / (0.02 sqrt(fan_in)): std 1 / sqrt(fan_in)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                fan_in = module.weight[0].numel()
            elif isinstance(module, torch.nn.ConvTranspose2d):
                # Kernel == stride: each output pixel sees one input pixel's channels.
                fan_in = module.weight.shape[0]
            else:
                continue
            module.weight.mul_(1.0 / (0.02 * fan_in**0.5))


def redraw_constant_inits(model: torch.nn.Module, seed: int) -> None:
    """Seeded values for what transformers initialises to constants (see the docstring)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("mask_token"):
                continue  # only used for masked-image pretraining
            is_norm = ".norm1." in name or ".norm2." in name or name.startswith("backbone.layernorm.")
            if name.endswith("lambda1") or (is_norm and name.endswith(".weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def main() -> None:
    from transformers import DepthAnythingForDepthEstimation

    torch.manual_seed(0)
    model = DepthAnythingForDepthEstimation(tiny_config()).eval()
    rescale_weights(model)
    redraw_constant_inits(model, 1)
    TINY.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(TINY)
    # Reload, so that the goldens come from exactly what was written.
    model = DepthAnythingForDepthEstimation.from_pretrained(TINY).eval()

    golden = {}
    with torch.no_grad():
        for h, w in [(518, 518), (196, 280)]:
            golden[f"predicted_depth_{h}x{w}"] = model(pixel_values(h, w)).predicted_depth
        feats = model.backbone(pixel_values(70, 98)).feature_maps
        golden["backbone_features_70x98"] = torch.stack(list(feats))

        config = json.loads((TINY / "config.json").read_text())
        config["depth_estimation_type"] = "metric"
        config["max_depth"] = 20
        metric = DepthAnythingForDepthEstimation.from_pretrained(TINY, config=type(model.config).from_dict(config))
        metric.eval()
        golden["predicted_depth_metric_70x98"] = metric(pixel_values(70, 98)).predicted_depth
    golden["input_70x98"] = torch.from_numpy(input_pattern(70, 98))

    golden = {k: v.contiguous() for k, v in golden.items()}
    save_file(golden, OUT / "golden.safetensors")
    for k, v in golden.items():
        if v.dtype == torch.float32:
            print(f"{k}: {tuple(v.shape)} mean {v.mean():.4g} std {v.std():.4g} max|.| {v.abs().max():.4g}"
                  f" zeros {(v == 0).float().mean():.3f}")
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            print("wrote", path.relative_to(REPO) if path.is_relative_to(REPO) else path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    sys.exit(main())
