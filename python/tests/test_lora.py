"""LoRAs picked by the body alone: `lora_dict` and, on the SD 1.5-shaped tiny checkpoint
(tests/fixtures/tiny-sd15), `use_lcm_lora` + `lcm_lora_id` change the output; the Engine gives
the synchronous stream's bytes; a LoRA made for another model is refused naming its layer."""

import numpy as np
import pytest

from sdstream import Engine, StreamDiffusion

from conftest import FIXTURES, TINY_BODY, TINY_SETTINGS

SD15 = str(FIXTURES / "tiny-sd15")
PEFT_A = str(FIXTURES / "lora" / "peft-a")
LCM = str(FIXTURES / "lora" / "lcm-kohya")


def body(**changes):
    return {**TINY_BODY, "model_id": SD15, "use_lcm_lora": False, **changes}


def mean_diff(a, b):
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def test_lora_dict_and_lcm_lora_change_the_output(frames):
    with StreamDiffusion(body(), **TINY_SETTINGS) as plain:
        without = plain(frames[0])
    with_loras = body(use_lcm_lora=True, lcm_lora_id=LCM, lora_dict={PEFT_A: 0.7})
    with StreamDiffusion(with_loras, **TINY_SETTINGS) as s:
        fused = s(frames[0])
    with Engine(with_loras, options={"warmup": False}, **TINY_SETTINGS) as engine:
        from_engine = engine.process(frames[0]).image
    levels = mean_diff(fused, without)
    print(f"LCM-LoRA + peft-a at 0.7 vs no LoRA: mean {levels:.2f} levels")
    assert levels > 1.0
    assert np.array_equal(from_engine, fused), mean_diff(from_engine, fused)


def test_a_lora_for_another_model_is_refused_naming_its_layer():
    # peft-a patches the SD 1.5-shaped UNet; the tiny sd-turbo's layers have other widths.
    turbo = dict(TINY_BODY, lora_dict={PEFT_A: 1.0})
    with pytest.raises(RuntimeError) as caught:
        StreamDiffusion(turbo, **TINY_SETTINGS)
    message = str(caught.value)
    assert "peft-a" in message and "does not fit" in message, message
