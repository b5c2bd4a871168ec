"""Shared helpers: the workspace root, the tiny fixture, and the Rust examples the tests
compare against (built by cargo as `scripts/test.sh` builds the workspace, so its build is
reused)."""

import functools
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
TINY_MODEL = FIXTURES / "tiny-sd-turbo"
TINY_TAESD = FIXTURES / "tiny-taesd"
FRAMES = FIXTURES / "frames"

# The body and settings every tiny-fixture test uses (64x64 needs allow_any_resolution).
TINY_BODY = {
    "model_id": str(TINY_MODEL),
    "prompt": "a watercolor of a lighthouse",
    "negative_prompt": "blurry",
    "seed": 2,
    "num_inference_steps": 50,
    "t_index_list": [20, 35],
    "guidance_scale": 1.0,
    "width": 64,
    "height": 64,
}
TINY_SETTINGS = {"vae": str(TINY_TAESD), "allow_any_resolution": True}


def _run(cmd):
    """Runs `cmd` in the workspace and returns its stdout; raises with its stderr if it fails."""
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


@functools.cache
def _built_example(name):
    """The path of the Rust example `name`, built once a session.

    Built with the workspace selected, as `cargo test --workspace` builds it: `cargo run -p
    sdstream` would resolve the dependencies' features for that package alone and compile
    them all again (scripts/check-build-reuse.py)."""
    _run(["cargo", "build", "--quiet", "--workspace", "--exclude", "sdstream-python",
          "--example", name])
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    if not target.is_absolute():
        target = ROOT / target
    return target / "debug" / "examples" / name


def run_example(name, *args):
    """Runs a Rust example of the workspace (built once) and returns its stdout."""
    return _run([str(_built_example(name)), *map(str, args)])


@pytest.fixture(scope="session")
def tiny_body():
    return dict(TINY_BODY)


@pytest.fixture(scope="session")
def tiny_settings():
    return dict(TINY_SETTINGS)


@pytest.fixture(scope="session")
def frames():
    """The fixture frames as HxWx3 uint8 arrays, in name order."""
    import numpy as np
    from PIL import Image

    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(FRAMES.glob("*.png"))]


def write_json(path, value):
    path.write_text(json.dumps(value))
    return path


os.environ.setdefault("PYTHONUNBUFFERED", "1")
