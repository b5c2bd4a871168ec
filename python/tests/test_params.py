"""The parameter models: pydantic-like behaviour, and validation identical to the Rust core's."""

import copy
import json
import pickle
import random
import struct
from pathlib import Path

import pytest

import sdstream
from sdstream import ControlNetConfig, IPAdapterConfig, StreamDiffusionParams, ValidationError

from conftest import run_example

CASES = Path(__file__).with_name("daydream_bodies.json")


def test_validation_error_is_a_value_error():
    assert issubclass(ValidationError, ValueError)


def test_defaults_are_daydreams():
    p = StreamDiffusionParams()
    assert p.model_id == "stabilityai/sd-turbo"
    assert p.prompt == "flowers"
    assert p.negative_prompt == "blurry, low quality, flat, 2d"
    assert p.num_inference_steps == 50
    assert p.t_index_list == [12, 20, 32]
    assert (p.width, p.height) == (512, 512)
    assert p.seed == 789
    assert p.guidance_scale == 1.0 and p.delta == 0.7
    assert p.acceleration == "tensorrt"
    assert p.controlnets == []
    assert isinstance(p.ip_adapter, IPAdapterConfig) and p.ip_adapter.enabled is False
    assert p.lora_dict is None


def test_keyword_construction_and_nested_models():
    cn = ControlNetConfig(model_id="thibaud/controlnet-sd21-depth-diffusers", conditioning_scale=0.5)
    assert cn.preprocessor == "passthrough" and cn.enabled is True and cn.control_guidance_end == 1.0
    p = StreamDiffusionParams(prompt="a cat", seed=7, controlnets=[cn])
    assert p.prompt == "a cat" and p.seed == 7
    assert p.controlnets == [cn]
    assert p.controlnets[0].conditioning_scale == 0.5
    # A dict is as good as a model inside.
    q = StreamDiffusionParams(prompt="a cat", seed=7, controlnets=[cn.model_dump()])
    assert p == q
    # Built alone, an IPAdapterConfig is enabled (Daydream's class default).
    assert IPAdapterConfig().enabled is True and IPAdapterConfig().weight_type == "linear"


def test_assignment_validates_and_keeps_state_on_error():
    p = StreamDiffusionParams()
    p.t_index_list = [10, 20]
    assert p.t_index_list == [10, 20]
    with pytest.raises(ValidationError, match=r"t_index_list must be in non-decreasing order"):
        p.t_index_list = [30, 20]
    assert p.t_index_list == [10, 20]
    with pytest.raises(ValidationError, match="unknown field"):
        p.no_such_field = 1
    with pytest.raises(AttributeError):
        p.no_such_field  # noqa: B018


def test_dump_validate_copy_round_trip():
    p = StreamDiffusionParams(prompt=[["a", 0.25], ["b", 0.75]], seed=[[1, 0.5], [2, 0.5]])
    dumped = p.model_dump()
    assert StreamDiffusionParams.model_validate(dumped) == p
    assert StreamDiffusionParams.model_validate_json(p.model_dump_json()) == p
    assert json.loads(p.model_dump_json(indent=2)) == dumped
    q = p.model_copy(update={"prompt": "c"})
    assert q.prompt == "c" and p.prompt == [["a", 0.25], ["b", 0.75]] and q != p
    with pytest.raises(ValidationError):
        p.model_copy(update={"width": 500})
    assert copy.deepcopy(p) == p and pickle.loads(pickle.dumps(p)) == p
    # The dump is a copy: changing it does not change the model.
    dumped["prompt"] = "changed"
    assert p.prompt != "changed"


def test_repr_is_readable():
    r = repr(StreamDiffusionParams(prompt="a cat"))
    assert r.startswith("StreamDiffusionParams(model_id='stabilityai/sd-turbo', prompt='a cat'")
    assert "ip_adapter=IPAdapterConfig(type='regular'" in r


