"""Tiny random-weight OpenPose hand and face networks and goldens for sdstream's `openpose`
processor with `include_hands`/`include_face` (controlnet_aux 0.0.10's OpenposeDetector with
`hand_and_face=True`, as Daydream's wrapper calls it), tested by
core/tests/integration/processors.rs.

Run after make_processor_fixtures.py (it reuses its synthetic two-person body maps).

Writes:
  tests/fixtures/model-root/lllyasviel/Annotators/hand_pose_model.pth
      controlnet_aux's `handpose_model` rebuilt narrower with its make_layers (trunk 4 ... 8
      wide, stage 1 12, refinement 6, 22 heatmaps, six stages), saved with the names
      util.transfer expects (`conv1_1.weight`, no `model1_0.`) in torch's legacy format, as
      pytorch-openpose saved the published file (torch 0.4), with reproducible storage keys
  tests/fixtures/model-root/lllyasviel/Annotators/facenet.pth
      controlnet_aux's `FaceNet` with every convolution narrowed the same way (71 heatmaps),
      its own state dict names, torch.save's zip format
  tests/fixtures/processors/hand_face.safetensors
      hand_in_levels, hand_out
                            the hand network alone: random U8 levels [1, 3, 64, 64], fed as
                            levels / 256 - 0.5, and its last stage's heatmaps [1, 22, 8, 8]
      face_in_levels, face_out
                            the face network alone on [1, 3, 384, 384]: heatmaps [1, 71, 48, 48]
      blur_in_<k>, blur_out_<k>
                            random U8 [H, W, 3] images and OpenCV's GaussianBlur(sigma 0.8) of them
      pose_hands_<n>        Daydream's OpenPosePreprocessor with include_hands on the test images
                            of make_processor_fixtures.py, with its tiny body network and these
                            hand and face networks: PIL LANCZOS to 512 x 512, OpenposeDetector(
                            hand_and_face=True), bilinear to the image's size, F32
  tests/fixtures/processors/hand_face_canvas.png
      the canvas controlnet_aux draws for examples/frames/001.png when its body network
      returns make_processor_fixtures.pose_from_maps' two people and the tiny hand and face
      networks run on their crops (RGB, 512 x 512)
  tests/fixtures/processors/hand_face_people.json
      what detect_poses returns for that scene: per person the left hand, the right hand and
      the face as lists of [x, y] (float32 values over the image size) or null

Run: python tests/reference/make_hand_face_fixtures.py  (under a minute; deterministic).
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
from collections import OrderedDict

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from controlnet_aux.open_pose import OpenposeDetector  # noqa: E402
from controlnet_aux.open_pose.body import Body  # noqa: E402
from controlnet_aux.open_pose.face import Face, FaceNet  # noqa: E402
from controlnet_aux.open_pose.hand import Hand  # noqa: E402
from controlnet_aux.open_pose.model import handpose_model, make_layers  # noqa: E402

from make_processor_fixtures import (  # noqa: E402
    ANNOTATORS, OUT, ROOT, GivenMaps, inputs, pose_from_maps, tiny_body)
from make_published_layouts import legacy_save  # noqa: E402

torch.set_num_threads(1)

TRUNK = [("conv1_1", 4), ("conv1_2", 4), ("conv2_1", 6), ("conv2_2", 6), ("conv3_1", 8),
         ("conv3_2", 8), ("conv3_3", 8), ("conv3_4", 8), ("conv4_1", 8), ("conv4_2", 8),
         ("conv4_3", 8), ("conv4_4", 8), ("conv5_1", 8), ("conv5_2", 8), ("conv5_3_CPM", 6)]
POOLED = ("conv1_2", "conv2_2", "conv3_4")
HIDDEN, REFINE, STAGES = 12, 6, range(2, 7)


def randomise(model, seed, out_bias):
    """He-normal weights and small biases (torch's default initialisation lets the signal die
    over 30 layers); the heatmap outputs' biases at `out_bias`, so that a part's map crosses the
    detectors' thresholds in places."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight"):
                fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(2.0 / fan_in))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith("bias") and ("Mconv7_stage" in name or "conv6_2_CPM" in name):
                p.add_(out_bias)
    return model.float().eval()


def narrow_hand():
    """controlnet_aux's handpose_model with narrow blocks built by its make_layers."""
    no_relu = ["conv6_2_CPM"] + [f"Mconv7_stage{s}" for s in STAGES]
    model = handpose_model.__new__(handpose_model)
    torch.nn.Module.__init__(model)
    trunk, c = OrderedDict(), 3
    for name, width in TRUNK:
        trunk[name] = [c, width, 3, 1, 1]
        c = width
        if name in POOLED:
            trunk[f"pool{name[4]}_stage1"] = [2, 2, 0]
    model.model1_0 = make_layers(trunk, no_relu)
    model.model1_1 = make_layers(OrderedDict([("conv6_1_CPM", [c, HIDDEN, 1, 1, 0]),
                                              ("conv6_2_CPM", [HIDDEN, 22, 1, 1, 0])]), no_relu)
    for s in STAGES:
        block = OrderedDict()
        for m in range(1, 6):
            block[f"Mconv{m}_stage{s}"] = [22 + c if m == 1 else REFINE, REFINE, 7, 1, 3]
        block[f"Mconv6_stage{s}"] = [REFINE, REFINE, 1, 1, 0]
        block[f"Mconv7_stage{s}"] = [REFINE, 22, 1, 1, 0]
        setattr(model, f"model{s}", make_layers(block, no_relu))
    return model


