"""Tiny random-weight annotator networks and golden outputs for sdstream's model-based image
processors, tested by core/tests/integration/processors.rs: HED and lineart (controlnet_aux's detectors),
standard_lineart (no network), Real-ESRGAN (spandrel), Depth Anything (transformers), OpenPose
(controlnet_aux's OpenposeDetector) and the TemporalNet flow image (torchvision's RAFT).

Run after make_depth_fixtures.py, make_openpose_fixtures.py and make_raft_fixtures.py, which
write the tiny Depth Anything, body and RAFT networks this reads from the model root.

Writes under tests/fixtures/model-root/ (a model root: `<repo id>/<file>`, where the tests point
the engine's model_root):
  lllyasviel/Annotators/ControlNetHED.pth   controlnet_aux's ControlNetHED_Apache2, narrowed
                                            (widths 4, 8, 8, 12, 12; 2, 2, 3, 3, 3 convolutions)
  lllyasviel/Annotators/sk_model.pth        controlnet_aux's lineart Generator, narrowed (base
  lllyasviel/Annotators/sk_model2.pth       width 4, 3 residual blocks), fine and coarse
  ai-forever/Real-ESRGAN/RealESRGAN_x2.pth  a ×2 RRDBNet in BasicSR's names (4 features, 1 block,
                                            growth 32 as spandrel builds it), float16 tensors
                                            saved under `params_ema` as BasicSR does
and tests/fixtures/processors/goldens.safetensors: inputs and outputs, below.

The .pth files are torch.save()'d state dicts (zip format), the form the real files have, so the
tests go through sdstream's PyTorch reader.

Goldens (uint8 images are stored as U8 [H, W, 3]; float outputs as F32 [1, 3, H, W]):
  input_<n>                   the test images (examples/frames/000.png and 003.png shrunk with PIL
                              bilinear to 64x64 and 96x64)
  hed_<n>                     Daydream's HEDPreprocessor on input_<n>: controlnet_aux's
                              HEDdetector(image, output_type="pil") with its defaults (detect and
                              image resolution 512), then PIL LANCZOS back to the image's size
  lineart_<coarse|fine>_<d>_<n>
                              Daydream's LineartPreprocessor (tensor path): PIL LANCZOS to d x d,
                              LineartDetector(detect_resolution=d, image_resolution=d, coarse),
                              then torch bilinear (align_corners=False) to the image's size, F32
  std_lineart_<case>_<n>      Daydream's StandardLineartPreprocessor rendered in torch float32
                              (see standard_lineart() below), then bilinear to the image's size
  realesrgan_in_<k>, realesrgan_out_<k>
                              spandrel's model of the .pth on a [1, 3, h, w] input, clamped to
                              [0, 1] as Daydream's RealESRGANProcessor does
  depth_<d>_<n>               Daydream's DepthAnythingTensorrtPreprocessor's tensor path with the
                              tiny Depth Anything (transformers): bilinear to d x d, the network
                              without normalisation, min-max, three channels, bilinear back, F32
  pose_<n>                    Daydream's OpenPosePreprocessor with the tiny body network: PIL
                              LANCZOS to 512 x 512, controlnet_aux's OpenposeDetector, then
                              bilinear to the image's size (tensor path), F32
  pose_maps_heatmaps, pose_maps_pafs
                              synthetic network outputs [1, 19 | 38, 23, 23] (two people, drawn
                              as make_openpose_fixtures.render draws them) for a 512 x 512 image
  pose_maps_input             the uint8 [184, 184, 3] BGR image controlnet_aux's Body feeds the
                              network for examples/frames/001.png (pixel / 256 - 0.5 of it)
and tests/fixtures/processors/pose_maps_canvas.png: the skeleton controlnet_aux draws (RGB,
512 x 512) when its network returns the pose_maps outputs: every step of Body.__call__ after the
network (Lanczos-4 resizes, cropping, decoding) and the drawing.
  temporal_<format>_<n>       Daydream's TemporalNetTensorRTPreprocessor on input_<n> after
                              temporal_prev_<n> (input_<n> shifted 3 pixels right and 2 down):
                              bilinear to 256 x 256, [-1, 1], the tiny RAFT's first flow
                              (torchvision), flow_to_image (correctly rounded, as
                              make_raft_fixtures.flow_to_image_exact), / 255, bilinear back;
                              concat = previous frame then flow (6 channels), F32

Run: python tests/reference/make_processor_fixtures.py  (about half a minute; deterministic).
"""

