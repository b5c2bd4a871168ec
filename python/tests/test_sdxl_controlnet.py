"""The camera app's body from Python with no new call: `stabilityai/sdxl-turbo` with
`xinsir/controlnet-canny-sdxl-1.0` at 0.3, found under the settings' `model_root`, where the
tiny SDXL stand-ins are (tests/fixtures/tiny-sdxl, tiny-sdxl-controlnet, tiny-taesdxl as
`madebyollin/taesdxl`). The Engine gives the synchronous stream's bytes, the net moves the
picture, and a scale change is hot."""

import shutil

import numpy as np
import pytest

from sdstream import Engine, StreamDiffusion

from conftest import FIXTURES

SIDE = 512
STAND_INS = {
    "stabilityai/sdxl-turbo": "tiny-sdxl",
    "xinsir/controlnet-canny-sdxl-1.0": "tiny-sdxl-controlnet",
    "madebyollin/taesdxl": "tiny-taesdxl",
}


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-camera-root")
    for model_id, folder in STAND_INS.items():
        shutil.copytree(FIXTURES / folder, root / model_id)
    return root


def camera_body(scale=0.3, nets=True):
    controlnets = [{
        "model_id": "xinsir/controlnet-canny-sdxl-1.0",
        "conditioning_scale": scale,
        "preprocessor": "canny",
        "preprocessor_params": {"low_threshold": 100, "high_threshold": 200},
        "enabled": True,
    }] if nets else []
    return {
        "model_id": "stabilityai/sdxl-turbo",
        "prompt": "a portrait in the style of a stained glass window",
        "seed": 42,
        "width": SIDE,
        "height": SIDE,
        "t_index_list": [20],
        "controlnets": controlnets,
    }


def camera_frame():
    """Rings and bars: edges for canny to find."""
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    ring = (np.sqrt((x - 256) ** 2 + (y - 200) ** 2).astype(int) // 24) % 2 == 0
    on = ring | (((x // 64) % 2 == 0) & (y > 400))
    v = np.where(on, 220, 30)
    return np.stack([v, v // 2 + x % 50, 255 - v], axis=-1).astype(np.uint8)


def mean_diff(a, b):
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def test_the_camera_apps_sdxl_body_streams(model_root):
    settings = {"model_root": str(model_root)}
    frame = camera_frame()
    with StreamDiffusion(camera_body(), **settings) as stream:
        direct = [stream(frame) for _ in range(2)]
    with StreamDiffusion(camera_body(nets=False), **settings) as stream:
        plain = [stream(frame) for _ in range(2)]
    with Engine(camera_body(), options={"warmup": False}, **settings) as engine:
        from_engine = [engine.process(frame).image for _ in range(2)]
        assert engine.update_params(camera_body(scale=0.6)) == "hot"
        stronger = engine.process(frame).image
    for i, (a, b) in enumerate(zip(from_engine, direct)):
        assert a.shape == (SIDE, SIDE, 3)
        assert np.array_equal(a, b), f"frame {i}: {mean_diff(a, b)}"
    moved = mean_diff(direct[-1], plain[-1])
    print(f"canny net at 0.3 vs none: mean {moved:.2f} levels")
    assert moved > 0.5
    assert mean_diff(stronger, direct[-1]) > 0.1
