"""Issue #20 item 7: every bad input to the parameter surfaces raises `ValidationError` with a
message, never UnicodeDecodeError, UnicodeEncodeError, TypeError, RecursionError or anything
else; and a refused update leaves the parameters as they were.

A seeded generator makes a few thousand hostile values (lone surrogates, bytes that are not
UTF-8, objects that are not JSON, huge numbers, deep and self-containing containers, broken JSON
texts) and sends them through the model constructors, model_validate(_json), attribute
assignment, the StreamDiffusion / Engine constructors' params, settings and options, and
update_params(**changes)."""

import datetime
import decimal
import fractions
import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sdstream import (ControlNetConfig, Engine, IPAdapterConfig, StreamDiffusion,
                      StreamDiffusionParams, ValidationError)

from conftest import TINY_MODEL

FIELDS = list(StreamDiffusionParams().model_dump())
SETTINGS = ["cfg_type", "frame_buffer_size", "device", "dtype", "vae", "model_root", "allow_any_resolution"]
OPTIONS = ["queue_capacity", "output_capacity", "drop_policy", "warmup", "input_timeout_ms", "fps_window_ms"]


def _nested(depth, make):
    value = make()
    for _ in range(depth):
        value = [value] if isinstance(value, list) else {"k": value}
    return value


def _deep_list(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def _self_containing(rng):
    kind = rng.randrange(3)
    if kind == 0:
        d = {"prompt": "a"}
        d["controlnets"] = [d]
        return d
    if kind == 1:
        items = [["a", 1.0]]
        items.append(items)
        return items
    d = {}
    d["k"] = {"inner": d}
    return d


class _Unprintable:
    def __str__(self):
        raise RuntimeError("no str")

    __repr__ = __str__


def _text(rng):
    pool = ["a", "é", "€", "😀", "\x00", "\ud800", "\udfff", "\ud83d", "\\", '"', "{", "}", " ", "\n"]
    return "".join(rng.choice(pool) for _ in range(rng.randrange(12)))


def _json_text(rng):
    """A text that looks like a body and is not a valid one (or is, by chance)."""
    texts = [
        '{"prompt": "\\ud800"}',
        '{"prompt": "\\udfff x"}',
        '{"delta": 1e400}',
        '{"seed": 18446744073709551616}',
        '{"prompt": ' + "[" * 5000 + "]" * 5000 + "}",
        "[" * 100_000,
        '{"guidance_scale": NaN}',
        '{"prompt": "a"',
        '\ufeff{"prompt": "a"}',
        '{"prompt": "a"} trailing',
        '{"prompt": "\x00"}',
        '{"controlnets": {"model_id": "x"}}',
        '{"width": "512"}',
        "",
        "null",
        "1",
        json.dumps({"prompt": [["a", 1]] * 40}),
    ]
    text = rng.choice(texts)
    if rng.random() < 0.3:
        cut = rng.randrange(len(text) + 1)
        text = text[:cut] + _text(rng) + text[cut:]
    return text


def hostile(rng, depth=0):
    """One hostile value."""
    kind = rng.randrange(24 if depth < 3 else 18)
    if kind == 0:
        return _text(rng)
    if kind == 1:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 8)))
    if kind == 2:
        return rng.choice([b"\xff", b'{"prompt": "\xe9"}', bytearray(b"\xc3("), memoryview(b"{}")])
    if kind == 3:
        return rng.choice([0, -1, 2**53, 2**53 + 1, 2**63, 2**64, -(2**63) - 1, 10**5000, 10**400])
    if kind == 4:
        return rng.choice([float("nan"), float("inf"), float("-inf"), -0.0, 5e-324, 1e308])
    if kind == 5:
        return rng.choice([True, False, None])
    if kind == 6:
        return rng.choice([np.float32("nan"), np.int64(-5), np.bool_(True), np.str_("\ud800"),
                           np.float64(1e300), np.array([[1, 2], [3, 4]]), np.array(7), np.bytes_(b"\xff"),
                           np.longdouble(1.5), np.datetime64("2020-01-01"), np.array(["a", None], dtype=object)])
    if kind == 7:
        return rng.choice([object(), lambda: 0, int, complex(1, 2), decimal.Decimal("1.1"),
                           fractions.Fraction(1, 3), datetime.date(2020, 1, 1), Path("no/such/dir"),
                           _Unprintable(), Ellipsis, range(3), {1, 2}, frozenset({"a"})])
    if kind == 8:
        return _json_text(rng)
    if kind == 9:
        return _self_containing(rng)
    if kind == 10:
        return _deep_list(rng.choice([130, 1000, 5000]))
    if kind == 11:
        return _nested(rng.choice([127, 129, 3000]), lambda: "x")
    if kind == 12:
        return rng.choice(["x" * 100_000, "\ud800" * 1000, " " * 5000])
    if kind == 13:
        return {rng.choice([1, None, (1, 2), b"k", 2.5, "\ud800", Path("p")]): 1.0}
    if kind == 14:
        return [[_text(rng), hostile(rng, depth + 1)]]
    if kind == 15:
        return [hostile(rng, depth + 1) for _ in range(rng.randrange(3))]
    if kind == 16:
        return rng.choice(["flowers", 1.5, 7, [["a", 0.5], ["b", 0.5]], [[1, 0.5]], 512])  # often valid
    if kind == 17:
        return rng.choice(["", "   ", "..", "/", "stabilityai/sd-turbo"])
    if kind == 18:
        return {rng.choice(FIELDS): hostile(rng, depth + 1)}
    if kind == 19:
        return tuple(hostile(rng, depth + 1) for _ in range(2))
    return {_text(rng): hostile(rng, depth + 1)}