from __future__ import annotations

import pathlib

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from controlnet_aux.hed import ControlNetHED_Apache2, DoubleConvBlock, HEDdetector  # noqa: E402
from controlnet_aux.lineart import Generator, LineartDetector, ResidualBlock  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL_ROOT = ROOT / "tests/fixtures/model-root"
OUT = ROOT / "tests/fixtures/processors"
ANNOTATORS = MODEL_ROOT / "lllyasviel/Annotators"
ESRGAN = MODEL_ROOT / "ai-forever/Real-ESRGAN"
DEPTH = MODEL_ROOT / "depth-anything/Depth-Anything-V2-Small-hf"
RAFT = MODEL_ROOT / "torchvision/raft_small/raft_small_C_T_V2-01064c6d.safetensors"

torch.set_num_threads(1)


def inputs():
    images = {}
    for name, path, size in [
        ("sq", "000.png", (64, 64)),
        ("wide", "003.png", (96, 64)),
    ]:
        img = Image.open(ROOT / "examples/frames" / path).convert("RGB").resize(size, Image.BILINEAR)
        images[name] = np.asarray(img).copy()
    return images


# ---------------------------------------------------------------- HED


def tiny_hed(seed=1):
    torch.manual_seed(seed)
    net = ControlNetHED_Apache2()
    widths, convs = [4, 8, 8, 12, 12], [2, 2, 3, 3, 3]
    c_in = 3
    for k, (w, n) in enumerate(zip(widths, convs)):
        setattr(net, f"block{k + 1}", DoubleConvBlock(input_channel=c_in, output_channel=w, layer_number=n))
        c_in = w
    # controlnet_aux's init leaves `norm` at zero; a per-channel offset as the real file has.
    with torch.no_grad():
        net.norm.copy_(torch.tensor([[[[120.0]], [[110.0]], [[100.0]]]]))
        # The default init on raw 0..255 input gives side outputs the sigmoid saturates to flat
        # 0/255 maps, or (scaled down) nearly constant ones: the first layer scaled down and
        # the projections up give maps spread over about 100..145.
        net.block1.convs[0].weight.mul_(0.01)
        for k in range(1, 6):
            getattr(net, f"block{k}").projection.weight.mul_(30.0)
    return net.float().eval()


def hed_daydream(detector, image):
    """Daydream's HEDPreprocessor._process_core on an RGB uint8 image."""
    h, w = image.shape[:2]
    result = detector(Image.fromarray(image), output_type="pil")
    if result.size != (w, h):
        result = result.resize((w, h), Image.LANCZOS)
    return np.asarray(result).copy()


# ---------------------------------------------------------------- lineart


def tiny_generator(seed):
    torch.manual_seed(seed)
    g = Generator(3, 1, 3)
    base, norm = 4, torch.nn.InstanceNorm2d
    g.model0 = torch.nn.Sequential(
        torch.nn.ReflectionPad2d(3), torch.nn.Conv2d(3, base, 7), norm(base), torch.nn.ReLU(inplace=True)
    )
    g.model1 = torch.nn.Sequential(
        torch.nn.Conv2d(base, 2 * base, 3, stride=2, padding=1), norm(2 * base), torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(2 * base, 4 * base, 3, stride=2, padding=1), norm(4 * base), torch.nn.ReLU(inplace=True),
    )
    g.model2 = torch.nn.Sequential(*[ResidualBlock(4 * base) for _ in range(3)])
    g.model3 = torch.nn.Sequential(
        torch.nn.ConvTranspose2d(4 * base, 2 * base, 3, stride=2, padding=1, output_padding=1),
        norm(2 * base), torch.nn.ReLU(inplace=True),
        torch.nn.ConvTranspose2d(2 * base, base, 3, stride=2, padding=1, output_padding=1),
        norm(base), torch.nn.ReLU(inplace=True),
    )
    g.model4 = torch.nn.Sequential(torch.nn.ReflectionPad2d(3), torch.nn.Conv2d(base, 1, 7), torch.nn.Sigmoid())
    return g.float().eval()


