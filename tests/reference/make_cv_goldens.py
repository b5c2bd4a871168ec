"""Golden data for sdstream's OpenCV-exact resize and drawing (core/src/preprocess/cv_resize.rs,
core/src/preprocess/cv_draw.rs).

Writes, under tests/fixtures/preprocess/cv/ (next to this repository's tests/reference/):

* resize.json -- one entry per cv2.resize case: dtype (u8/f32), interpolation, sizes, how the
  input is generated (see `make_input`: a SplitMix64 stream or an integer triangle-wave pattern,
  so the Rust test regenerates it bit for bit), and the FNV-1a 64 digest and sum of cv2's output.
* resize.safetensors -- cv2's full output for the small cases (key = case name) and, for every
  f32 case, every `sample_stride`-th output value (key = name + ".sample").
* draw.json -- drawing cases on a 96x128x3 canvas with their expected result as runs of painted
  pixels: cv2.ellipse2Poly + cv2.fillConvexPoly (random ellipses, axes 0..300 x 0..10, any angle,
  centres inside, on and outside the canvas), cv2.fillConvexPoly on hulls and degenerate point
  sets, cv2.circle(thickness=-1), cv2.line (LINE_8, thickness 1..12), and a composite of
  controlnet_aux's draw_bodypose on a few random skeletons.
* ellipse_polygons.safetensors -- cv2.ellipse2Poly's points (int16 pairs, concatenated) for the
  ellipse cases that carry `points` = [offset, count].

Run from the repository root with an environment that has opencv-python-headless 5.0, numpy,
safetensors and controlnet_aux:

    $REFENV/bin/python tests/reference/make_cv_goldens.py

Everything is seeded; running it twice writes identical files. The cubic cases are made with
cv2.ipp.setUseIPP(False): the wheel's IPP cubic is not OpenCV's cubic (see cv_resize.rs).
"""

import json
import math
import os

import cv2
import numpy as np
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "fixtures", "preprocess", "cv")

MASK64 = (1 << 64) - 1
INTERP = {
    "linear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "lanczos4": cv2.INTER_LANCZOS4,
    "cubic": cv2.INTER_CUBIC,
}
CANVAS = (96, 128)
FULL_BYTES = 20_000  # outputs up to this many bytes are stored whole
SAMPLES = 1024  # about this many values are sampled from every f32 output


# ------------------------------------------------------------------------------------------------
# Inputs the Rust test can regenerate exactly.


def splitmix64(seed, n):
    """n outputs of SplitMix64 started at `seed`, as uint64."""
    out = np.empty(n, dtype=np.uint64)
    state = seed & MASK64
    for i in range(n):
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        out[i] = z ^ (z >> 31)
    return out


def make_input(dtype, kind, seed, h, w, c):
    """H x W x C input. random: u8 = top byte of each SplitMix64 output, f32 = top 24 bits / 2^24.
    smooth: t = (2x + 3y + 40c + seed) mod 510, folded to 0..255 (u8) and divided by 255 (f32)."""
    n = h * w * c
    if kind == "random":
        r = splitmix64(seed, n)
        if dtype == "u8":
            v = (r >> np.uint64(56)).astype(np.uint8)
        else:
            v = (r >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24)
        return v.reshape(h, w, c)
    y, x, ch = np.meshgrid(np.arange(h), np.arange(w), np.arange(c), indexing="ij")
    t = (2 * x + 3 * y + 40 * ch + seed) % 510
    v = np.where(t < 256, t, 510 - t).astype(np.uint8)
    if dtype == "u8":
        return v
    return v.astype(np.float32) / np.float32(255)


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & MASK64
    return h


def cv_resize(img, out_h, out_w, mode):
    src = img[..., 0] if img.shape[2] == 1 else img
    out = cv2.resize(np.ascontiguousarray(src), (out_w, out_h), interpolation=INTERP[mode])
    return out.reshape(out_h, out_w, img.shape[2])