def narrow_face():
    """controlnet_aux's FaceNet with every convolution replaced by a narrow one."""
    model = FaceNet()
    c = 3
    for name, width in TRUNK:
        setattr(model, name, torch.nn.Conv2d(c, width, 3, 1, 1))
        c = width
    model.conv6_1_CPM = torch.nn.Conv2d(c, HIDDEN, 1, 1, 0)
    model.conv6_2_CPM = torch.nn.Conv2d(HIDDEN, 71, 1, 1, 0)
    for s in STAGES:
        for m in range(1, 6):
            setattr(model, f"Mconv{m}_stage{s}", torch.nn.Conv2d(71 + c if m == 1 else REFINE, REFINE, 7, 1, 3))
        setattr(model, f"Mconv6_stage{s}", torch.nn.Conv2d(REFINE, REFINE, 1, 1, 0))
        setattr(model, f"Mconv7_stage{s}", torch.nn.Conv2d(REFINE, 71, 1, 1, 0))
    return model


def keypoints(points):
    return None if points is None else [[float(k.x), float(k.y)] for k in points]


def main():
    hand_net = randomise(narrow_hand(), 21, 0.08)
    face_net = randomise(narrow_face(), 22, 0.02)
    hand_state = {".".join(k.split(".")[1:]): v for k, v in hand_net.state_dict().items()}
    legacy_save(hand_state, ANNOTATORS / "hand_pose_model.pth")
    torch.save(face_net.state_dict(), ANNOTATORS / "facenet.pth")

    goldens = {}
    g = torch.Generator().manual_seed(23)
    with torch.no_grad():
        for name, net, side in [("hand", hand_net, 64), ("face", face_net, 384)]:
            levels = torch.randint(0, 256, (1, 3, side, side), generator=g, dtype=torch.uint8)
            out = net(levels.float() / 256 - 0.5)
            goldens[f"{name}_in_levels"] = levels
            goldens[f"{name}_out"] = (out[-1] if isinstance(out, list) else out).contiguous()

    hand = Hand.__new__(Hand)
    hand.model = hand_net
    face = Face.__new__(Face)
    face.model = face_net
    body = Body.__new__(Body)
    body.model = tiny_body()
    detector = OpenposeDetector(body, hand, face)
    for name, img in inputs().items():
        h, w = img.shape[:2]
        pil = Image.fromarray(img).resize((512, 512), Image.LANCZOS)
        result = detector(pil, hand_and_face=True)
        t = torch.from_numpy(np.asarray(result).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
        goldens[f"pose_hands_{name}"] = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False).contiguous()
        poses = detector.detect_poses(np.asarray(pil.resize((512, 512))), include_hand=True, include_face=True)
        print(f"pose_hands_{name}: {len(poses)} people, hands/face found:",
              [(p.left_hand is not None, p.right_hand is not None, p.face is not None) for p in poses])
    # OpenCV's 8-bit GaussianBlur(σ = 0.8), which Hand.__call__ starts with, on odd sizes.
    rng = np.random.default_rng(24)
    for k, (h, w) in enumerate([(37, 41), (20, 20), (5, 9)]):
        levels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        goldens[f"blur_in_{k}"] = torch.from_numpy(levels)
        goldens[f"blur_out_{k}"] = torch.from_numpy(cv2.GaussianBlur(levels, (0, 0), 0.8))
    save_file(goldens, str(OUT / "hand_face.safetensors"))

    _, heat, paf = pose_from_maps()
    body = Body.__new__(Body)
    body.model = GivenMaps(torch.from_numpy(paf)[None], torch.from_numpy(heat)[None])
    detector = OpenposeDetector(body, hand, face)
    frame = np.asarray(Image.open(ROOT / "examples/frames/001.png").convert("RGB")).copy()
    canvas = np.asarray(detector(frame, output_type="np", hand_and_face=True))
    Image.fromarray(canvas).save(OUT / "hand_face_canvas.png", optimize=False, compress_level=9)
    poses = detector.detect_poses(frame, include_hand=True, include_face=True)
    people = [{"left_hand": keypoints(p.left_hand), "right_hand": keypoints(p.right_hand),
               "face": keypoints(p.face)} for p in poses]
    (OUT / "hand_face_people.json").write_text(json.dumps(people, indent=1) + "\n")
    for n, p in enumerate(people):
        def drawn(points):
            return None if points is None else sum(1 for x, y in points if x * 512 > 1 and y * 512 > 1)
        print(f"person {n}: left hand {drawn(p['left_hand'])}, right hand {drawn(p['right_hand'])}, "
              f"face {drawn(p['face'])} points drawn")
    body_only = np.asarray(Image.open(OUT / "pose_maps_canvas.png"))
    print("canvas pixels differing from the body-only canvas:", int((canvas != body_only).any(axis=2).sum()))


if __name__ == "__main__":
    main()
