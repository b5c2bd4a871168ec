"""StreamDiffusion and Engine on the tiny fixture: byte-for-byte agreement with the Rust
example, frame formats, updates, status, threads and the GIL."""

import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

import sdstream
from sdstream import Engine, StreamDiffusion, StreamDiffusionParams, ValidationError

from conftest import FRAMES, TINY_MODEL, run_example, write_json


@pytest.fixture()
def stream(tiny_body, tiny_settings):
    with StreamDiffusion(tiny_body, **tiny_settings) as s:
        yield s


def test_output_equals_rust_example_byte_for_byte(tmp_path, tiny_body, tiny_settings, frames):
    out_dir = tmp_path / "rust"
    run_example(
        "img2img",
        "--params", write_json(tmp_path / "params.json", tiny_body),
        "--settings", write_json(tmp_path / "settings.json", tiny_settings),
        "--input", FRAMES, "--output", out_dir,
    )
    rust = [np.asarray(Image.open(p)) for p in sorted(out_dir.glob("*.png"))]
    assert len(rust) == len(frames) == 8
    with StreamDiffusion(tiny_body, **tiny_settings) as stream:
        for i, (frame, want) in enumerate(zip(frames, rust)):
            got = stream(frame)
            assert got.dtype == np.uint8 and got.shape == (64, 64, 3)
            assert np.array_equal(got, want), f"frame {i}: max diff {np.abs(got.astype(int) - want).max()}"
    # The outputs are real pictures, not a constant.
    assert rust[-1].std() > 1.0


def test_frame_formats_agree(tiny_body, tiny_settings, frames):
    """RGB8, RGBA8, float32 and PIL inputs of the same pixels give the same pictures."""
    outs = {}
    for kind in ("rgb8", "rgba8", "f32", "pil", "strided"):
        with StreamDiffusion(tiny_body, **tiny_settings) as s:
            f = frames[0]
            if kind == "rgba8":
                f = np.dstack([f, np.full(f.shape[:2], 7, np.uint8)])
            elif kind == "f32":
                f = f.astype(np.float32) / 255.0
            elif kind == "pil":
                f = Image.fromarray(f)
            elif kind == "strided":
                f = np.ascontiguousarray(np.dstack([f, f]))[:, :, ::2]  # not contiguous
            outs[kind] = s(f)
    assert outs["rgba8"].shape == (64, 64, 4) and (outs["rgba8"][:, :, 3] == 255).all()
    assert np.array_equal(outs["rgba8"][:, :, :3], outs["rgb8"])
    assert np.array_equal(outs["pil"], outs["rgb8"])
    assert np.array_equal(outs["strided"], outs["rgb8"])
    f32 = outs["f32"]
    assert f32.dtype == np.float32 and f32.shape == (64, 64, 3)
    # u8 output is round(x * 255) of the same float output.
    assert np.array_equal(np.round(f32 * 255).clip(0, 255).astype(np.uint8), outs["rgb8"])


def test_bad_frames_raise(stream):
    with pytest.raises(ValueError, match="HxWx3 or HxWx4"):
        stream(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="uint8 or float32"):
        stream(np.zeros((64, 64, 3), np.int32))
    with pytest.raises(TypeError):
        stream([[1, 2, 3]])


def test_update_params(stream, tiny_body, frames):
    stream(frames[0])
    assert stream.update_params(prompt="a red boat") == "hot"
    assert stream.params.prompt == "a red boat"
    assert stream.update_params(prompt="a red boat") == "unchanged"
    assert stream.update_params(width=128, height=128) == "reload"
    assert stream(frames[1]).shape == (128, 128, 3)
    with pytest.raises(ValidationError, match="t_index_list must be in non-decreasing order"):
        stream.update_params(t_index_list=[30, 10])
    assert stream.params.t_index_list == [20, 35]
    # A complete set: omitted fields take the defaults (Daydream's rule).
    full = StreamDiffusionParams.model_validate(tiny_body, context={"allow_any_resolution": True})
    assert stream.update_params(full) == "reload"  # back to 64x64
    assert stream.params == full
    assert stream(frames[2]).shape == (64, 64, 3)
    status = stream.status()
    assert status["state"] == "ONLINE" and status["frames_processed"] == 3
    assert status["last_params"]["width"] == 64 and status["timings"]["total"] > 0
    # The Engine's schema: accepted updates and reloads are counted (hot, reload, reload); the
    # refused body never reached the stream (validation refused it first).
    assert (status["params_version"], status["restart_count"], status["error_count"]) == (3, 2, 0)
    assert status["last_error"] is None and status["frames_failed"] == 0