# (dtype, mode, (h, w, c), (out_h, out_w)); each runs on a random and a smooth input.
RESIZE_CASES = [
    ("u8", "linear", (184, 184, 3), (512, 512)),
    ("u8", "linear", (512, 512, 3), (384, 384)),
    ("u8", "linear", (37, 37, 1), (64, 64)),
    ("u8", "linear", (120, 90, 3), (64, 200)),
    ("u8", "linear", (45, 61, 4), (97, 33)),
    ("u8", "linear", (64, 64, 3), (32, 32)),  # 2x down: OpenCV switches to INTER_AREA
    ("u8", "area", (512, 512, 3), (184, 184)),
    ("u8", "area", (640, 640, 3), (368, 368)),
    ("u8", "area", (100, 100, 3), (37, 37)),
    ("u8", "area", (512, 512, 3), (256, 256)),
    ("u8", "area", (90, 120, 1), (30, 30)),  # integer 3x4 blocks
    ("u8", "area", (37, 37, 3), (64, 50)),  # upscale: linear with area fractions
    ("u8", "lanczos4", (300, 300, 3), (512, 512)),
    ("u8", "lanczos4", (184, 184, 3), (512, 512)),
    ("u8", "lanczos4", (23, 31, 1), (97, 64)),
    ("u8", "cubic", (37, 53, 3), (64, 90)),
    ("u8", "linear", (50, 70, 3), (50, 70)),  # same size: a copy
    ("f32", "lanczos4", (23, 23, 1), (184, 184)),
    ("f32", "lanczos4", (184, 184, 1), (512, 512)),
    ("f32", "lanczos4", (31, 22, 3), (50, 71)),
    ("f32", "linear", (64, 64, 1), (512, 512)),
    ("f32", "linear", (512, 512, 1), (384, 384)),
    ("f32", "linear", (37, 53, 3), (64, 90)),
    ("f32", "linear", (37, 53, 2), (64, 90)),  # two channels: IPP refuses, OpenCV's own code
    ("f32", "area", (512, 512, 1), (184, 184)),
    ("f32", "area", (512, 512, 1), (256, 256)),
    ("f32", "area", (100, 100, 3), (37, 37)),
    ("f32", "area", (37, 37, 1), (64, 50)),
    ("f32", "cubic", (37, 53, 1), (64, 90)),
]


