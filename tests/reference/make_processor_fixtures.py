"""Tiny random-weight annotator networks and golden outputs for sdstream's model-based image
processors that use controlnet_aux's networks (HED, lineart), for standard_lineart (no network)
and for Real-ESRGAN (spandrel), tested by core/tests/processors.rs.

Writes tests/fixtures/processors/:
  lllyasviel/Annotators/ControlNetHED.pth   controlnet_aux's ControlNetHED_Apache2, narrowed
                                            (widths 4, 8, 8, 12, 12; 2, 2, 3, 3, 3 convolutions)
  lllyasviel/Annotators/sk_model.pth        controlnet_aux's lineart Generator, narrowed (base
  lllyasviel/Annotators/sk_model2.pth       width 4, 3 residual blocks), fine and coarse
  ai-forever/Real-ESRGAN/RealESRGAN_x2.pth  a ×2 RRDBNet in BasicSR's names (4 features, 1 block,
                                            growth 32 as spandrel builds it), float16 tensors
                                            saved under `params_ema` as BasicSR does
  goldens.safetensors                       inputs and outputs, below

The .pth files are torch.save()'d state dicts (zip format), the form the real files have, so the
tests go through sdstream's PyTorch reader. Layout under the folder is `<repo id>/<file>`: the
tests use the folder as the engine's model_root.

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

from controlnet_aux.hed import ControlNetHED_Apache2, DoubleConvBlock, HEDdetector
from controlnet_aux.lineart import Generator, LineartDetector, ResidualBlock

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests/fixtures/processors"
ANNOTATORS = OUT / "lllyasviel/Annotators"
ESRGAN = OUT / "ai-forever/Real-ESRGAN"

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

    save_file({k: v.contiguous() for k, v in goldens.items()}, str(OUT / "goldens.safetensors"))
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            print(path.relative_to(ROOT), path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
