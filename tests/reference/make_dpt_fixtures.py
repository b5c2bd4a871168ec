"""A tiny random-weight DPT (transformers' `DPTForDepthEstimation`, ViT backbone) in the layout
of `Intel/dpt-large`, and goldens for sdstream's `depth` processor, which runs it as Daydream's
`DepthPreprocessor` runs transformers' depth-estimation pipeline. Tested by
core/tests/integration/processors.rs.

Writes:
  tests/fixtures/model-root/Intel/dpt-large/
      config.json                 DPTConfig: dpt-large's structure (readout "project",
                                  reassemble factors 4, 2, 1, 0.5, image_size 384, patch 16),
                                  narrowed: 4 layers 32 wide, 2 heads, neck 8/16/24/32, fusion 16
      preprocessor_config.json    the DPTFeatureExtractor-era keys dpt-large's file has (size
                                  [384, 384], resample 2 = bilinear, mean and std 0.5); written
                                  from memory of the published file, not checked against it:
                                  sdstream reads whatever the file says
      model.safetensors           the weights (transformers' names, with dpt.layernorm, which
                                  the depth head does not read)
  tests/fixtures/processors/dpt.safetensors
      pixel_levels                the image processor's resize of input_sq (U8 [384, 384, 3]); its pixel_values are transformers 4.56's slow
                                  DPTImageProcessor arithmetic on them (float64 rescale cast to
                                  float32, then (x - mean) / std; equal to the installed
                                  transformers' DPTImageProcessorPil)
      net_out_0, net_in_levels_1, net_out_1
                                  the network alone on levels / 127.5 - 1 of pixel_levels and of
                                  U8 [256, 256, 3] levels (the position embeddings resized; transformers
                                  lays out square grids only): predicted_depth
      depth_<d>_<n>               Daydream's DepthPreprocessor tensor path on the test images of
                                  make_processor_fixtures.py: bilinear to d x d (align_corners
                                  False), 8-bit levels (rounded, as sdstream; Daydream truncates),
                                  the pipeline (processor, network, bicubic back to d x d,
                                  min-max, 255x truncated), min-max of the levels, 3 channels,
                                  bilinear to the image's size; F32 [1, 3, H, W]

Run after make_processor_fixtures.py: python tests/reference/make_dpt_fixtures.py (seconds).
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from make_processor_fixtures import MODEL_ROOT, OUT, inputs  # noqa: E402

DIR = MODEL_ROOT / "Intel/dpt-large"
PREPROCESSOR = {
    "do_normalize": True,
    "do_resize": True,
    "ensure_multiple_of": 1,
    "feature_extractor_type": "DPTFeatureExtractor",
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "keep_aspect_ratio": False,
    "resample": 2,
    "size": [384, 384],
}

torch.set_num_threads(1)


def tiny_dpt():
    from transformers import DPTConfig, DPTForDepthEstimation

    torch.manual_seed(31)
    config = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
        image_size=384, patch_size=16, backbone_out_indices=[0, 1, 2, 3], readout_type="project",
        reassemble_factors=[4, 2, 1, 0.5], neck_hidden_sizes=[8, 16, 24, 32], fusion_hidden_size=16,
    )
    model = DPTForDepthEstimation(config).eval()
    # transformers' initialisation (zero position embeddings and CLS token, tiny convolutions)
    # gives a flat map: He-normal weights, LayerNorms near 1, small biases, and a final bias that
    # keeps most of the ReLU'd depth above zero.
    g = torch.Generator().manual_seed(33)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                fan_in = p[0].numel() if "resize" not in name else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
        model.dpt.embeddings.position_embeddings.normal_(0, 0.5, generator=g)
        model.dpt.embeddings.cls_token.normal_(0, 0.5, generator=g)
        model.head.head[4].bias.fill_(0.5)
    return model


def pixel_values(levels: np.ndarray) -> torch.Tensor:
    """transformers 4.56's slow DPTImageProcessor on an RGB uint8 image."""
    size = tuple(PREPROCESSOR["size"])
    resample = Image.Resampling(PREPROCESSOR["resample"])
    resized = np.asarray(Image.fromarray(levels).resize((size[1], size[0]), resample))
    x = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.array(PREPROCESSOR["image_mean"], dtype=np.float32)
    std = np.array(PREPROCESSOR["image_std"], dtype=np.float32)
    x = (x - mean) / std
    return torch.from_numpy(x.transpose(2, 0, 1).copy())[None]


def depth_daydream(model, image: torch.Tensor, detect: int) -> torch.Tensor:
    """DepthPreprocessor._process_tensor_core with the pipeline, then the base class's resize."""
    h, w = image.shape[-2:]
    x = F.interpolate(image, size=(detect, detect), mode="bilinear", align_corners=False)
    levels = torch.round(x[0].clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    with torch.no_grad():
        predicted = model(pixel_values=pixel_values(levels)).predicted_depth
    depth = F.interpolate(predicted.unsqueeze(1), size=(detect, detect), mode="bicubic",
                          align_corners=False).squeeze().numpy()
    depth = (depth - depth.min()) / (depth.max() - depth.min())
    eight = (depth * 255).astype("uint8")
    t = torch.from_numpy(eight).float()
    t = (t - t.min()) / (t.max() - t.min())
    out = t[None].repeat(3, 1, 1)[None]
    return F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False).contiguous()


def main():
    DIR.mkdir(parents=True, exist_ok=True)
    model = tiny_dpt()
    model.save_pretrained(DIR, safe_serialization=True)
    (DIR / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
    goldens = {}
    images = inputs()
    levels = images["sq"]
    pixels = pixel_values(levels)
    # The processor's resize alone (the rest is arithmetic on these levels, checked in Rust).
    goldens["pixel_levels"] = torch.from_numpy(np.round((pixels[0].permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255)
                                               .astype(np.uint8).copy())
    assert torch.equal(pixel_values(goldens["pixel_levels"].numpy()), pixels)
    for k, side in enumerate([384, 256]):
        lv = np.asarray(Image.fromarray(goldens["pixel_levels"].numpy()).resize((side, side), Image.BILINEAR))
        x = torch.from_numpy(lv.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        with torch.no_grad():
            y = model(pixel_values=x).predicted_depth
        if side != 384:  # at 384 the levels are pixel_levels themselves
            goldens[f"net_in_levels_{k}"] = torch.from_numpy(lv.copy())
        goldens[f"net_out_{k}"] = y.contiguous()
        print(f"net {side}: depth in [{y.min():.3f}, {y.max():.3f}], {(y > 0).float().mean():.2f} above 0")
    # The installed transformers' PIL-backend processor (5.x) for comparison.
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    theirs = DPTImageProcessorPil.from_pretrained(DIR)(images=Image.fromarray(levels), return_tensors="pt")
    print("pixels vs DPTImageProcessorPil: max", float((theirs.pixel_values - pixels).abs().max()))
    for name, detect in [("sq", 512), ("wide", 512), ("sq", 320)]:
        x = torch.from_numpy(images[name]).permute(2, 0, 1)[None].float() / 255
        out = depth_daydream(model, x, detect)
        goldens[f"depth_{detect}_{name}"] = out
        print(f"depth_{detect}_{name}: {torch.unique(torch.round(out * 255)).numel()} levels")
    save_file(goldens, str(OUT / "dpt.safetensors"))


if __name__ == "__main__":
    main()