def resize_goldens():
    cases, tensors = [], {}
    seed = 1
    for dtype, mode, (h, w, c), (oh, ow) in RESIZE_CASES:
        for kind in ("random", "smooth"):
            name = f"{dtype}_{mode}_{h}x{w}x{c}_to_{oh}x{ow}_{kind}"
            img = make_input(dtype, kind, seed, h, w, c)
            cv2.ipp.setUseIPP(mode != "cubic")
            out = cv_resize(img, oh, ow, mode)
            cv2.ipp.setUseIPP(True)
            flat = out.reshape(-1)
            case = {
                "name": name,
                "dtype": dtype,
                "mode": mode,
                "height": h,
                "width": w,
                "channels": c,
                "out_height": oh,
                "out_width": ow,
                "input": kind,
                "seed": seed,
                "fnv1a64": f"{fnv1a64(flat.tobytes()):016x}",
                "sum": float(flat.astype(np.float64).sum()),
                "full": bool(flat.nbytes <= FULL_BYTES),
            }
            if case["full"]:
                tensors[name] = np.ascontiguousarray(out)
            if dtype == "f32":
                stride = max(1, flat.size // SAMPLES)
                case["sample_stride"] = stride
                tensors[name + ".sample"] = np.ascontiguousarray(flat[::stride])
            cases.append(case)
            seed += 1
    return cases, tensors


# ------------------------------------------------------------------------------------------------
# Drawing.


def runs(mask):
    """Painted runs of a boolean H x W mask: flat [y, x_first, x_last, ...] in row-major order."""
    out = []
    for y in range(mask.shape[0]):
        row = np.concatenate([[False], mask[y], [False]]).astype(np.int8)
        d = np.diff(row)
        starts = np.nonzero(d == 1)[0]
        ends = np.nonzero(d == -1)[0] - 1
        for s, e in zip(starts, ends):
            out += [y, int(s), int(e)]
    return out


def colour_runs(canvas):
    """Runs of equal non-zero colour: flat [y, x_first, x_last, c0, c1, c2, ...]."""
    out = []
    h, w, _ = canvas.shape
    for y in range(h):
        x = 0
        while x < w:
            px = canvas[y, x]
            if not px.any():
                x += 1
                continue
            e = x
            while e + 1 < w and (canvas[y, e + 1] == px).all():
                e += 1
            out += [y, x, e] + [int(v) for v in px]
            x = e + 1
    return out


def blank():
    return np.zeros(CANVAS + (3,), np.uint8)


COLOUR = (10, 200, 77)


def painted(canvas):
    return (canvas == np.array(COLOUR, np.uint8)).all(axis=2)


def ellipse_cases(rng, polys):
    h, w = CANVAS
    cases = []
    for i in range(420):
        place = rng.integers(0, 3)
        if place == 0:  # inside
            cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        elif place == 1:  # on an edge or corner
            cx = int(rng.choice([0, w - 1, w, -1, int(rng.integers(0, w))]))
            cy = int(rng.choice([0, h - 1, h, -1, int(rng.integers(0, h))]))
        else:  # outside, possibly far
            cx, cy = int(rng.integers(-400, w + 400)), int(rng.integers(-300, h + 300))
        axes = (int(rng.integers(0, 301)), int(rng.integers(0, 11)))
        angle = int(rng.integers(-720, 721))
        if i % 5 == 4:  # other arcs and steps for ellipse2Poly's own checks
            arc = (int(rng.integers(-400, 400)), int(rng.integers(-400, 400)))
            delta = int(rng.integers(1, 46))
        else:
            arc, delta = (0, 360), 1
        pts = cv2.ellipse2Poly((cx, cy), axes, angle, arc[0], arc[1], delta)
        canvas = blank()
        cv2.fillConvexPoly(canvas, pts, COLOUR)
        case = {
            "center": [cx, cy],
            "axes": list(axes),
            "angle": angle,
            "arc": list(arc),
            "delta": delta,
            "runs": runs(painted(canvas)),
        }
        if i < 150:
            offset = sum(len(p) for p in polys)
            polys.append(pts.astype(np.int16))
            case["points"] = [offset, len(pts)]
        cases.append(case)
    return cases


def polygon_cases(rng):
    h, w = CANVAS
    sets = []
    for _ in range(120):
        n = int(rng.integers(3, 12))
        spread = int(rng.choice([20, 80, 300]))
        cx, cy = int(rng.integers(-40, w + 40)), int(rng.integers(-40, h + 40))
        p = np.stack(
            [rng.integers(cx - spread, cx + spread + 1, n), rng.integers(cy - spread, cy + spread + 1, n)], 1
        ).astype(np.int32)
        hull = cv2.convexHull(p).reshape(-1, 2)
        if rng.random() < 0.5:  # either orientation
            hull = hull[::-1]
        hull = np.roll(hull, int(rng.integers(0, len(hull))), axis=0)
        sets.append(hull)
    for _ in range(40):  # degenerate: one point, all equal, two points, collinear
        x, y = int(rng.integers(-5, w + 5)), int(rng.integers(-5, h + 5))
        kind = rng.integers(0, 4)
        if kind == 0:
            sets.append(np.array([[x, y]], np.int32))
        elif kind == 1:
            sets.append(np.array([[x, y]] * int(rng.integers(2, 6)), np.int32))
        elif kind == 2:
            sets.append(np.array([[x, y], [int(rng.integers(-60, w + 60)), int(rng.integers(-60, h + 60))]], np.int32))
        else:
            dx, dy = int(rng.integers(-9, 10)), int(rng.integers(-9, 10))
            k = np.arange(int(rng.integers(3, 7)))
            sets.append(np.stack([x + dx * k, y + dy * k], 1).astype(np.int32))
    cases = []
    for pts in sets:
        canvas = blank()
        cv2.fillConvexPoly(canvas, pts, COLOUR)
        cases.append({"points": pts.reshape(-1).tolist(), "runs": runs(painted(canvas))})
    return cases


def circle_cases(rng):
    h, w = CANVAS
    cases = []
    for i in range(160):
        r = int(rng.choice([0, 1, 2, 4, int(rng.integers(0, 60))]))
        cx, cy = int(rng.integers(-80, w + 80)), int(rng.integers(-80, h + 80))
        if i % 4 == 0:
            cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        canvas = blank()
        cv2.circle(canvas, (cx, cy), r, COLOUR, thickness=-1)
        cases.append({"center": [cx, cy], "radius": r, "runs": runs(painted(canvas))})
    return cases


def line_cases(rng):
    h, w = CANVAS
    cases = []
    for i in range(240):
        far = i % 3 == 0
        lo, hi = (-300, 400) if far else (-20, 150)
        p1 = (int(rng.integers(lo, hi)), int(rng.integers(lo, hi)))
        p2 = (int(rng.integers(lo, hi)), int(rng.integers(lo, hi)))
        if i % 10 == 0:
            p2 = p1  # a dot
        t = 1 if i % 2 == 0 else int(rng.integers(2, 13))
        canvas = blank()
        cv2.line(canvas, p1, p2, COLOUR, t, cv2.LINE_8)
        cases.append({"p1": list(p1), "p2": list(p2), "thickness": t, "runs": runs(painted(canvas))})
    return cases


def bodypose_ops(rng):
    """draw_bodypose (controlnet_aux) on three random skeletons, one call per person, and the
    equivalent sequence of integer drawing operations."""
    from controlnet_aux.open_pose.body import Keypoint
    from controlnet_aux.open_pose.util import draw_bodypose

    h, w = CANVAS
    limb_seq = [[2, 3], [2, 6], [3, 4], [4, 5], [6, 7], [7, 8], [2, 9], [9, 10], [10, 11], [2, 12],
                [12, 13], [13, 14], [2, 1], [1, 15], [15, 17], [1, 16], [16, 18]]
    colors = [[255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0],
              [0, 255, 0], [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255],
              [0, 0, 255], [85, 0, 255], [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85]]
    canvas, replay = blank(), blank()
    ops = []
    for _ in range(3):
        cx, cy = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8)
        kps = [
            None if rng.random() < 0.12 else Keypoint(float(cx + rng.normal(0, 0.18)), float(cy + rng.normal(0, 0.22)))
            for _ in range(18)
        ]
        draw_bodypose(canvas, kps)
        for (a, b), color in zip(limb_seq, colors):
            k1, k2 = kps[a - 1], kps[b - 1]
            if k1 is None or k2 is None:
                continue
            Y = np.array([k1.x, k2.x]) * float(w)
            X = np.array([k1.y, k2.y]) * float(h)
            mX, mY = np.mean(X), np.mean(Y)
            length = ((X[0] - X[1]) ** 2 + (Y[0] - Y[1]) ** 2) ** 0.5
            angle = math.degrees(math.atan2(X[0] - X[1], Y[0] - Y[1]))
            op = {
                "op": "limb",
                "center": [int(mY), int(mX)],
                "axes": [int(length / 2), 4],
                "angle": int(angle),
                "color": [int(float(c) * 0.6) for c in color],
            }
            poly = cv2.ellipse2Poly(tuple(op["center"]), tuple(op["axes"]), op["angle"], 0, 360, 1)
            cv2.fillConvexPoly(replay, poly, op["color"])
            ops.append(op)
        for kp, color in zip(kps, colors):
            if kp is None:
                continue
            op = {"op": "joint", "center": [int(kp.x * w), int(kp.y * h)], "radius": 4, "color": color}
            cv2.circle(replay, tuple(op["center"]), 4, color, thickness=-1)
            ops.append(op)
    assert (replay == canvas).all(), "replayed operations differ from controlnet_aux's draw_bodypose"
    return {"ops": ops, "runs": colour_runs(canvas)}


