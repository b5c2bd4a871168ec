"""Control images for ControlNets with the "external" preprocessor (tests/fixtures/
tiny-controlnet-a on the tiny checkpoint): they change the output, an unknown ControlNet id
raises naming it and changes nothing, and the Engine gives the synchronous stream's bytes."""

import numpy as np
import pytest
from PIL import Image

from sdstream import Engine, StreamDiffusion, ValidationError

from conftest import FIXTURES

NET = str(FIXTURES / "tiny-controlnet-a")


@pytest.fixture(scope="module")
def body():
    from conftest import TINY_BODY

    return dict(TINY_BODY, controlnets=[{"model_id": NET, "preprocessor": "external"}])


@pytest.fixture(scope="module")
def control(frames):
    """Another picture at another size (a non-contiguous 40x48 window of frame 7)."""
    return frames[7][5:45, 8:56]


def mean_diff(a, b):
    return np.abs(a.astype(np.int32) - b.astype(np.int32)).mean()


def test_external_control_image_changes_the_output(body, tiny_settings, frames, control):
    with StreamDiffusion(body, **tiny_settings) as s, StreamDiffusion(body, **tiny_settings) as twin:
        # Before the first control image the net contributes nothing.
        assert np.array_equal(s(frames[0], controls={}), twin(frames[0]))
        diffs = []
        for i in range(1, 4):
            # Frame 1 brings the control image; frames 2 and 3 keep using it.
            got = s(frames[i], controls={NET: control} if i == 1 else None)
            diffs.append(mean_diff(got, twin(frames[i])))
        print(f"mean abs diff in 8-bit levels, with vs without the control image: {[round(float(d), 2) for d in diffs]}")
        assert all(d > 0.5 for d in diffs), diffs


def test_control_image_formats_agree(body, tiny_settings, frames, control):
    """uint8 RGB, uint8 RGBA and PIL control images of the same pixels give the same bytes;
    float32 ones ([0, 1]) the same up to rounding (their conversion to [-1, 1] differs from
    the uint8 one in the last float bits)."""
    rgba = np.dstack([control, np.full(control.shape[:2], 9, np.uint8)])
    kinds = {
        "rgb8": control,
        "rgba8": rgba,
        "pil": Image.fromarray(np.ascontiguousarray(control)),
        "f32": control.astype(np.float32) / 255.0,
    }
    outs = {}
    for kind, image in kinds.items():
        with StreamDiffusion(body, **tiny_settings) as s:
            outs[kind] = s(frames[0], controls={NET: image})
    for kind in ("rgba8", "pil"):
        assert np.array_equal(outs[kind], outs["rgb8"]), kind
    f32_diff = np.abs(outs["f32"].astype(np.int32) - outs["rgb8"]).max()
    print(f"float32 vs uint8 control image: max diff {f32_diff} levels")
    assert f32_diff <= 1


def test_unknown_controlnet_id_raises_and_changes_nothing(body, tiny_settings, frames, control):
    with StreamDiffusion(body, **tiny_settings) as s, StreamDiffusion(body, **tiny_settings) as twin:
        s(frames[0], controls={NET: control})
        twin(frames[0], controls={NET: control})
        with pytest.raises(ValidationError, match="no/such-net"):
            s(frames[1], controls={"no/such-net": control})
        with pytest.raises(ValidationError, match="no/such-net"):
            s(frames[1], controls={NET: frames[1], "no/such-net": control})
        for i in (1, 2):
            assert np.array_equal(s(frames[i]), twin(frames[i])), f"frame {i}"
    with Engine(body, options={"warmup": False}, **tiny_settings) as engine:
        with pytest.raises(ValidationError, match="no/such-net"):
            engine.submit(frames[0], controls={"no/such-net": control})
        with pytest.raises(ValidationError, match="no/such-net"):
            engine.process(frames[0], controls={NET: control, "no/such-net": control})
        assert engine.status()["frames_submitted"] == 0
        engine.submit(frames[0], controls={NET: control})
        assert engine.recv() is not None
        assert engine.status()["frames_submitted"] == 1


def test_bad_controls_raise(body, tiny_settings, frames):
    with StreamDiffusion(body, **tiny_settings) as s:
        with pytest.raises(ValueError, match="control image for"):
            s(frames[0], controls={NET: np.zeros((8, 8), np.uint8)})
        with pytest.raises(ValueError, match="uint8 or float32"):
            s(frames[0], controls={NET: np.zeros((8, 8, 3), np.int64)})
        with pytest.raises(TypeError, match="controls must be a dict"):
            s(frames[0], controls=[(NET, frames[0])])
        with pytest.raises(TypeError):
            s(frames[0], controls={3: frames[0]})


def test_engine_equals_the_stream_byte_for_byte(body, tiny_settings, frames, control):
    given = [None, {NET: control}, None, {NET: frames[6]}, None]
    with StreamDiffusion(body, **tiny_settings) as s:
        expected = [s(frames[i], controls=c) for i, c in enumerate(given)]
    with Engine(body, options={"warmup": False, "drop_policy": "lossless", "queue_capacity": 8},
                **tiny_settings) as engine:
        ids = [engine.submit(frames[i], timestamp=100 + i, controls=c) for i, c in enumerate(given)]
        for i, want in enumerate(expected):
            out = engine.recv(60.0)
            assert out is not None and out.id == ids[i] and out.timestamp == 100 + i
            assert np.array_equal(out.image, want), f"frame {i}: max diff {mean_diff(out.image, want)}"
    # Engine.process with the same control images gives the same bytes.
    with Engine(body, options={"warmup": False}, **tiny_settings) as engine:
        for i, (c, want) in enumerate(zip(given, expected)):
            out = engine.process(frames[i], controls=c, timestamp=200 + i)
            assert out.timestamp == 200 + i
            assert np.array_equal(out.image, want), f"frame {i}: max diff {mean_diff(out.image, want)}"
        assert engine.poll() is None