def test_close_and_context_manager(tiny_body, tiny_settings, frames):
    with StreamDiffusion(tiny_body, **tiny_settings) as s:
        s(frames[0])
    assert s.closed
    with pytest.raises(RuntimeError, match="closed"):
        s(frames[0])
    s.close()  # idempotent


def test_model_argument_and_bad_settings(tiny_body, tiny_settings):
    body = {k: v for k, v in tiny_body.items() if k != "model_id"}
    with StreamDiffusion(body, model=TINY_MODEL, **tiny_settings) as s:
        assert s.params.model_id == str(TINY_MODEL)
    with pytest.raises(ValidationError, match="unknown field `no_such_setting`"):
        StreamDiffusion(tiny_body, no_such_setting=1, **tiny_settings)


def test_engine_matches_stream(tiny_body, tiny_settings, frames):
    """Without warm-up, the engine's outputs equal the synchronous stream's."""
    with StreamDiffusion(tiny_body, **tiny_settings) as s:
        want = [s(f) for f in frames[:4]]
    options = {"warmup": False, "drop_policy": "lossless", "queue_capacity": 8}
    with Engine(tiny_body, options=options, **tiny_settings) as engine:
        ids = [engine.submit(f, timestamp=100 + i) for i, f in enumerate(frames[:4])]
        outs = [engine.recv(60.0) for _ in ids]
        assert engine.poll() is None
        assert [o.id for o in outs] == ids and [o.timestamp for o in outs] == [100, 101, 102, 103]
        for o, w in zip(outs, want):
            assert np.array_equal(o.image, w)
        assert engine.update_params(prompt="a boat") == "hot"
        status = engine.status()
        assert status["state"] in ("ONLINE", "DEGRADED_INPUT") and status["frames_processed"] == 4
        assert status["last_params"]["prompt"] == "a boat"


def test_engine_process_equals_stream(tiny_body, tiny_settings, frames):
    """Engine.process gives StreamDiffusion's pictures for the same frames, as Outputs with the
    caller's timestamps; its outputs never reach poll / recv, and a submitted frame's does."""
    with StreamDiffusion(tiny_body, **tiny_settings) as s:
        want = [s(f) for f in frames[:4]]
    options = {"warmup": False, "drop_policy": "lossless", "queue_capacity": 8}
    with Engine(tiny_body, options=options, **tiny_settings) as engine:
        outs = [engine.process(f, timestamp=500 + i) for i, f in enumerate(frames[:2])]
        # A submitted frame between two process calls: its output waits for poll / recv.
        submitted = engine.submit(frames[2], timestamp=502)
        outs.append(engine.process(frames[3], timestamp=503))
        queued = engine.recv(60.0)
        assert engine.poll() is None
        assert all(isinstance(o, sdstream.Output) for o in outs)
        assert [o.timestamp for o in outs] == [500, 501, 503]
        assert outs[0].id < outs[1].id < submitted < outs[2].id
        assert queued is not None and (queued.id, queued.timestamp) == (submitted, 502)
        for got, w in zip([outs[0], outs[1], queued, outs[2]], want):
            assert np.array_equal(got.image, w)
        assert engine.status()["frames_processed"] == 4


def test_engine_spawn_without_waiting(tiny_body, tiny_settings, frames):
    engine = Engine(tiny_body, wait=False, **tiny_settings)
    try:
        engine.wait_ready(60.0)
        engine.submit(frames[0])
        out = engine.recv(60.0)
        assert out is not None and out.image.shape == (64, 64, 3) and out.latency > 0
    finally:
        engine.close()
    engine.close()
    with pytest.raises(RuntimeError):
        engine.submit(frames[0])