def draw_goldens():
    rng = np.random.default_rng(20240615)
    polys = []
    data = {
        "canvas": list(CANVAS),
        "color": list(COLOUR),
        "ellipses": ellipse_cases(rng, polys),
        "polygons": polygon_cases(rng),
        "circles": circle_cases(rng),
        "lines": line_cases(rng),
        "bodypose": bodypose_ops(rng),
    }
    points = np.concatenate(polys).reshape(-1) if polys else np.zeros(0, np.int16)
    return data, {"points": np.ascontiguousarray(points.astype(np.int16))}


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.write("\n")


def main():
    cv2.setNumThreads(1)
    os.makedirs(OUT, exist_ok=True)
    cases, tensors = resize_goldens()
    write_json(os.path.join(OUT, "resize.json"), {"opencv": cv2.__version__, "cases": cases})
    save_file(tensors, os.path.join(OUT, "resize.safetensors"))
    draw, polys = draw_goldens()
    draw["opencv"] = cv2.__version__
    write_json(os.path.join(OUT, "draw.json"), draw)
    save_file(polys, os.path.join(OUT, "ellipse_polygons.safetensors"))
    for name in sorted(os.listdir(OUT)):
        print(f"{name}: {os.path.getsize(os.path.join(OUT, name))} bytes")


if __name__ == "__main__":
    main()
