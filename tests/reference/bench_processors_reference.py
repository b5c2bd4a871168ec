"""The reference implementations' milliseconds per 512x512 frame for the model-based processors,
beside examples/processors_bench (sdstream): controlnet_aux 0.0.10's HED, lineart (coarse and
anime) and OpenPose detectors as Daydream's wrappers call them, transformers' Depth Anything V2 Small on the
518x518 squashed frame, torchvision's raft_small (one update, as Daydream's engine reads it) on a
512x512 pair with flow_to_image, and spandrel's Real-ESRGAN x2; full-size networks with the
libraries' default random initialisation, float32, CPU.

Run: python tests/reference/bench_processors_reference.py [--frames 3] [--threads 2] [--only ROWS]
(prints a markdown table: median and best ms after one warm-up run).
"""

import argparse
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from _common import timed

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated rows to run (hed, lineart, "
                    "lineart_anime, openpose, depth, temporal, realesrgan); all by default")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))

    def want(name):
        return not only or name in only

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    frame = np.asarray(Image.open(ROOT / "examples/frames/000.png").convert("RGB").resize((512, 512)))
    pil = Image.fromarray(frame)
    rows = []

    if want("hed"):
        from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector
        hed = HEDdetector(ControlNetHED_Apache2().float().eval())
        with torch.no_grad():
            rows.append(("hed", timed(lambda: hed(pil, output_type="pil"), args.frames)))

    if want("lineart"):
        from controlnet_aux.lineart import Generator, LineartDetector
        lineart = LineartDetector(Generator(3, 1, 3).eval(), Generator(3, 1, 3).eval())
        with torch.no_grad():
            rows.append(("lineart (coarse)", timed(
                lambda: lineart(pil, detect_resolution=512, image_resolution=512, coarse=True), args.frames)))

    if want("lineart_anime"):
        import functools

        from controlnet_aux.lineart_anime import LineartAnimeDetector, UnetGenerator
        norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
        anime = LineartAnimeDetector(UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False).eval())
        with torch.no_grad():
            rows.append(("lineart (anime_style)", timed(
                lambda: anime(pil, detect_resolution=512, image_resolution=512), args.frames)))

    if want("openpose"):
        from controlnet_aux.open_pose import OpenposeDetector
        from controlnet_aux.open_pose.body import Body
        from controlnet_aux.open_pose.model import bodypose_model
        body = Body.__new__(Body)
        body.model = bodypose_model().eval()
        pose = OpenposeDetector(body)
        rows.append(("openpose / pose_tensorrt", timed(lambda: pose(pil, hand_and_face=False), args.frames)))

    if want("depth"):
        from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config
        backbone = Dinov2Config(image_size=518, patch_size=14, hidden_size=384, num_hidden_layers=12,
                                num_attention_heads=6, layerscale_value=1.0,
                                out_features=["stage3", "stage6", "stage9", "stage12"],
                                reshape_hidden_states=False, apply_layernorm=True)
        depth = DepthAnythingForDepthEstimation(DepthAnythingConfig(
            backbone_config=backbone, reassemble_hidden_size=384, patch_size=14, fusion_hidden_size=64,
            neck_hidden_sizes=[48, 96, 192, 384], depth_estimation_type="relative")).eval()
        x = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255

        def run_depth():
            d = depth(pixel_values=F.interpolate(x, size=(518, 518), mode="bilinear", align_corners=False))
            d = d.predicted_depth.squeeze()
            d = (d - d.min()) / (d.max() - d.min())
            F.interpolate(d.repeat(3, 1, 1)[None], size=(512, 512), mode="bilinear", align_corners=False)

        with torch.no_grad():
            rows.append(("depth_tensorrt", timed(run_depth, args.frames)))

    if want("temporal"):
        from torchvision.models.optical_flow import raft_small
        from torchvision.utils import flow_to_image
        raft = raft_small().eval()
        a = x * 2 - 1
        b = torch.roll(a, (2, 3), (2, 3))
        with torch.no_grad():
            rows.append(("temporal_net_tensorrt", timed(
                lambda: flow_to_image(raft(a, b, num_flow_updates=1)[0][0]), args.frames)))

    if want("realesrgan"):
        from spandrel.architectures.ESRGAN import ESRGAN
        esrgan = ESRGAN(in_nc=12, out_nc=3, num_filters=64, num_blocks=23, scale=4, shuffle_factor=2).eval()
        with torch.no_grad():
            rows.append(("realesrgan_trt", timed(lambda: esrgan(x).clamp(0, 1), 1)))

    print(f"reference processors at 512x512, torch {torch.__version__}, {args.threads} threads, float32")
    print("| processor | median ms | best ms |")
    print("|---|---:|---:|")
    for name, (median, best) in rows:
        print(f"| {name} | {median:.1f} | {best:.1f} |")


if __name__ == "__main__":
    main()
