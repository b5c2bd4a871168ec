"""Golden vectors for sdstream's LCM scheduler grid and per-step coefficients
(core/src/pipeline/scheduler.rs).

Writes tests/fixtures/scheduler/lcm_golden.json:
* alphas_cumprod of diffusers' LCMScheduler for several scheduler configs (float32 bit patterns);
* LCMScheduler.set_timesteps(N) for every N with original_inference_steps 100 and 50;
* the coefficient tensors that the reference StreamDiffusion.prepare() builds (alpha_prod_t_sqrt,
  beta_prod_t_sqrt, c_skip, c_out), computed by the reference code itself on a stand-in pipeline
  whose only real part is the scheduler config (the text encoder is not needed for these).

Run: python tests/reference/make_scheduler_golden.py   (in the environment of tests/reference/README.md)
"""

import json
from types import SimpleNamespace

import torch
from diffusers import EulerDiscreteScheduler, LCMScheduler
from streamdiffusion import StreamDiffusion

from _common import FIXTURES, hexbits, write_json_dense

OUT = FIXTURES / "scheduler"


def load_sd_turbo_config() -> dict:
    with open(OUT / "sd_turbo_scheduler_config.json") as f:
        return json.load(f)


CONFIGS = {
    # sd-turbo's scheduler config (an Euler config; StreamDiffusion re-reads it as an LCMScheduler).
    "sd_turbo": load_sd_turbo_config(),
    "empty": {},
    "linear": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "scaled_linear_500": {"beta_schedule": "scaled_linear", "beta_start": 0.001, "beta_end": 0.015,
                          "num_train_timesteps": 500},
    "squaredcos": {"beta_schedule": "squaredcos_cap_v2"},
}


def stream_coefficients(config: dict, t_index_list, num_inference_steps: int) -> dict:
    """Runs the reference StreamDiffusion.prepare on a stand-in pipe and reads its tensors."""
    scheduler = EulerDiscreteScheduler.from_config(config)

    def encode_prompt(**_kwargs):
        return torch.zeros(1, 77, 8), torch.zeros(1, 77, 8)

    pipe = SimpleNamespace(
        device=torch.device("cpu"), vae_scale_factor=8, scheduler=scheduler,
        text_encoder=None, unet=None, vae=None, encode_prompt=encode_prompt,
    )
    stream = StreamDiffusion(pipe, t_index_list, torch_dtype=torch.float32, width=64, height=64,
                             cfg_type="none")
    stream.prepare("", num_inference_steps=num_inference_steps, guidance_scale=1.0, seed=2)
    return {
        "t_index_list": t_index_list,
        "num_inference_steps": num_inference_steps,
        "original_inference_steps": stream.scheduler.config.original_inference_steps,
        "timesteps": [int(t) for t in stream.sub_timesteps_tensor.tolist()],
        "alpha_sqrt": hexbits(stream.alpha_prod_t_sqrt),
        "beta_sqrt": hexbits(stream.beta_prod_t_sqrt),
        "c_skip": hexbits(stream.c_skip),
        "c_out": hexbits(stream.c_out),
    }


def main() -> None:
    out = {"configs": [], "timesteps": [], "stream": []}
    for name, config in CONFIGS.items():
        sched = LCMScheduler.from_config(config)
        out["configs"].append({"name": name, "config": config,
                               "alphas_cumprod": hexbits(sched.alphas_cumprod)})
    for original in (100, 50):
        sched = LCMScheduler.from_config(CONFIGS["sd_turbo"])
        for n in range(1, original + 1):
            sched.set_timesteps(n, original_inference_steps=original)
            out["timesteps"].append({"original_inference_steps": original, "num_inference_steps": n,
                                     "timesteps": [int(t) for t in sched.timesteps.tolist()]})
    turbo = CONFIGS["sd_turbo"]
    turbo_s100 = dict(turbo, original_inference_steps=100)
    for config, t_list, n in [
        (turbo, [12, 20, 32], 50),
        (turbo, [0], 50),
        (turbo, [0, 16, 32, 45], 50),
        (turbo, [49], 50),
        (turbo_s100, [0, 1, 2, 3], 4),
        (turbo_s100, [0], 1),
        (turbo_s100, [10, 37, 70, 99], 100),
        (CONFIGS["linear"], [12, 20, 32], 50),
    ]:
        case = stream_coefficients(config, t_list, n)
        case["config"] = config
        out["stream"].append(case)
    write_json_dense(OUT / "lcm_golden.json", out)


if __name__ == "__main__":
    main()
