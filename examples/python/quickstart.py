"""sdstream quickstart: Daydream parameters, one frame in, one frame out.

    python examples/python/quickstart.py [MODEL_DIR] [TAESD_DIR] [OUT.png]

Defaults to the tiny test checkpoint in tests/fixtures (random weights: the picture is noise
with structure, but every step of the real pipeline runs). With a real checkpoint, e.g.
``stabilityai/sd-turbo``, use 512x512 and drop ``allow_any_resolution``.
"""

import sys
import time
from pathlib import Path

import numpy as np

import sdstream

ROOT = Path(__file__).resolve().parents[2]
model = sys.argv[1] if len(sys.argv) > 1 else ROOT / "tests/fixtures/tiny-sd-turbo"
taesd = sys.argv[2] if len(sys.argv) > 2 else ROOT / "tests/fixtures/tiny-taesd"
out_path = Path(sys.argv[3]) if len(sys.argv) > 3 else None
settings = {"vae": str(Path(taesd).resolve()), "allow_any_resolution": True}

# 1. Parameters: Daydream's model, validated by sdstream's core.
params = sdstream.StreamDiffusionParams.model_validate(
    {"prompt": "a watercolor of a lighthouse", "t_index_list": [20, 35], "width": 64, "height": 64},
    context=settings,
)
try:
    params.t_index_list = [35, 20]
except sdstream.ValidationError as e:  # a ValueError with the core's message
    print("rejected:", e)

# 2. A stream: frames are numpy arrays (HxWx3/4 uint8, HxWx3 float32) or PIL images.
rng = np.random.default_rng(0)
frame = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
with sdstream.StreamDiffusion(params, model=str(model), **settings) as stream:
    for i in range(4):
        start = time.perf_counter()
        out = stream(frame)
        print(f"frame {i}: {out.shape} {out.dtype} in {(time.perf_counter() - start) * 1e3:.1f} ms")
    # 3. Updates say what they cost: hot (next frame), reload (rebuild).
    print("prompt change:", stream.update_params(prompt="a lighthouse at night"))
    print("seed change:", stream.update_params(seed=42))
    print("size change:", stream.update_params(width=96, height=96))
    out = stream(frame)
    print("after reload:", out.shape, "status:", stream.status()["state"])

# 4. The threaded engine: submit never waits for inference; poll / recv collect outputs.
with sdstream.Engine(params, model=str(model), **settings) as engine:
    ids = [engine.submit(frame) for _ in range(2)]
    outputs = [engine.recv(timeout=60) for _ in ids]
    print("engine:", [(o.id, o.image.shape) for o in outputs if o is not None], engine.status()["state"])

if out_path is not None:
    from PIL import Image

    Image.fromarray(out).save(out_path)
    print("wrote", out_path)
