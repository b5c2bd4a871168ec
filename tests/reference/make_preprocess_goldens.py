"""Golden outputs for the image processors (core/src/preprocess), tested by core/tests/integration/preprocess.rs.

Writes tests/fixtures/preprocess/:
  inputs/<name>.png          RGB8 test images: the six examples/frames shrunk to 128x128 and
                             synthetic patterns (sharp and soft edges, thin lines at many angles,
                             noise, low-contrast steps whose gradients land on the thresholds).
  canny/<name>.png           cv2.Canny(cv2.cvtColor(img, RGB2GRAY), lo, hi) (aperture 3, L1) for
                             each threshold pair in CANNY_THRESHOLDS, stacked top to bottom, 0/255.
  filters.safetensors        float goldens on 32x32 / 48x48 inputs (stored as uint8 inside):
                             soft_edge, blur, sharpen, feedback, upscale, computed in float64 with
                             torch the way Daydream's processors compute them (zero-padded conv2d).

Run: python tests/reference/make_preprocess_goldens.py  (a few seconds; the output
is deterministic).
"""

import math
import pathlib

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests/fixtures/preprocess"
CANNY_THRESHOLDS = [(100, 200), (50, 150), (20, 60), (80, 80)]


# ---------------------------------------------------------------- inputs