def lineart_daydream(detector, image, detect, coarse):
    """Daydream's LineartPreprocessor on its tensor path: PIL in, bilinear out, float32 [0, 1]."""
    h, w = image.shape[:2]
    pil = Image.fromarray(image)
    if pil.size != (detect, detect):
        pil = pil.resize((detect, detect), Image.LANCZOS)
    result = detector(pil, detect_resolution=detect, image_resolution=detect, coarse=coarse)
    t = torch.from_numpy(np.asarray(result).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    if t.shape[-2:] != (h, w):
        t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
    return t.contiguous()


# ---------------------------------------------------------------- standard_lineart


def standard_lineart(image, detect=512, sigma=6.0, threshold=8):
    """Daydream's StandardLineartPreprocessor (its torch port of controlnet_aux's
    lineart_standard), float32, as its processor code computes it; returns the 8-bit map."""
    x = torch.from_numpy(image).float()  # H, W, 3 in 0..255
    h, w = x.shape[:2]
    k = float(detect) / float(min(h, w))
    th = int(torch.round(torch.tensor(float(h) * k)))
    tw = int(torch.round(torch.tensor(float(w) * k)))
    mode = "bicubic" if k > 1 else "area"
    x = F.interpolate(x.permute(2, 0, 1)[None], size=(th, tw), mode=mode,
                      align_corners=False if mode == "bicubic" else None)[0]
    ph = int(np.ceil(th / 64.0) * 64 - th)
    pw = int(np.ceil(tw / 64.0) * 64 - tw)
    x = F.pad(x, (0, pw, 0, ph), mode="replicate")  # 3, H', W'
    size = int(2 * torch.ceil(torch.tensor(3 * sigma)) + 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    d = torch.sqrt(xs * xs + ys * ys)
    g = torch.exp(-(d * d) / (2.0 * sigma * sigma))
    g = g / g.sum()
    kernel = g.repeat(3, 1, 1).unsqueeze(1)
    pad = size // 2
    blurred = F.conv2d(F.pad(x[None], (pad, pad, pad, pad), "reflect"), kernel, groups=3)[0]
    intensity = torch.clamp(torch.min(blurred - x, dim=0)[0], 0, 255)
    above = intensity > threshold
    norm = max(16, float(torch.median(intensity[above]))) if bool(above.any()) else 16
    out = torch.clamp(intensity / norm * 127, 0, 255).byte()[:th, :tw]
    return out.numpy()


def std_lineart_daydream(image, **kw):
    h, w = image.shape[:2]
    lines = standard_lineart(image, **kw)
    t = torch.from_numpy(np.repeat(lines[..., None], 3, axis=2).astype(np.float32) / 255.0)
    t = t.permute(2, 0, 1)[None]
    if t.shape[-2:] != (h, w):
        t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
    return t.contiguous()


# ---------------------------------------------------------------- Real-ESRGAN


def tiny_esrgan_state(seed=4, feat=4, blocks=1, grow=32):
    g = torch.Generator().manual_seed(seed)

    def conv(c_out, c_in, gain=0.1):
        std = gain * (2.0 / (c_in * 9)) ** 0.5
        return torch.randn(c_out, c_in, 3, 3, generator=g) * std, torch.randn(c_out, generator=g) * 0.01

    sd = {}

    def put(name, c_out, c_in, gain=1.0):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = conv(c_out, c_in, gain)

    put("conv_first", feat, 12)
    for b in range(blocks):
        for r in range(1, 4):
            for j in range(1, 6):
                c_in = feat + (j - 1) * grow
                c_out = feat if j == 5 else grow
                put(f"body.{b}.rdb{r}.conv{j}", c_out, c_in, gain=0.3)
    put("conv_body", feat, feat)
    put("conv_up1", feat, feat)
    put("conv_up2", feat, feat)
    put("conv_hr", feat, feat)
    put("conv_last", 3, feat, gain=0.1)
    # Centre the output near mid-grey so the clamp to [0, 1] cuts little.
    sd["conv_last.bias"] += 0.5
    return sd


# ---------------------------------------------------------------- depth


def depth_daydream(model, image, detect):
    """DepthAnythingTensorrtPreprocessor._process_tensor_core on a [1, 3, h, w] image in [0, 1]."""
    h, w = image.shape[-2:]
    x = F.interpolate(image, size=(detect, detect), mode="bilinear", align_corners=False)
    with torch.no_grad():
        depth = model(pixel_values=x).predicted_depth.squeeze()
    depth = (depth - depth.min()) / (depth.max() - depth.min())
    out = depth.repeat(3, 1, 1).unsqueeze(0)
    return F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False).contiguous()


# ---------------------------------------------------------------- pose


def tiny_body():
    """The narrow body network of make_openpose_fixtures, loaded from the model root."""
    import make_openpose_fixtures as mo
    from controlnet_aux.open_pose import util
    from safetensors.torch import load_file

    model = mo.narrow_model()
    model.load_state_dict(util.transfer(model, load_file(str(ANNOTATORS / "body_pose_model.safetensors"))))
    return model.float().eval()


def detector_with(model):
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.body import Body

    body = Body.__new__(Body)
    body.model = model
    return OpenposeDetector(body)


def pose_daydream(detector, image, detect=512):
    """OpenPosePreprocessor._process_core, then the tensor path's bilinear resize."""
    h, w = image.shape[:2]
    pil = Image.fromarray(image).resize((detect, detect), Image.LANCZOS)
    result = detector(pil, hand_and_face=False)
    t = torch.from_numpy(np.asarray(result).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    if t.shape[-2:] != (h, w):
        t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)
    return t.contiguous()


class GivenMaps(torch.nn.Module):
    """A stand-in body network: records its input and returns given (PAFs, heatmaps)."""

    def __init__(self, pafs, heatmaps):
        super().__init__()
        self.pafs, self.heatmaps, self.seen = pafs, heatmaps, None
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.seen = x.clone()
        return self.pafs, self.heatmaps


def pose_from_maps():
    """controlnet_aux's whole pose pipeline for examples/frames/001.png with given network
    outputs: two people rendered at 1/8 of 184 x 184 (the network input of a 512 image)."""
    import make_openpose_fixtures as mo

    rng = np.random.default_rng(77)
    people = [mo.person(rng, 170.0, 90.0, 330.0), mo.person(rng, 360.0, 120.0, 300.0, missing=(16,))]
    # render() draws network-like maps at 1/8 of the size it is given, in that size's pixels:
    # people placed in the 184 x 184 input's frame, scaled from the 512 image (x 0.359375).
    scaled = [{part: (x * 0.359375, y * 0.359375, amp) for part, (x, y, amp) in p.items()} for p in people]
    heat, paf = mo.render(rng, 184, 184, scaled)
    return people, heat, paf


# ---------------------------------------------------------------- temporal net


def tiny_raft():
    import make_raft_fixtures as mr
    from safetensors.torch import load_file
    from torchvision.models.optical_flow.raft import _raft

    model = _raft(weights=None, progress=False, **mr.NARROW).eval()
    model.load_state_dict(load_file(str(RAFT)))
    return model


def temporal_daydream(raft, previous, current, concat, size=256):
    """TemporalNetTensorRTPreprocessor._process_tensor_core for a second frame (CHW in [0, 1])."""
    import make_raft_fixtures as mr

    h, w = current.shape[-2:]
    a = F.interpolate(previous[None], size=(size, size), mode="bilinear", align_corners=False)
    b = F.interpolate(current[None], size=(size, size), mode="bilinear", align_corners=False)
    a, b = (a - 0.5) / 0.5, (b - 0.5) / 0.5
    with torch.no_grad():
        flow = raft(a, b, num_flow_updates=1)[0][0]
    rgb = mr.flow_to_image_exact(flow).float() / 255.0
    rgb = F.interpolate(rgb[None], size=(h, w), mode="bilinear", align_corners=False)[0]
    out = torch.cat([previous, rgb]) if concat else rgb
    return out[None].contiguous()


def main():
    ANNOTATORS.mkdir(parents=True, exist_ok=True)
    ESRGAN.mkdir(parents=True, exist_ok=True)
    goldens = {}
    images = inputs()
    for name, img in images.items():
        goldens[f"input_{name}"] = torch.from_numpy(img)

    hed = tiny_hed()
    torch.save(hed.state_dict(), ANNOTATORS / "ControlNetHED.pth")
    detector = HEDdetector(hed)
    for name, img in images.items():
        goldens[f"hed_{name}"] = torch.from_numpy(hed_daydream(detector, img))

    fine, coarse = tiny_generator(2), tiny_generator(3)
    torch.save(fine.state_dict(), ANNOTATORS / "sk_model.pth")
    torch.save(coarse.state_dict(), ANNOTATORS / "sk_model2.pth")
    lineart = LineartDetector(fine, coarse)
    with torch.no_grad():
        for name, detect, is_coarse in [("sq", 512, True), ("wide", 128, True), ("sq", 128, False), ("wide", 512, False)]:
            kind = "coarse" if is_coarse else "fine"
            goldens[f"lineart_{kind}_{detect}_{name}"] = lineart_daydream(lineart, images[name], detect, is_coarse)

    for name, img in images.items():
        goldens[f"std_lineart_default_{name}"] = std_lineart_daydream(img)
        goldens[f"std_lineart_small_{name}"] = std_lineart_daydream(img, detect=48, sigma=2.5, threshold=20)

    import spandrel

    state = {k: v.half() for k, v in tiny_esrgan_state().items()}
    torch.save({"params_ema": state}, ESRGAN / "RealESRGAN_x2.pth")
    # The reference computes in float32 with the stored (float16-rounded) weights.
    state = {k: v.float() for k, v in state.items()}
    model = spandrel.ModelLoader().load_from_state_dict(state).model.float().eval()
    g = torch.Generator().manual_seed(5)
    for k, (h, w) in enumerate([(32, 32), (22, 30)]):
        x = torch.rand(1, 3, h, w, generator=g)
        with torch.no_grad():
            y = model(x).clamp(0, 1)
        goldens[f"realesrgan_in_{k}"] = x
        goldens[f"realesrgan_out_{k}"] = y.contiguous()

    from transformers import DepthAnythingForDepthEstimation

    depth_model = DepthAnythingForDepthEstimation.from_pretrained(DEPTH).float().eval()
    for name, detect in [("sq", 518), ("wide", 518), ("sq", 140)]:
        x = torch.from_numpy(images[name]).permute(2, 0, 1)[None].float() / 255.0
        goldens[f"depth_{detect}_{name}"] = depth_daydream(depth_model, x, detect)

    detector = detector_with(tiny_body())
    for name, img in images.items():
        goldens[f"pose_{name}"] = pose_daydream(detector, img)
    _, heat, paf = pose_from_maps()
    stand_in = GivenMaps(torch.from_numpy(paf)[None], torch.from_numpy(heat)[None])
    frame = np.asarray(Image.open(ROOT / "examples/frames/001.png").convert("RGB")).copy()
    canvas = np.asarray(detector_with(stand_in)(frame, output_type="np"))
    seen = stand_in.seen[0].permute(1, 2, 0).numpy()
    levels = np.rint((seen + 0.5) * 256.0)
    assert np.array_equal((levels / 256 - 0.5).astype(np.float32), seen), "input not from bytes"
    goldens["pose_maps_heatmaps"] = torch.from_numpy(heat)[None]
    goldens["pose_maps_pafs"] = torch.from_numpy(paf)[None]
    goldens["pose_maps_input"] = torch.from_numpy(levels.astype(np.uint8))
    OUT.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(OUT / "pose_maps_canvas.png", optimize=False, compress_level=9)
    print("pose from maps: canvas levels", np.unique(canvas).size, "non-black", (canvas.max(axis=2) > 0).mean())

    raft = tiny_raft()
    for name, img in images.items():
        current = torch.from_numpy(img).permute(2, 0, 1).float() / 255.0
        shifted = np.roll(np.roll(img, 2, axis=0), 3, axis=1)
        previous = torch.from_numpy(shifted).permute(2, 0, 1).float() / 255.0
        goldens[f"temporal_prev_{name}"] = torch.from_numpy(shifted.copy())
        goldens[f"temporal_concat_{name}"] = temporal_daydream(raft, previous, current, True)
        goldens[f"temporal_flow_{name}"] = temporal_daydream(raft, previous, current, False)

    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in goldens.items()}, str(OUT / "goldens.safetensors"))
    for path in sorted(list(OUT.rglob("*")) + [ANNOTATORS / f for f in ("ControlNetHED.pth", "sk_model.pth", "sk_model2.pth")] + [ESRGAN / "RealESRGAN_x2.pth"]):
        if path.is_file():
            print(path.relative_to(ROOT), path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
