"""LoRA fixtures: a tiny SD 1.5-shaped checkpoint, tiny LoRAs in the formats LoRAs are published
in, and what diffusers computes with them fused.

Writes (under tests/fixtures/):
  tiny-sd15/                       an SD 1.5-shaped pipeline (CLIP with quick_gelu, a UNet with
                                   convolutional proj_in/proj_out), TAESD-only (vae: [null, null]);
  lora/peft-a/pytorch_lora_weights.safetensors
                                   diffusers/peft keys (`unet.….lora_A.weight`, `text_encoder.…`),
                                   lora_alpha != r recorded in the file's adapter metadata;
  lora/kohya-b/b.safetensors       kohya keys (`lora_unet_…`, `lora_te_…`, `.alpha`), convolutions
                                   included, under a file name of its own (no pytorch_lora_weights);
  lora/lcm-kohya/pytorch_lora_weights.safetensors
                                   UNet-only kohya keys, shaped like the published LCM-LoRA;
  golden/lora.safetensors          the UNet's output and the text encoder's hidden states with no
                                   LoRA, each LoRA alone, and two at once, after diffusers'
                                   `load_lora_weights` + `fuse_lora`.

Run from the repository root with the reference environment (see README.md here; it also needs
`peft`): "$REFENV/bin/python" tests/reference/make_lora_fixtures.py
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FIXTURES, jitter_norms, write_json  # noqa: E402
from make_fixtures import SD_DIR, make_text_encoder_config, save_golden  # noqa: E402

SD15_DIR = FIXTURES / "tiny-sd15"
LORA_DIR = FIXTURES / "lora"
RANK = 4
# The LoRAs applied together, with the weights a stream's lora_dict would give them.
CASES = {
    "peft_a": [("peft-a", 0.7)],
    "kohya_b": [("kohya-b", 1.0)],
    "lcm": [("lcm-kohya", 1.0)],
    "both": [("peft-a", 0.7), ("kohya-b", 1.3)],
}
LORA_FILES = {
    "peft-a": LORA_DIR / "peft-a" / "pytorch_lora_weights.safetensors",
    "kohya-b": LORA_DIR / "kohya-b" / "b.safetensors",
    "lcm-kohya": LORA_DIR / "lcm-kohya" / "pytorch_lora_weights.safetensors",
}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "time_emb_proj", "conv_shortcut"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def make_sd15_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(21)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        # SD 1.5: 8 heads everywhere (diffusers' "attention_head_dim" is the head count), 1x1
        # convolutions for proj_in/proj_out (use_linear_projection false).
        attention_head_dim=2,
        cross_attention_dim=32,
        use_linear_projection=False,
        norm_num_groups=32,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    jitter_norms(unet, torch.Generator().manual_seed(22))
    return unet.eval()


def make_tiny_sd15() -> None:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    if SD15_DIR.exists():
        shutil.rmtree(SD15_DIR)
    SD15_DIR.mkdir(parents=True)
    shutil.copytree(SD_DIR / "tokenizer", SD15_DIR / "tokenizer")
    shutil.copytree(SD_DIR / "scheduler", SD15_DIR / "scheduler")
    # vocab.json and merges.txt are what a CLIP tokenizer needs; tokenizer.json would double them.
    (SD15_DIR / "tokenizer" / "tokenizer.json").unlink()
    config = make_text_encoder_config()
    config.hidden_act = "quick_gelu"  # SD 1.5's CLIP ViT-L/14
    config.eos_token_id = 49407
    torch.manual_seed(23)
    text_encoder = CLIPTextModel(config).eval()
    # float16 on disk, as in the tiny sd-turbo (size; the reference loads it back in float32).
    text_encoder.to(torch.float16).save_pretrained(SD15_DIR / "text_encoder", safe_serialization=True)
    weights = load_file(SD15_DIR / "text_encoder" / "model.safetensors")
    save_file({f"text_model.{k}" if not k.startswith("text_model.") else k: v.contiguous()
               for k, v in weights.items()},
              SD15_DIR / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
    make_sd15_unet().save_pretrained(SD15_DIR / "unet", safe_serialization=True)
    write_json(SD15_DIR / "model_index.json", {
        "_class_name": StableDiffusionPipeline.__name__,
        "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": [None, None],
    })


def load_pipeline():
    """The tiny SD 1.5 pipeline as diffusers loads it (a stand-in VAE: LoRA never touches it)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, latent_channels=4),
        text_encoder=CLIPTextModel.from_pretrained(SD15_DIR / "text_encoder", torch_dtype=torch.float32),
        tokenizer=CLIPTokenizer.from_pretrained(SD15_DIR / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(SD15_DIR / "unet"),
        scheduler=EulerDiscreteScheduler.from_pretrained(SD15_DIR / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return pipe


def lora_pair(generator, out_features, in_shape, rank=RANK, scale=0.35):
    """(down, up) factors: down [r, *in_shape], up [out, r, (1, 1)]."""
    down = torch.randn((rank, *in_shape), generator=generator) * scale / max(1, in_shape[0]) ** 0.5
    up_shape = (out_features, rank) + ((1, 1) if len(in_shape) == 3 else ())
    up = torch.randn(up_shape, generator=generator) * scale / rank ** 0.5
    return down, up


def target_layers(model, targets):
    """(module name, module) of every Linear/Conv2d whose name ends in one of `targets`."""
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and any(
                name == t or name.endswith("." + t) for t in targets):
            yield name, module


def make_peft_a(pipe) -> None:
    """diffusers' own save format: peft keys, alpha in the adapter metadata."""
    from diffusers import StableDiffusionPipeline

    g = torch.Generator().manual_seed(31)
    alpha = 8  # scale alpha / r = 2
    unet, text = {}, {}
    for name, module in target_layers(pipe.unet, ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]):
        down, up = lora_pair(g, module.weight.shape[0], module.weight.shape[1:])
        unet[f"{name}.lora_A.weight"], unet[f"{name}.lora_B.weight"] = down, up
    for name, module in target_layers(pipe.text_encoder, ["q_proj", "v_proj", "fc1"]):
        down, up = lora_pair(g, module.weight.shape[0], module.weight.shape[1:])
        text[f"{name}.lora_A.weight"], text[f"{name}.lora_B.weight"] = down, up
    path = LORA_FILES["peft-a"]
    path.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        path.parent,
        unet_lora_layers=unet,
        text_encoder_lora_layers=text,
        unet_lora_adapter_metadata={"r": RANK, "lora_alpha": alpha,
                                    "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]},
        text_encoder_lora_adapter_metadata={"r": RANK, "lora_alpha": alpha,
                                            "target_modules": ["q_proj", "v_proj", "fc1"]},
        weight_name=path.name,
    )


def kohya_name(prefix: str, module_name: str) -> str:
    # Published kohya files name CLIP's modules as transformers 4 did (text_model.encoder.…);
    # transformers 5 drops the text_model level from module names.
    if prefix == "lora_te_" and not module_name.startswith("text_model."):
        module_name = "text_model." + module_name
    return prefix + module_name.replace(".", "_")


def make_kohya(pipe, key: str, seed: int, unet_targets, text_targets, alpha: float) -> None:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for model, prefix, targets in [(pipe.unet, "lora_unet_", unet_targets),
                                   (pipe.text_encoder, "lora_te_", text_targets)]:
        for name, module in target_layers(model, targets):
            down, up = lora_pair(g, module.weight.shape[0], module.weight.shape[1:])
            base = kohya_name(prefix, name)
            state[f"{base}.lora_down.weight"] = down.contiguous()
            state[f"{base}.lora_up.weight"] = up.contiguous()
            state[f"{base}.alpha"] = torch.tensor(alpha)
    path = LORA_FILES[key]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path)