def synthetic(seed=0):
    rng = np.random.default_rng(seed)
    n = 96
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    images = {}

    # Checkerboard of coloured blocks plus Gaussian noise.
    blocks = ((xx // 12 + yy // 12) % 2)[..., None] * np.array([180.0, 60.0, 220.0]) + 30
    images["checker_noise"] = blocks + rng.normal(0, 18, (n, n, 3))

    # A soft disc (blurred boundary) beside a sharp square, on a gradient.
    r = np.hypot(xx - 34, yy - 40)
    disc = 1 / (1 + np.exp((r - 22) / 2.5))
    square = ((xx > 58) & (xx < 86) & (yy > 20) & (yy < 76)).astype(np.float64)
    base = 40 + 0.8 * xx
    img = base[..., None] + disc[..., None] * np.array([150.0, 90.0, 20.0])
    img = img + square[..., None] * np.array([-30.0, 120.0, 90.0])
    images["soft_disc_square"] = img

    # Thin lines through the centre at many angles (every NMS sector) with mild noise.
    img = np.full((n, n), 200.0)
    for k in range(12):
        a = k * math.pi / 12
        d = np.abs((xx - n / 2) * math.sin(a) - (yy - n / 2) * math.cos(a))
        img -= 150 * np.clip(1.2 - d, 0, 1) * (np.hypot(xx - n / 2, yy - n / 2) > 8)
    img = np.clip(img, 0, 255)[..., None].repeat(3, axis=2) + rng.normal(0, 4, (n, n, 3))
    images["lines"] = img

    # Uniform noise: many ties and every gradient direction.
    images["noise"] = rng.integers(0, 256, (64, 64, 3)).astype(np.float64)

    # Steps of growing contrast, horizontal and vertical, so gradients sit on and around the
    # thresholds (L1 magnitude of a grey step of height d is 4d).
    profile = np.zeros(n)
    for i, d in enumerate([10, 12, 13, 15, 20, 25, 37, 38, 50, 51]):
        profile[i * 9 + 4 :] += d if i % 2 == 0 else -d / 2
    profile = profile - profile.min() + 10
    img = np.empty((n, n))
    img[:48] = profile[None, :]  # vertical edges
    img[48:] = profile[::2][:48, None] + 5  # horizontal edges
    images["steps"] = img[..., None].repeat(3, axis=2)

    return {k: np.clip(np.rint(v), 0, 255).astype(np.uint8) for k, v in images.items()}


def inputs():
    images = {}
    for path in sorted((ROOT / "examples/frames").glob("*.png")):
        img = Image.open(path).convert("RGB").resize((128, 128), Image.BILINEAR)
        images[f"frame_{path.stem}"] = np.asarray(img)
    images.update(synthetic())
    return images


# ---------------------------------------------------------------- float processors (Daydream's math)


def conv(x, k):
    """Zero-padded per-channel cross-correlation of [1, C, H, W] with a 2-D kernel (torch conv2d)."""
    c = x.shape[1]
    k = k.to(x.dtype)
    return F.conv2d(x, k.expand(c, 1, *k.shape).contiguous(), padding=k.shape[-1] // 2, groups=c)


def gaussian_kernel(size, sigma):
    c = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    g = torch.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    return g / g.sum()


def soft_edge(x):
    gray = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
    s3 = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    s5 = torch.tensor(
        [[-1, -2, 0, 2, 1], [-2, -3, 0, 3, 2], [-3, -5, 0, 5, 3], [-2, -3, 0, 3, 2], [-1, -2, 0, 2, 1]],
        dtype=torch.float64,
    ) / 16
    s7 = torch.tensor(
        [
            [-1, -2, -3, 0, 3, 2, 1],
            [-2, -3, -4, 0, 4, 3, 2],
            [-3, -4, -5, 0, 5, 4, 3],
            [-4, -5, -6, 0, 6, 5, 4],
            [-3, -4, -5, 0, 5, 4, 3],
            [-2, -3, -4, 0, 4, 3, 2],
            [-1, -2, -3, 0, 3, 2, 1],
        ],
        dtype=torch.float64,
    ) / 32
    mags = []
    for k in (s3, s5, s7):
        mags.append(torch.sqrt(conv(gray, k) ** 2 + conv(gray, k.T) ** 2))
    combined = 0.5 * mags[0] + 0.3 * mags[1] + 0.2 * mags[2]
    b = torch.tensor([1.0, 4, 6, 4, 1], dtype=torch.float64)
    soft = conv(combined, torch.outer(b, b) / 256)
    soft = soft / (soft.max() + 1e-8)
    return torch.sigmoid(soft * 6 - 3).clamp(0, 1)


def blur(x, blur_intensity=2.0, kernel_size=15):
    if kernel_size % 2 == 0:
        kernel_size += 1
    return conv(x, gaussian_kernel(kernel_size, blur_intensity))


def sharpen(
    x,
    sharpen_intensity=1.5,
    unsharp_radius=1.0,
    edge_enhancement=0.5,
    detail_boost=0.3,
    noise_reduction=0.1,
    multi_scale=True,
):
    def gblur(img, sigma):
        size = max(3, int(6 * sigma + 1))
        if size % 2 == 0:
            size += 1
        return conv(img, gaussian_kernel(size, sigma))

    def unsharp(img, radius, amount):
        return (img + amount * (img - gblur(img, radius))).clamp(0, 1)

    r = x.clone()
    if noise_reduction > 0:
        r = (1 - noise_reduction) * r + noise_reduction * gblur(r, 0.3)
    if multi_scale:
        acc = r.clone()
        for scale, weight in zip([0.5, 1.0, 2.0], [0.3, 0.5, 0.2]):
            acc = acc + weight * (unsharp(r, unsharp_radius * scale, sharpen_intensity * weight) - r)
        r = acc.clamp(0, 1)
    else:
        r = unsharp(r, unsharp_radius, sharpen_intensity)
    if edge_enhancement > 0:
        sx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
        r = (r + edge_enhancement * torch.sqrt(conv(r, sx) ** 2 + conv(r, sx.T) ** 2)).clamp(0, 1)
    if detail_boost > 0:
        lap = torch.tensor([[0.0, -1, 0], [-1, 4, -1], [0, -1, 0]])
        r = (r + detail_boost * conv(r, lap)).clamp(0, 1)
    return r.clamp(0, 1)


def upscale(x, scale_factor=2.0, algorithm="bilinear"):
    """Daydream's tensor path resizes to int(size * scale_factor) (lanczos falls back to bicubic);
    sdstream then resamples back to the stream size with bilinear (align_corners False)."""
    h, w = x.shape[-2:]
    size = (int(h * scale_factor), int(w * scale_factor))
    mode = {"bilinear": "bilinear", "lanczos": "bicubic", "bicubic": "bicubic", "nearest": "nearest"}[algorithm]
    if mode == "nearest":
        # Source indices as torch computes them for float32 images (a float32 scale).
        up = F.interpolate(x.float(), size=size, mode="nearest").double()
    else:
        up = F.interpolate(x, size=size, mode=mode, align_corners=False)
    return F.interpolate(up, size=(h, w), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------- main


def to_tensor(img_u8):
    return torch.from_numpy(img_u8.astype(np.float64) / 255).permute(2, 0, 1)[None]


def main():
    torch.set_num_threads(1)
    (OUT / "inputs").mkdir(parents=True, exist_ok=True)
    (OUT / "canny").mkdir(parents=True, exist_ok=True)

    # cvtColor(RGB2GRAY) on uint8 is fixed point: (9798 R + 19235 G + 3735 B + 2^14) >> 15.
    probe = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    p = probe.astype(np.int64)
    assert np.array_equal(
        cv2.cvtColor(probe, cv2.COLOR_RGB2GRAY),
        (9798 * p[..., 0] + 19235 * p[..., 1] + 3735 * p[..., 2] + (1 << 14)) >> 15,
    )

    images = inputs()
    for name, img in images.items():
        Image.fromarray(img).save(OUT / "inputs" / f"{name}.png", optimize=True)
        gray = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        stack = [cv2.Canny(gray, lo, hi) for lo, hi in CANNY_THRESHOLDS]
        Image.fromarray(np.concatenate(stack, axis=0)).save(OUT / "canny" / f"{name}.png", optimize=True)
    (OUT / "canny/thresholds.txt").write_text("".join(f"{lo} {hi}\n" for lo, hi in CANNY_THRESHOLDS))

    # Float goldens on small crops.
    def crop(name, size, y0=0, x0=0):
        return np.ascontiguousarray(images[name][y0 : y0 + size, x0 : x0 + size])

    a = crop("frame_000", 48, 40, 40)
    b = crop("soft_disc_square", 48, 10, 30)
    c = crop("checker_noise", 32, 5, 5)
    d = crop("frame_003", 32, 64, 64)
    t = {"input_a": a, "input_b": b, "input_c": c, "input_d": d}
    goldens = {}
    goldens["soft_edge_a"] = soft_edge(to_tensor(a))
    goldens["soft_edge_b"] = soft_edge(to_tensor(b))
    blur_cases = {"default": {}, "k4_s0.8": dict(blur_intensity=0.8, kernel_size=4), "k31_s5": dict(blur_intensity=5.0, kernel_size=31)}
    for tag, kw in blur_cases.items():
        goldens[f"blur_{tag}"] = blur(to_tensor(c), **kw)
    sharpen_cases = {
        "default": {},
        "single": dict(multi_scale=False, sharpen_intensity=3.0, unsharp_radius=2.0, edge_enhancement=0.0, detail_boost=1.0, noise_reduction=0.0),
        "strong": dict(noise_reduction=0.5, edge_enhancement=2.0, detail_boost=0.0, unsharp_radius=0.4),
    }
    for tag, kw in sharpen_cases.items():
        goldens[f"sharpen_{tag}"] = sharpen(to_tensor(c), **kw)
    k = 0.3
    goldens["feedback_0.3"] = (1 - k) * to_tensor(c) + k * to_tensor(d)
    upscale_cases = {"default": {}, "bicubic_1.5": dict(scale_factor=1.5, algorithm="bicubic"), "nearest_3": dict(scale_factor=3.0, algorithm="nearest"), "lanczos_2.5": dict(scale_factor=2.5, algorithm="lanczos")}
    for tag, kw in upscale_cases.items():
        goldens[f"upscale_{tag}"] = upscale(to_tensor(d), **kw)

    tensors = {k: torch.from_numpy(v).contiguous() for k, v in t.items()}
    tensors.update({k: v.float().contiguous() for k, v in goldens.items()})
    save_file(tensors, str(OUT / "filters.safetensors"))
    print("wrote", OUT, "with", len(images), "canny inputs and", len(goldens), "float goldens")


if __name__ == "__main__":
    main()