class Tally:
    """Outcomes by surface: accepted, ValidationError, or anything else (a failure)."""

    def __init__(self):
        self.counts = Counter()
        self.failures = []

    def call(self, surface, fn, value):
        try:
            fn()
        except ValidationError as e:
            self.counts[surface, "ValidationError"] += 1
            if not str(e).strip():
                self.failures.append((surface, "ValidationError without a message", _show(value)))
            return False
        except Exception as e:  # noqa: BLE001 - any other type is what this test is for
            self.counts[surface, type(e).__name__] += 1
            self.failures.append((surface, f"{type(e).__name__}: {_short(e)}", _show(value)))
            return False
        self.counts[surface, "accepted"] += 1
        return True

    def report(self):
        by_surface = Counter()
        for (surface, outcome), n in self.counts.items():
            by_surface[outcome] += n
        print("outcomes:", dict(by_surface), "by surface:", dict(sorted(self.counts.items())))
        return by_surface


def _short(e):
    try:
        return str(e)[:120]
    except Exception:  # noqa: BLE001
        return type(e).__name__


def _show(value):
    try:
        return repr(value)[:100]
    except Exception:  # noqa: BLE001 - deep or unprintable values
        return f"<{type(value).__name__}>"


def test_model_surfaces_raise_only_validation_error():
    rng = random.Random(7)
    tally = Tally()
    models = [StreamDiffusionParams, ControlNetConfig, IPAdapterConfig]
    cn_fields = list(ControlNetConfig(model_id="x").model_dump())
    ip_fields = list(IPAdapterConfig().model_dump())
    fields_of = {StreamDiffusionParams: FIELDS, ControlNetConfig: cn_fields, IPAdapterConfig: ip_fields}
    for i in range(2400):
        model = models[i % 3]
        value = hostile(rng)
        field = rng.choice(fields_of[model])
        step = i // 3 % 6
        if step == 0:
            tally.call("constructor", lambda: model(**{field: value}), value)
        elif step == 1:
            tally.call("model_validate", lambda: model.model_validate(value), value)
        elif step == 2:
            tally.call("model_validate_json", lambda: model.model_validate_json(value), value)
        elif step == 3:
            context = hostile(rng) if rng.random() < 0.5 else {rng.choice(SETTINGS): value}
            tally.call("context", lambda: StreamDiffusionParams.model_validate({}, context=context), context)
        elif step == 4:
            obj = model(model_id="x") if model is ControlNetConfig else model()
            before = obj.model_dump()
            if not tally.call("assignment", lambda: setattr(obj, field, value), value):
                assert obj.model_dump() == before, f"a refused assignment of {field} changed the model"
        else:
            obj = StreamDiffusionParams()
            tally.call("model_copy", lambda: obj.model_copy(update=value), value)
    outcomes = tally.report()
    assert tally.failures == [], tally.failures[:10]
    assert sum(outcomes.values()) == 2400
    # The generator is hostile: most inputs are refused, some are valid by design.
    assert outcomes["ValidationError"] > 1500 and outcomes["accepted"] > 50, outcomes