def test_context_relaxes_resolution():
    with pytest.raises(ValidationError, match="width must be between 384 and 1024"):
        StreamDiffusionParams(width=64, height=64)
    p = StreamDiffusionParams.model_validate({"width": 64, "height": 64}, context={"allow_any_resolution": True})
    assert p.width == 64
    p.height = 128  # assignment keeps the context
    assert p.height == 128


def _python_outcome(case):
    body, context = case["body"], case.get("settings")
    try:
        if isinstance(body, str):
            p = StreamDiffusionParams.model_validate_json(body, context=context)
        else:
            p = StreamDiffusionParams.model_validate(body, context=context)
    except ValidationError as e:
        return {"error": str(e)}
    return {"ok": p.model_dump()}


def test_daydream_bodies_validate_exactly_as_in_rust(tmp_path):
    cases = json.loads(CASES.read_text())
    # Rust gets each body as the very text Python's model_validate sends to the core (compact,
    # keys in order), since a type error quotes its column in that text.
    as_text = [
        dict(case, body=case["body"] if isinstance(case["body"], str)
             else json.dumps(case["body"], separators=(",", ":")))
        for case in cases
    ]
    rust_cases = tmp_path / "cases.json"
    rust_cases.write_text(json.dumps(as_text))
    expected = json.loads(run_example("validate_bodies", rust_cases))
    assert len(expected) == len(cases)
    rejected = 0
    for case, want in zip(cases, expected):
        got = _python_outcome(case)
        assert got == want, f"body {case}"
        rejected += "error" in want
    # The table exercises both sides.
    assert 30 <= rejected < len(cases) - 10, rejected


def test_keyword_construction_matches_model_validate():
    cases = json.loads(CASES.read_text())
    for case in cases:
        body = case["body"]
        if not isinstance(body, dict) or case.get("settings"):
            continue
        want = _python_outcome(case)
        try:
            got = {"ok": StreamDiffusionParams(**body).model_dump()}
        except ValidationError as e:
            got = {"error": str(e)}
        assert got == want, f"body {body}"


def test_nested_models_reject_with_the_cores_messages():
    with pytest.raises(ValidationError, match="missing field `model_id`"):
        ControlNetConfig()
    with pytest.raises(ValidationError, match="unknown field `extra`"):
        ControlNetConfig(model_id="x", extra=1)
    with pytest.raises(ValidationError, match="unknown variant `wrong`"):
        IPAdapterConfig(type="wrong")
    cn = ControlNetConfig(model_id="x")
    with pytest.raises(ValidationError):
        cn.conditioning_scale = "high"
    assert cn.conditioning_scale == 1.0


def test_version():
    assert sdstream.__version__.count(".") == 2


def _random_float(rng):
    """A finite double from every bit-pattern class: any pattern, subnormal, near 1 (where real
    scales and weights live), huge, or an edge (±0, 2^53 ± 1, the extremes)."""
    sign = rng.getrandbits(1) << 63
    mantissa = rng.getrandbits(52)
    kind = rng.randrange(6)
    if kind == 0:
        exponent = rng.randrange(2047)  # every finite exponent
    elif kind == 1:
        exponent = 0  # subnormal (or zero)
    elif kind == 2:
        exponent = 1023 - 10 + rng.randrange(20)
    elif kind == 3:
        exponent = 2046 - rng.randrange(64)
    elif kind == 4:
        exponent = 1 + rng.randrange(64)
    else:
        return rng.choice([0.0, -0.0, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308,
                           9007199254740991.0, 9007199254740992.0, 9007199254740994.0, 0.1, 0.7])
    return struct.unpack("<d", struct.pack("<Q", sign | (exponent << 52) | mantissa))[0]


def _bits(x):
    return struct.pack("<d", x)