def test_gil_is_released_during_inference(tiny_body, tiny_settings, frames):
    """While one thread is inside the native call, another Python thread runs. With the
    interpreter's switch interval set far beyond the test's length, Python threads only change
    hands when the GIL is released, so a counter another thread advances can move during the
    call only if the call released it (a count, not a timing)."""
    body = dict(tiny_body, width=128, height=128)
    frame = np.asarray(Image.fromarray(frames[0]).resize((128, 128)))
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1
            time.sleep(0.0005)  # releases the GIL, so the caller can take it back

    with StreamDiffusion(body, **tiny_settings) as s:
        s(frame)  # first call pays for lazy allocations
        spinner = threading.Thread(target=spin)
        previous = sys.getswitchinterval()
        sys.setswitchinterval(1000.0)
        try:
            spinner.start()
            advanced = []
            for _ in range(3):
                before = counter[0]
                s(frame)
                advanced.append(counter[0] - before)
        finally:
            stop.set()
            spinner.join()
            sys.setswitchinterval(previous)
    print(f"another thread advanced {advanced} times during three calls")
    assert sum(advanced) > 0


def test_two_threads_share_one_stream_and_one_engine(tiny_body, tiny_settings, frames):
    errors = []
    results = []
    options = {"drop_policy": "lossless", "queue_capacity": 16, "output_capacity": 16}
    with StreamDiffusion(tiny_body, **tiny_settings) as s, Engine(tiny_body, options=options, **tiny_settings) as e:

        def work(k):
            try:
                for i in range(4):
                    results.append(("stream", s(frames[(k + i) % 8]).shape))
                    e.submit(frames[i])
                    out = e.recv(60.0)
                    results.append(("engine", None if out is None else out.image.shape))
                    s.status()
                    e.status()
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "deadlock"
        assert errors == []
        assert sorted(results) == sorted([("stream", (64, 64, 3))] * 8 + [("engine", (64, 64, 3))] * 8)
        assert s.status()["frames_processed"] == 8
        assert e.status()["frames_processed"] == 8


def test_public_names():
    for name in sdstream.__all__:
        assert getattr(sdstream, name) is not None


def test_a_transition_glides_from_the_old_prompt_to_the_new(tiny_body, tiny_settings, frames):
    """A prompt change with a transition over 4 frames: while it glides the outputs differ from
    a switch at once, less and less; afterwards they equal the switched stream's. Bad transitions raise ValidationError naming the field and change
    nothing."""
    runs = {}
    for name, transition in (("instant", None), ("glide", 4),
                             ("slerp", {"num_steps": 4, "temporal_interpolation_method": "slerp"})):
        with StreamDiffusion(dict(tiny_body, guidance_scale=3.0), **tiny_settings) as s:
            s(frames[0])
            assert s.update_params(prompt="an oil painting of a red fox", transition=transition) == "hot"
            runs[name] = [s(f).astype(np.float64) for f in frames[1:8]]
    for name in ("glide", "slerp"):
        diffs = [float(np.abs(a - b).mean()) for a, b in zip(runs[name], runs["instant"])]
        # The output leaves the stream batch one frame after its conditioning: the glide shows
        # from the second frame, shrinks, and once its last frame has left the batch the
        # outputs are the switched stream's exactly.
        during, after = diffs[1:4], diffs[4:]
        assert min(during) > 0.1 and during[0] > during[1] > during[2], f"{name}: {diffs}"
        assert after == [0.0] * len(after), f"{name}: after the glide the outputs match: {diffs}"
    with StreamDiffusion(tiny_body, **tiny_settings) as s:
        for bad, match in ((5000, "transition.num_steps"), ({"num_steps": -1}, "transition.num_steps"),
                           ({"num_steps": 3, "temporal_interpolation_method": "cubic"},
                            "transition.temporal_interpolation_method"),
                           ("3", "transition must be"), (True, "transition must be")):
            with pytest.raises(ValidationError, match=match):
                s.update_params(prompt="a dog", transition=bad)
        assert s.params.prompt == tiny_body["prompt"]
    with Engine(tiny_body, **tiny_settings) as engine:
        assert engine.update_params(prompt="a dog", transition=3) == "hot"
        with pytest.raises(ValidationError, match="transition.num_steps"):
            engine.update_params(prompt="a cat", transition=1001)


