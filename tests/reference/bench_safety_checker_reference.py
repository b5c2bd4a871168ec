"""The reference's milliseconds per 512x512 output for the safety checker, beside
examples/safety_checker_bench (sdstream): transformers' CLIP image processor (PIL backend) and
diffusers' StableDiffusionSafetyChecker at full size (CLIP ViT-L/14, projection 768) with the
libraries' default random initialisation, float32, CPU; and the latent feedback blend in torch.

Run: python tests/reference/bench_safety_checker_reference.py [--frames 5] [--threads 2]
(prints a markdown table: median and best ms after one warm-up run).
"""

import argparse

import numpy as np
import torch
from PIL import Image

from _common import timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    config = CLIPConfig(
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, image_size=224, patch_size=14),
        projection_dim=768,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    processor = CLIPImageProcessorPil()
    rgb = (np.arange(512 * 512 * 3) * 37 % 251).astype(np.uint8).reshape(512, 512, 3)
    pil = Image.fromarray(rgb)
    pre = timed(lambda: processor(pil, return_tensors="pt"), args.frames)
    clip_input = processor(pil, return_tensors="pt").pixel_values
    blank = [np.zeros((8, 8, 3), np.float32)]
    with torch.no_grad():
        net = timed(lambda: checker(clip_input=clip_input, images=blank), args.frames)
        out = torch.rand(1, 3, 512, 512)

        def whole():
            image = (out[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            x = processor(Image.fromarray(image), return_tensors="pt").pixel_values
            checker(clip_input=x, images=blank)

        both = timed(whole, args.frames)
        latent, previous = torch.randn(1, 4, 64, 64), torch.randn(1, 4, 64, 64)
        fb = timed(lambda: torch.clamp(0.5 * latent + 0.5 * previous, -10, 10), args.frames)
    print(f"| part (torch {torch.__version__}, CPU, {args.threads} threads, f32) | median ms | best ms |")
    print("|---|---:|---:|")
    print(f"| CLIP image processing (512² → 224²) | {pre[0]:.2f} | {pre[1]:.2f} |")
    print(f"| StableDiffusionSafetyChecker.forward | {net[0]:.1f} | {net[1]:.1f} |")
    print(f"| whole check of a 512² output | {both[0]:.1f} | {both[1]:.1f} |")
    print(f"| latent feedback blend on [1, 4, 64, 64] | {fb[0]:.3f} | {fb[1]:.3f} |")


if __name__ == "__main__":
    main()