def manual_fuse(pipe, loras) -> None:
    """W += weight * (alpha / r) * up @ down: the fusion written out, to cross-check diffusers'
    reading of both formats (kohya: alpha per layer; peft: lora_alpha from the metadata)."""
    from safetensors import safe_open

    lookup = {kohya_name("lora_unet_", k): m for k, m in pipe.unet.named_modules()}
    lookup |= {kohya_name("lora_te_", k): m for k, m in pipe.text_encoder.named_modules()}
    lookup |= {f"unet.{k}": m for k, m in pipe.unet.named_modules()}
    lookup |= {f"text_encoder.{k}": m for k, m in pipe.text_encoder.named_modules()}
    for key, weight in loras:
        state = load_file(LORA_FILES[key])
        with safe_open(LORA_FILES[key], "pt") as f:
            metadata = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        for down_key in [k for k in state if k.endswith((".lora_down.weight", ".lora_A.weight"))]:
            if down_key.endswith(".lora_A.weight"):
                name = down_key[: -len(".lora_A.weight")]
                up = state[f"{name}.lora_B.weight"]
                component = name.split(".", 1)[0]
                alpha = metadata[f"{component}.lora_alpha"]
            else:
                name = down_key[: -len(".lora_down.weight")]
                up = state[f"{name}.lora_up.weight"]
                alpha = state[f"{name}.alpha"].item()
            down = state[down_key]
            module = lookup[name]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)
            with torch.no_grad():
                module.weight += weight * alpha / down.shape[0] * delta