def test_floats_round_trip_exactly():
    """Issue #20 item 6: random bodies with floats of every class come back equal through
    model_dump / model_validate and through JSON text, and each float keeps its bits (-0.0 and
    subnormals included). Before serde_json parsed exactly, about one float in five came back
    one ulp off and most such bodies failed model_validate(model_dump()) == obj."""
    rng = random.Random(20)
    bodies = 3000
    floats_checked = 0
    for _ in range(bodies):
        x = [_random_float(rng) for _ in range(9)]
        start, end = sorted([rng.random(), rng.random()])
        body = {
            "guidance_scale": x[0],
            "delta": x[1],
            "safety_checker_threshold": x[2],
            "similar_image_filter_threshold": rng.random(),
            "prompt": [["a", x[3]], ["b", 1.0]],
            "normalize_prompt_weights": False,
            "seed": [[rng.randrange(2**53), x[4]], [7, 1.0]],
            "normalize_seed_weights": False,
            "lora_dict": {"some/lora": x[5]},
            "controlnets": [{
                "model_id": "thibaud/controlnet-sd21-depth-diffusers",
                "conditioning_scale": x[6],
                "control_guidance_start": start,
                "control_guidance_end": end,
                "preprocessor_params": {"k": x[7]},
            }],
            "ip_adapter": {"enabled": False, "scale": x[8]},
        }
        p = StreamDiffusionParams(**body)
        assert StreamDiffusionParams.model_validate(p.model_dump()) == p
        assert StreamDiffusionParams.model_validate_json(p.model_dump_json()) == p
        got = [p.guidance_scale, p.delta, p.safety_checker_threshold, p.prompt[0][1], p.seed[0][1],
               p.lora_dict["some/lora"], p.controlnets[0].conditioning_scale,
               p.controlnets[0].preprocessor_params["k"], p.ip_adapter.scale]
        again = StreamDiffusionParams.model_validate_json(p.model_dump_json())
        assert [_bits(v) for v in got] == [_bits(v) for v in x], (x, got)
        assert again.guidance_scale == x[0] and _bits(again.delta) == _bits(x[1])
        assert (again.controlnets[0].control_guidance_start, again.similar_image_filter_threshold) == (
            start, body["similar_image_filter_threshold"])
        floats_checked += len(x)
    assert floats_checked == 9 * bodies


def test_integer_delta_near_two_to_the_53_comes_back():
    """`{"delta": 9007199254740991}` once came back 9007199254740990 (from "…991.0" on the second
    parse)."""
    p = StreamDiffusionParams.model_validate_json('{"delta": 9007199254740991}')
    assert p.delta == 9007199254740991
    for q in (StreamDiffusionParams.model_validate(p.model_dump()),
              StreamDiffusionParams.model_validate_json(p.model_dump_json()),
              StreamDiffusionParams(delta=9007199254740991)):
        assert q.delta == 9007199254740991 and q == p
    # 2^53 + 1 is no double: it reads as the nearest one, 2^53, and stays there.
    assert StreamDiffusionParams(delta=2**53 + 1).delta == 2.0**53


def test_prompt_limits_are_the_cores():
    """Issue #20 item 8 through Python: the core's limits, with its messages."""
    with pytest.raises(ValidationError, match=r"prompt has 33 \[text, weight\] pairs; at most 32"):
        StreamDiffusionParams(prompt=[[f"p{i}", 1.0] for i in range(33)])
    with pytest.raises(ValidationError, match="negative_prompt is 2049 characters long; at most 2048"):
        StreamDiffusionParams(negative_prompt="x" * 2049)
    with pytest.raises(ValidationError, match=r"prompt is 10485760 characters long"):
        StreamDiffusionParams(prompt="x" * (10 << 20))
    with pytest.raises(ValidationError, match=r"seed has 33 \[seed, weight\] pairs; at most 32"):
        StreamDiffusionParams(seed=[[i, 1.0] for i in range(33)])
    assert len(StreamDiffusionParams(prompt="€" * 2048).prompt) == 2048
