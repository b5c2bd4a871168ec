"""A tiny random-weight anime lineart generator and golden outputs for sdstream's `lineart`
processor with `anime_style` true, tested by core/tests/integration/processors.rs.

Writes:
  tests/fixtures/model-root/lllyasviel/Annotators/netG.pth
      controlnet_aux 0.0.10's UnetGenerator(3, 1, 8, ngf=2) with InstanceNorm (affine False,
      no running statistics), as LineartAnimeDetector.from_pretrained builds it but narrowed
      (widths 2, 4, 8, 16, 16, 16, 16, 16 instead of 64 ... 512); torch.save()'d (zip format)
      with every name under DataParallel's `module.` prefix, which controlnet_aux strips when
      it loads the published file.
  tests/fixtures/processors/lineart_anime.safetensors
      input_<n>             the test images of make_processor_fixtures.py (U8 [H, W, 3])
      net_in_levels, net_out
                            the generator alone: U8 [256, 256, 3] levels (examples/frames/002.png
                            shrunk with PIL bilinear), fed as levels / 127.5 - 1 [1, 3, 256, 256],
                            and its output F32 [1, 1, 256, 256]
      lineart_anime_<d>_<n> Daydream's LineartPreprocessor with anime_style on its tensor path:
                            PIL LANCZOS to d x d, LineartAnimeDetector(detect_resolution=d,
                            image_resolution=d), torch bilinear (align_corners=False) to the
                            image's size, F32 [1, 3, H, W] in [0, 1]

The detector's cubic resizes (to multiples of 256 and back) are copies at d = 512; at other
sizes OpenCV hands INTER_CUBIC to its bundled IPP, whose weights differ from OpenCV's own cubic
(which sdstream implements) by a level on a few pixels. The script prints how many pixels the
IPP-free run (cv2.ipp.setUseIPP(False)) changes and stores that run's output as
lineart_anime_<d>_<n>_no_ipp where it differs.

Run: python tests/reference/make_lineart_anime_fixtures.py  (a few seconds; deterministic).
"""

from __future__ import annotations

import functools
import pathlib
import sys

import cv2
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from controlnet_aux.lineart_anime import LineartAnimeDetector, UnetGenerator  # noqa: E402

# Daydream's LineartPreprocessor calls either detector the same way (the anime one takes
# `coarse` and ignores it).
from make_processor_fixtures import ANNOTATORS, OUT, ROOT, inputs, lineart_daydream  # noqa: E402

torch.set_num_threads(1)


def tiny_generator(seed=11):
    torch.manual_seed(seed)
    norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
    return UnetGenerator(3, 1, 8, 2, norm_layer=norm, use_dropout=False).float().eval()


CASES = [("sq", 512), ("wide", 128), ("sq", 320)]


def main():
    ANNOTATORS.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    net = tiny_generator()
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, ANNOTATORS / "netG.pth")
    detector = LineartAnimeDetector(net)

    goldens = {}
    images = inputs()
    for name, img in images.items():
        goldens[f"input_{name}"] = torch.from_numpy(img)

    frame = Image.open(ROOT / "examples/frames/002.png").convert("RGB").resize((256, 256), Image.BILINEAR)
    levels = torch.from_numpy(np.asarray(frame).copy())
    x = (levels.float() / 127.5 - 1.0).permute(2, 0, 1)[None].contiguous()
    with torch.no_grad():
        y = net(x)
    goldens["net_in_levels"], goldens["net_out"] = levels, y.contiguous()
    print("net_out range", float(y.min()), float(y.max()), "std", float(y.std()))

    with torch.no_grad():
        for name, detect in CASES:
            out = lineart_daydream(detector, images[name], detect, True)
            goldens[f"lineart_anime_{detect}_{name}"] = out
            levels = torch.unique(torch.round(out * 255)).numel()
            cv2.ipp.setUseIPP(False)
            plain = lineart_daydream(detector, images[name], detect, True)
            cv2.ipp.setUseIPP(True)
            moved = (plain - out).abs().max().item() * 255
            share = ((plain - out).abs() * 255 > 0.5).float().mean().item()
            print(f"lineart_anime_{detect}_{name}: {levels} levels; without IPP max {moved:.3f} levels, "
                  f"{100 * share:.3f}% of the values moved")
            if moved > 0:
                goldens[f"lineart_anime_{detect}_{name}_no_ipp"] = plain
    save_file(goldens, str(OUT / "lineart_anime.safetensors"))


if __name__ == "__main__":
    main()