def outputs(pipe) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(41)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([759, 259], dtype=torch.int64)
    ids = pipe.tokenizer(["a photo of a cat", "flowers"], padding="max_length", max_length=77,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
        out = pipe.unet(sample, timesteps, encoder_hidden_states=hidden).sample
    return {"sample": sample, "timesteps": timesteps, "input_ids": ids.to(torch.int64),
            "text_embeds": hidden, "unet_output": out}


def fused_outputs(loras) -> dict[str, torch.Tensor]:
    pipe = load_pipeline()
    names = []
    for i, (key, _) in enumerate(loras):
        name = f"l{i}"
        pipe.load_lora_weights(str(LORA_FILES[key].parent), weight_name=LORA_FILES[key].name,
                               adapter_name=name)
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[w for _, w in loras])
    pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=names)
    pipe.unload_lora_weights()  # fused weights stay; the adapters' own layers go
    return outputs(pipe)


def main() -> None:
    make_tiny_sd15()
    pipe = load_pipeline()
    make_peft_a(pipe)
    make_kohya(pipe, "kohya-b", 32, UNET_TARGETS, TEXT_TARGETS, alpha=2.0)
    make_kohya(pipe, "lcm-kohya", 33, UNET_TARGETS, [], alpha=RANK)
    base = outputs(pipe)
    tensors = {f"base.{k}": v for k, v in base.items()}
    for case, loras in CASES.items():
        fused = fused_outputs(loras)
        assert torch.equal(fused["input_ids"], base["input_ids"])
        for k in ("text_embeds", "unet_output"):
            tensors[f"{case}.{k}"] = fused[k]
            change = (fused[k] - base[k]).abs().mean().item() / base[k].abs().mean().item()
            print(f"{case:8s} {k:12s} mean |change| / mean |base| = {change:.3f}")
            assert change > 0.02 or (k == "text_embeds" and case == "lcm"), (case, k, change)
        # Independent check of diffusers' reading of the files: the same weights fused by hand
        # give the same outputs.
        by_hand = load_pipeline()
        manual_fuse(by_hand, loras)
        manual = outputs(by_hand)
        for k in ("text_embeds", "unet_output"):
            err = (manual[k] - fused[k]).abs().max().item()
            print(f"{case:8s} {k:12s} diffusers vs by hand: max abs {err:.2e}")
            assert err < 1e-5, (case, k, err)
    save_golden("lora.safetensors", tensors, {
        "cases": {case: [[key, w] for key, w in loras] for case, loras in CASES.items()},
    })
    meta = json.dumps({k: [[key, w] for key, w in v] for k, v in CASES.items()})
    print("wrote", SD15_DIR, LORA_DIR, "golden/lora.safetensors", meta)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