def test_the_per_frame_features_of_issue_16_from_python(tiny_body, tiny_settings, frames):
    """The safety checker (on by default; the tiny pipeline carries one that never flags),
    latent feedback and cached attention, driven from Python: counted in the status, hot or
    reload as Daydream classifies them, invalid values refused naming the field."""
    off_body = dict(tiny_body, use_safety_checker=False)
    with StreamDiffusion(tiny_body, **tiny_settings) as s, StreamDiffusion(off_body, **tiny_settings) as off:
        assert np.array_equal(s(frames[0]), off(frames[0]))
        status = s.status()
        assert (status["safety_frames_checked"], status["safety_frames_flagged"]) == (1, 0)
        assert "safety_checker" in status["processor_ms"]
        assert off.status()["safety_frames_checked"] == 0
        feedback = {"processors": [{"type": "latent_feedback", "params": {"feedback_strength": 0.5}}]}
        assert s.update_params(latent_postprocessing=feedback) == "hot"
        s(frames[1])
        s(frames[2])
        assert "latent_feedback" in s.status()["processor_ms"]
        bad = {"processors": [{"type": "latent_feedback", "params": {"feedback_strength": 2}}]}
        with pytest.raises(ValidationError, match="feedback_strength"):
            s.update_params(latent_postprocessing=bad)
        assert s.update_params(cached_attention={"enabled": True, "max_frames": 2}) == "reload"
        s(frames[3])
        assert s.update_params(cached_attention={"max_frames": 3, "interval": 2}) == "hot"
        assert s.params.cached_attention == {"enabled": True, "max_frames": 3, "interval": 2}
        with pytest.raises(ValidationError, match="cached_attention.max_frames"):
            s.update_params(cached_attention={"max_frames": 5})
        assert s(frames[4]).shape == (64, 64, 3)
        assert s.status()["safety_frames_checked"] == 5


def test_ip_adapter_style_from_a_url_and_from_an_array(tiny_body, tiny_settings, frames):
    """IP-Adapter on the tiny SD 1.5 pipeline (h94/IP-Adapter from the fixtures' model root):
    the style picture from a data: URL, then handed in as an array; scale hot (0 = no
    adapter, byte for byte); a bad array refused naming it; faceid refused naming the field."""
    import base64

    from conftest import FIXTURES

    png = (FIXTURES / "golden" / "ip_adapter_style.png").read_bytes()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    body = dict(tiny_body, model_id=str(FIXTURES / "tiny-sd15"), use_lcm_lora=False,
                use_safety_checker=False, ip_adapter_style_image_url=url)
    settings = dict(tiny_settings, model_root=str(FIXTURES / "model-root"))
    on = dict(body, ip_adapter={"enabled": True, "scale": 1.0})
    with StreamDiffusion(body, **settings) as plain, StreamDiffusion(on, **settings) as styled:
        a = [plain(f) for f in frames[:3]]
        b = [styled(f) for f in frames[:3]]
        moved = np.mean([np.abs(x.astype(float) - y.astype(float)).mean() for x, y in zip(a, b)])
        assert moved > 1.0, moved
        # A picture from the host: another style, another output.
        styled.set_style_image(frames[5])
        c = styled(frames[3])
        styled.set_style_image(None)
        assert styled.update_params(ip_adapter={"enabled": True, "scale": 0.0}) == "hot"
        with pytest.raises(ValueError, match="invalid picture"):
            styled.set_style_image(np.zeros((4, 4), dtype=np.uint8))
        with pytest.raises(ValidationError, match="ip_adapter.type"):
            styled.update_params(ip_adapter={"enabled": True, "type": "faceid"})
    with StreamDiffusion(on, **settings) as again:
        for f in frames[:3]:
            again(f)
        d = again(frames[3])
    assert np.abs(c.astype(float) - d.astype(float)).mean() > 0.2
    with StreamDiffusion(dict(on, ip_adapter={"enabled": True, "scale": 0.0}), **settings) as zero, \
            StreamDiffusion(body, **settings) as plain:
        for f in frames[:3]:
            assert np.array_equal(zero(f), plain(f))
    with Engine(on, **settings) as engine:
        engine.set_style_image(frames[5])
        assert engine.process(frames[0]).image.shape == (64, 64, 3)
        assert engine.status()["last_error"] is None
