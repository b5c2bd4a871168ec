"""`sdstream.ImageProcessor`: one image processor on its own, checked against the goldens the
Rust tests use (tests/reference/make_processor_fixtures.py: controlnet_aux's HED, torchvision's
RAFT flow image), with the tiny networks of tests/fixtures/model-root."""

import json
import struct

import numpy as np
import pytest
from PIL import Image

import sdstream
from conftest import FIXTURES

MODEL_ROOT = str(FIXTURES / "model-root")


def goldens():
    """tests/fixtures/processors/goldens.safetensors as numpy arrays (U8 and F32 only)."""
    data = (FIXTURES / "processors" / "goldens.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    body = data[8 + length:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = {"U8": np.uint8, "F32": np.float32}[info["dtype"]]
        out[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(info["shape"])
    return out


def test_hed_equals_controlnet_aux_on_arrays_and_pil_images():
    g = goldens()
    hed = sdstream.ImageProcessor("hed", {"safe": True}, model_root=MODEL_ROOT)
    assert (hed.name, hed.output_channels, hed.last_ms) == ("hed", 3, None)
    assert hed.output_size(96, 64) == (96, 64)
    for name in ("sq", "wide"):
        frame = g[f"input_{name}"]
        got = hed(frame)
        assert got.dtype == np.uint8 and got.shape == frame.shape
        assert np.array_equal(got, g[f"hed_{name}"]), f"hed {name}"
        assert hed.last_ms > 0
        # A PIL image is taken as its pixels.
        assert np.array_equal(hed(Image.fromarray(frame)), got)


def test_the_temporal_processor_keeps_the_previous_frame_and_makes_six_channels():
    g = goldens()
    tn = sdstream.ImageProcessor("temporal_net_tensorrt", '{"height": 256, "width": 256}',
                                 model_root=MODEL_ROOT)
    assert tn.output_channels == 6
    previous, current = g["temporal_prev_sq"], g["input_sq"]
    first = tn(previous)
    assert first.shape == (64, 64, 6)
    assert np.array_equal(first[:, :, :3], previous) and not first[:, :, 3:].any()
    second = tn(current)
    want = np.rint(g["temporal_concat_sq"][0].transpose(1, 2, 0) * 255).astype(np.int16)
    worst = np.abs(second.astype(np.int16) - want).max()
    assert worst <= 1, f"{worst} levels from torchvision's flow image"
    tn.reset()
    assert not tn(current)[:, :, 3:].any(), "after reset the flow starts over"


def test_bad_processors_and_params_raise_validation_errors_naming_them():
    with pytest.raises(sdstream.ValidationError, match="openpose"):
        sdstream.ImageProcessor("mediapipe_pose")
    with pytest.raises(sdstream.ValidationError, match="no_such"):
        sdstream.ImageProcessor("no_such")
    with pytest.raises(sdstream.ValidationError, match="params.low_threshold"):
        sdstream.ImageProcessor("canny", {"low_threshold": 900})
    with pytest.raises(sdstream.ValidationError, match="JSON object"):
        sdstream.ImageProcessor("canny", "[1]")
    with pytest.raises(sdstream.ValidationError):
        sdstream.ImageProcessor("canny", 3)
    with pytest.raises(RuntimeError, match="lllyasviel/Annotators"):
        sdstream.ImageProcessor("hed", model_root=str(FIXTURES / "frames"))
    canny = sdstream.ImageProcessor("canny")
    with pytest.raises(ValueError, match="HxWx3"):
        canny(np.zeros((8, 8), np.uint8))
