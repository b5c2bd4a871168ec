"""Golden vectors for sdstream's frame conversions (core/src/frame.rs).

Writes into tests/fixtures/frame/:
* resize.json + resize_<name>.bin: PIL `Image.resize((w, h), Image.LANCZOS)` of RGB u8 images made by
  a tiny xorshift32 generator that the Rust test reimplements (so the inputs need not be stored).
  Small outputs are stored whole; the large one as every 64th row plus exact byte checksums.
* preprocess.bin: diffusers `VaeImageProcessor().preprocess(pil, h, w)` (what StreamDiffusion runs on
  its input frame) of one image, float32 [1, 3, h, w] in [-1, 1].
* resize_float.bin: PIL's float-mode ("F") Lanczos resize of each channel of an image in [0, 1].
* postprocess.bin: float32 values in [0, 1] and the uint8 that StreamDiffusion's numpy_to_pil makes of
  them (`(x * 255).round().astype("uint8")`).

Run: python tests/reference/make_frame_golden.py
"""

import json
import os

import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "frame")


def xorshift_bytes(seed: int, n: int) -> np.ndarray:
    """xorshift32 (13, 17, 5); each output byte is the top byte of the state after one step."""
    x = seed & 0xFFFFFFFF
    out = np.empty(n, dtype=np.uint8)
    for i in range(n):
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        out[i] = x >> 24
    return out


def make_image(kind: str, seed: int, w: int, h: int) -> np.ndarray:
    """'noise': uniform random bytes; 'smooth': gradients plus +-16 of noise, clamped."""
    noise = xorshift_bytes(seed, w * h * 3).reshape(h, w, 3).astype(np.int32)
    if kind == "noise":
        return noise.astype(np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255) // max(w - 1, 1), (yy * 255) // max(h - 1, 1), ((xx + yy) * 4) % 256], -1)
    return np.clip(base + (noise >> 3) - 16, 0, 255).astype(np.uint8)


CASES = [
    # name, kind, seed, src w, src h, dst w, dst h, stored whole?
    ("down2", "noise", 1, 48, 36, 24, 18, True),
    ("down_odd", "noise", 2, 120, 90, 64, 64, True),
    ("up", "noise", 3, 33, 47, 64, 80, True),
    ("vertical_only", "smooth", 4, 40, 30, 40, 64, True),
    ("horizontal_only", "smooth", 5, 50, 20, 31, 20, True),
    ("mixed", "smooth", 6, 17, 23, 13, 37, True),
    ("webcam", "smooth", 7, 640, 480, 512, 512, False),
]
ROW_STEP = 64


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    index = []
    for name, kind, seed, sw, sh, dw, dh, whole in CASES:
        src = make_image(kind, seed, sw, sh)
        dst = np.asarray(PIL.Image.fromarray(src, "RGB").resize((dw, dh), PIL.Image.LANCZOS))
        entry = {"name": name, "kind": kind, "seed": seed, "src": [sw, sh], "dst": [dw, dh],
                 "byte_sum": int(dst.astype(np.uint64).sum()),
                 "square_sum": int((dst.astype(np.uint64) ** 2).sum())}
        if whole:
            stored = dst
        else:
            stored = dst[::ROW_STEP]
            entry["row_step"] = ROW_STEP
        stored.tofile(os.path.join(OUT, f"resize_{name}.bin"))
        index.append(entry)

    # StreamDiffusion's input path: PIL RGB -> VaeImageProcessor.preprocess -> [1, 3, h, w] in [-1, 1].
    src = make_image("smooth", 8, 40, 30)
    pre = VaeImageProcessor(vae_scale_factor=8).preprocess(PIL.Image.fromarray(src, "RGB"), 24, 32)
    assert pre.dtype == torch.float32 and tuple(pre.shape) == (1, 3, 24, 32), pre.shape
    pre.numpy().tofile(os.path.join(OUT, "preprocess.bin"))
    preprocess = {"kind": "smooth", "seed": 8, "src": [40, 30], "dst": [32, 24]}

    # StreamDiffusion's output path: [0, 1] float32 -> (x * 255).round() -> uint8 (ties to even).
    rng = np.random.default_rng(0)
    values = np.concatenate([
        rng.random(1000, dtype=np.float32),
        (np.arange(255, dtype=np.float32) + np.float32(0.5)) / np.float32(255),  # near-ties
        np.array([0.0, 1.0, 0.5, 0.25, 0.75, 1 / 510, 3 / 510], dtype=np.float32),
    ]).astype(np.float32)
    quantised = (values * 255).round().astype("uint8")
    with open(os.path.join(OUT, "postprocess.bin"), "wb") as f:
        f.write(values.tobytes())
        f.write(quantised.tobytes())
    post = {"count": int(values.size)}

    # Float frames: PIL's float ("F") resize of each channel of an image in [0, 1].
    src = make_image("smooth", 11, 37, 29).astype(np.float32) / np.float32(255)
    channels = [np.asarray(PIL.Image.fromarray(src[..., c], "F").resize((64, 20), PIL.Image.LANCZOS))
                for c in range(3)]
    np.stack(channels, -1).astype(np.float32).tofile(os.path.join(OUT, "resize_float.bin"))
    resize_float = {"kind": "smooth", "seed": 11, "src": [37, 29], "dst": [64, 20]}

    with open(os.path.join(OUT, "frame_golden.json"), "w") as f:
        json.dump({"pillow": PIL.__version__, "resize": index, "preprocess": preprocess,
                   "postprocess": post, "resize_float": resize_float}, f, indent=1)
        f.write("\n")
    print("wrote", sorted(os.listdir(OUT)))


if __name__ == "__main__":
    main()