def test_pipeline_surfaces_raise_only_validation_error(tiny_body, tiny_settings):
    """params, settings and options of the constructors, and update_params(**changes) on a live
    StreamDiffusion and Engine (a refused update keeps the parameters)."""
    rng = random.Random(11)
    tally = Tally()
    plain_options = {"warmup": False}

    def not_a_model(value):
        # An existing folder or a known id is a valid model_id / vae / model_root: whether it
        # loads is not a validation question (and a known id would be fetched from the hub),
        # so the generator's "..", "/" and "stabilityai/sd-turbo" are replaced here.
        return not (isinstance(value, str) and value and (os.path.isdir(value) or "/" in value))

    with StreamDiffusion(tiny_body, **tiny_settings) as stream, \
            Engine(tiny_body, options=plain_options, **tiny_settings) as engine:
        for i in range(900):
            value = hostile(rng)
            if not not_a_model(value):
                value = "\ud800"
            field = rng.choice(FIELDS)
            target = stream if i % 2 == 0 else engine
            surface = type(target).__name__
            before = target.params
            if i % 3 == 0:
                ok = tally.call(f"{surface}.update_params(params)", lambda: target.update_params(value), value)
            else:
                ok = tally.call(f"{surface}.update_params(**changes)",
                                lambda: target.update_params(**{field: value}), value)
            if not ok:
                assert target.params == before, "a refused update changed the parameters"
            elif target.params.model_dump() != before.model_dump():
                target.update_params(before)  # back to the tiny body for the next input

        for i in range(150):
            value = hostile(rng)
            if not not_a_model(value):
                value = b"\xff"
            key = rng.choice(SETTINGS)
            cls = StreamDiffusion if i % 2 == 0 else Engine
            extra = {"options": plain_options} if cls is Engine else {}
            if i % 3 == 0:
                fn = lambda: cls(value, model=TINY_MODEL, **extra, **tiny_settings).close()  # noqa: E731
                tally.call(f"{cls.__name__}(params)", fn, value)
            elif i % 3 == 1:
                settings = dict(tiny_settings, **{key: value})
                fn = lambda: cls(tiny_body, **extra, **settings).close()  # noqa: E731
                tally.call(f"{cls.__name__}(**settings)", fn, value)
            else:
                options = value if rng.random() < 0.4 else {rng.choice(OPTIONS): value}
                fn = lambda: Engine(tiny_body, options=options, **tiny_settings).close()  # noqa: E731
                tally.call("Engine(options)", fn, options)
            fn = lambda: cls(tiny_body, model=value, **extra, **tiny_settings).close()  # noqa: E731
            tally.call(f"{cls.__name__}(model)", fn, value)

        # Still serving, with the parameters it had.
        assert stream.params.prompt == tiny_body["prompt"]
        assert engine.params.prompt == tiny_body["prompt"]
    outcomes = tally.report()
    assert tally.failures == [], tally.failures[:10]
    assert sum(outcomes.values()) == 900 + 300
    assert outcomes["ValidationError"] > 700 and outcomes["accepted"] > 20, outcomes


@pytest.mark.parametrize("text", [b"\xff\xfe", b'{"prompt": "\xe9t\xe9"}', "{\"prompt\": \"\ud800\"}",
                                  '{"prompt": "\\ud800"}', 42, None, ["{}"]])
def test_bad_json_texts_name_what_was_wrong(text):
    with pytest.raises(ValidationError, match="invalid JSON") as e:
        StreamDiffusionParams.model_validate_json(text)
    assert type(e.value) is ValidationError


def test_deep_and_self_containing_values():
    cycle = {"prompt": "a"}
    cycle["lora_dict"] = cycle
    with pytest.raises(ValidationError, match="contains itself at lora_dict"):
        StreamDiffusionParams.model_validate(cycle)
    with pytest.raises(ValidationError, match="nested more than 128 levels deep"):
        StreamDiffusionParams(prompt=_deep_list(10_000))
    with pytest.raises(ValidationError, match=r"set is not a JSON value at prompt\[0\]"):
        StreamDiffusionParams(prompt=[{"a"}])
    with pytest.raises(ValidationError, match="object keys must be strings; got int at lora_dict"):
        StreamDiffusionParams(lora_dict={1: 1.0})
    # Within the core's depth, nesting is fine (preprocessor parameters are free-form).
    params = {"k": _nested(100, lambda: 1)}
    cn = ControlNetConfig(model_id="x", preprocessor_params=params)
    assert cn.preprocessor_params == params
