"""A tiny SDXL pipeline and what diffusers' StableDiffusionXLPipeline computes for its
conditioning.

Writes (under tests/fixtures/):
  tiny-sdxl/                  an SDXL-shaped pipeline: tokenizer (pads with the end token) and
                              tokenizer_2 (pads with "!", id 0) as in sdxl-turbo, CLIPTextModel
                              (quick_gelu) and CLIPTextModelWithProjection (gelu, eos_token_id 2),
                              a UNet with SDXL's text_time added conditioning whose cross-attention
                              width is the two encoders' widths together, and an SDXL-shaped
                              AutoencoderKL (scaling_factor 0.13025, force_upcast) as its vae;
  tiny-taesdxl/               an AutoencoderTiny with madebyollin/taesdxl's config (the `taesd`
                              choice for SDXL), its own random weights;
  tiny-sdxl-controlnet/       ControlNetModel.from_unet(tiny-sdxl's UNet): SDXL's text_time added
                              conditioning, as xinsir's SDXL nets; random zero convs and
                              conditioning embedding;
  golden/sdxl_controlnet_net.safetensors, golden/sdxl_autoencoders.safetensors
                              the net's residuals with added conditioning, and both autoencoders'
                              encode/decode (diffusers);
  golden/sdxl_conditioning.safetensors
                              `encode_prompt`'s prompt embeddings (both encoders' penultimate
                              hidden states, concatenated) and pooled embeddings for a prompt and a
                              negative prompt, `_get_add_time_ids` for a 64x96 stream, and the UNet's
                              output with that added conditioning;
  golden/stream_sdxl_<case>.safetensors
                              the reference stream (streamdiffusion 0.1.1) on the tiny SDXL pipeline
                              with TAESD, its UNet given SDXL's added conditioning row by row (the
                              pooled embedding of the prompt or negative prompt each row carries,
                              and the stream's time ids): 0.1.1 has no SDXL path of its own, so this
                              is its arithmetic with what SDXL's UNet needs added;
  golden/stream_sdxl_cn_<case>.safetensors, golden/streams_sdxl_controlnet.json
                              the same reference stream arithmetic with the SDXL ControlNet's
                              residuals (the net given the row's added conditioning too), TAESDXL
                              or the SDXL VAE, every cfg type;
  lora/sdxl-kohya/, golden/sdxl_lora.safetensors
                              a kohya LoRA with UNet and both text encoders' keys, and the
                              conditioning and UNet output with it fused (see stage_lora).

Run from the repository root with the reference environment (tests/reference/README.md), after
make_fixtures.py and make_controlnet_fixtures.py:
"$REFENV/bin/python" tests/reference/make_sdxl_fixtures.py [--stage STAGE]
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

SDXL_DIR = FIXTURES / "tiny-sdxl"
TAESDXL_DIR = FIXTURES / "tiny-taesdxl"
SDXL_NET_DIR = FIXTURES / "tiny-sdxl-controlnet"
SDXL_VAE_SCALING = 0.13025  # stabilityai/sdxl-turbo's vae/config.json
PROMPT = "a watercolor of a lighthouse"
NEGATIVE = "blurry"
HEIGHT, WIDTH = 64, 96


def text_encoders():
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    first = make_text_encoder_config()
    first.hidden_act = "quick_gelu"  # CLIP ViT-L/14, as SDXL's first encoder
    first.eos_token_id = 49407
    torch.manual_seed(51)
    one = CLIPTextModel(first).eval()
    second = make_text_encoder_config()
    second.hidden_size = 48
    second.intermediate_size = 96
    second.num_attention_heads = 4
    second.projection_dim = 24
    second.eos_token_id = 2  # as sdxl-turbo's text_encoder_2 config
    torch.manual_seed(52)
    two = CLIPTextModelWithProjection(second).eval()
    return one, two


def make_unet(cross_attention_dim: int, projection_dim: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(53)
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=time_embed_dim * 6 + projection_dim,
        transformer_layers_per_block=(1, 2),
        norm_num_groups=32,
    )
    jitter_norms(unet, torch.Generator().manual_seed(54))
    return unet.eval()


def make_sdxl_vae():
    """SDXL's AutoencoderKL in miniature: four levels (scale factor 8), SDXL's scaling factor and
    force_upcast (its VAE overflows float16, so pipelines decode it in float32)."""
    from diffusers import AutoencoderKL

    from _common import scale_vae_mean

    torch.manual_seed(56)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 64), layers_per_block=1, act_fn="silu", latent_channels=4,
        norm_num_groups=32, sample_size=64, scaling_factor=SDXL_VAE_SCALING, force_upcast=True,
    )
    scale_vae_mean(vae)
    return vae.eval()


def make_taesdxl() -> None:
    """madebyollin/taesdxl's config (the same shape as taesd's) with its own random weights."""
    from diffusers import AutoencoderTiny

    from _common import tune_taesd

    if TAESDXL_DIR.exists():
        shutil.rmtree(TAESDXL_DIR)
    torch.manual_seed(57)
    taesd = AutoencoderTiny(
        in_channels=3, out_channels=3,
        encoder_block_out_channels=(16, 16, 16, 16), decoder_block_out_channels=(16, 16, 16, 16),
        act_fn="relu", latent_channels=4, upsampling_scaling_factor=2,
        num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1),
        latent_magnitude=3, latent_shift=0.5, force_upcast=False, scaling_factor=1.0,
    )
    tune_taesd(taesd, 58)
    taesd.save_pretrained(TAESDXL_DIR, safe_serialization=True)


def load_taesdxl():
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(TAESDXL_DIR, torch_dtype=torch.float32).eval()


def save_encoder(model, folder: Path) -> None:
    """float16 on disk with transformers 4's `text_model.` keys (as the published files)."""
    model.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    model.float()
    weights = load_file(folder / "model.safetensors")
    renamed = {}
    for k, v in weights.items():
        top = k.startswith(("text_model.", "text_projection."))
        renamed[k if top else f"text_model.{k}"] = v.contiguous()
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})


def make_tiny_sdxl() -> None:
    if SDXL_DIR.exists():
        shutil.rmtree(SDXL_DIR)
    SDXL_DIR.mkdir(parents=True)
    shutil.copytree(SD_DIR / "scheduler", SDXL_DIR / "scheduler")
    # tokenizer: pads with the end token (SD 1.5's); tokenizer_2: sd-turbo's, pads with "!".
    shutil.copytree(SD_DIR / "tokenizer", SDXL_DIR / "tokenizer_2")
    shutil.copytree(SD_DIR / "tokenizer", SDXL_DIR / "tokenizer")
    for name in ["special_tokens_map.json", "tokenizer_config.json"]:
        path = SDXL_DIR / "tokenizer" / name
        text = path.read_text().replace('"pad_token": "!"', '"pad_token": "<|endoftext|>"')
        config = json.loads(text)
        if isinstance(config.get("pad_token"), dict):
            config["pad_token"]["content"] = "<|endoftext|>"
        write_json(path, config)
    # vocab.json and merges.txt are what a CLIP tokenizer needs; tokenizer.json would double them.
    for name in ["tokenizer", "tokenizer_2"]:
        (SDXL_DIR / name / "tokenizer.json").unlink(missing_ok=True)
    one, two = text_encoders()
    save_encoder(one, SDXL_DIR / "text_encoder")
    save_encoder(two, SDXL_DIR / "text_encoder_2")
    unet = make_unet(one.config.hidden_size + two.config.hidden_size, two.config.projection_dim)
    unet.save_pretrained(SDXL_DIR / "unet", safe_serialization=True)
    make_sdxl_vae().save_pretrained(SDXL_DIR / "vae", safe_serialization=True)
    write_json(SDXL_DIR / "model_index.json", {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.42.1",
        "force_zeros_for_empty_prompt": False,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })


def load_pipeline():
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(SDXL_DIR / "vae", torch_dtype=torch.float32).eval(),
        text_encoder=CLIPTextModel.from_pretrained(SDXL_DIR / "text_encoder", torch_dtype=torch.float32),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(SDXL_DIR / "text_encoder_2",
                                                                   torch_dtype=torch.float32),
        tokenizer=CLIPTokenizer.from_pretrained(SDXL_DIR / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(SDXL_DIR / "tokenizer_2"),
        unet=UNet2DConditionModel.from_pretrained(SDXL_DIR / "unet"),
        scheduler=EulerDiscreteScheduler.from_pretrained(SDXL_DIR / "scheduler"),
        force_zeros_for_empty_prompt=False,
    )
    pipe.unet.eval()
    return pipe


def main() -> None:
    make_tiny_sdxl()
    pipe = load_pipeline()
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=NEGATIVE)
        projection_dim = int(pooled.shape[-1])
        time_ids = pipe._get_add_time_ids((HEIGHT, WIDTH), (0, 0), (HEIGHT, WIDTH), dtype=torch.float32,
                                          text_encoder_projection_dim=projection_dim)
        ids_1 = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
        ids_2 = pipe.tokenizer_2(PROMPT, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
        g = torch.Generator().manual_seed(55)
        sample = torch.randn(2, 4, HEIGHT // 8, WIDTH // 8, generator=g)
        timesteps = torch.tensor([999, 499], dtype=torch.int64)
        context = torch.cat([embeds, negative])
        added = {"text_embeds": torch.cat([pooled, negative_pooled]), "time_ids": time_ids.repeat(2, 1)}
        out = pipe.unet(sample, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample
    assert embeds.shape == (1, 77, 32 + 48), embeds.shape
    assert int(ids_2[0, -1]) == 0 and int(ids_1[0, -1]) == 49407, "the two tokenizers pad differently"
    save_golden("sdxl_conditioning.safetensors", {
        "input_ids": ids_1.to(torch.int64),
        "input_ids_2": ids_2.to(torch.int64),
        "prompt_embeds": embeds,
        "negative_prompt_embeds": negative,
        "pooled_prompt_embeds": pooled,
        "negative_pooled_prompt_embeds": negative_pooled,
        "add_time_ids": time_ids,
        "sample": sample,
        "timesteps": timesteps,
        "unet_output": out,
    }, {"prompt": PROMPT, "negative_prompt": NEGATIVE, "height": HEIGHT, "width": WIDTH})
    print("wrote", SDXL_DIR, "golden/sdxl_conditioning.safetensors", tuple(embeds.shape),
          tuple(pooled.shape), time_ids.tolist())


# Cases of the stream golden: overrides of make_fixtures.STREAM_DEFAULTS (64x64, TAESD).
STREAM_CASES = {
    "self_t3": dict(),
    "full_t2": dict(cfg_type="full", t_index_list=[12, 32]),
    "initialize_t3": dict(cfg_type="initialize"),
}


class UNetWithAddedConditioning(torch.nn.Module):
    """The stream's UNet with SDXL's added conditioning: each row's pooled embedding is that of
    the text whose embedding the row carries (prompt or negative prompt); time ids for all rows."""

    def __init__(self, unet, texts, time_ids):
        super().__init__()
        self.unet, self.texts, self.time_ids = unet, texts, time_ids

    def forward(self, x, t, encoder_hidden_states=None, return_dict=True, **kwargs):
        pooled = []
        for row in encoder_hidden_states:
            match = [p for e, p in self.texts if torch.equal(row, e[0])]
            assert len(match) == 1, "a UNet row carries neither the prompt nor the negative prompt"
            pooled.append(match[0][0])
        added = {"text_embeds": torch.stack(pooled),
                 "time_ids": self.time_ids.repeat(len(pooled), 1)}
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                         return_dict=return_dict, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.unet, name)


def stage_stream() -> None:
    import make_fixtures
    from make_fixtures import STREAM_DEFAULTS, drive_stream, frame_files

    make_fixtures.load_sd_pipeline = load_pipeline  # drive_stream builds its pipe with it
    manifest = []
    for name, overrides in STREAM_CASES.items():
        settings = dict(STREAM_DEFAULTS, **overrides)
        settings["frames"] = frame_files()[: settings["num_frames"]]

        def setup(stream, settings=settings):
            with torch.no_grad():
                embeds, negative, pooled, negative_pooled = stream.pipe.encode_prompt(
                    settings["prompt"], device="cpu", num_images_per_prompt=1,
                    do_classifier_free_guidance=True, negative_prompt=settings["negative_prompt"])
                time_ids = stream.pipe._get_add_time_ids(
                    (settings["height"], settings["width"]), (0, 0),
                    (settings["height"], settings["width"]), dtype=torch.float32,
                    text_encoder_projection_dim=int(pooled.shape[-1]))
            stream.unet = UNetWithAddedConditioning(
                stream.unet, [(embeds, pooled), (negative, negative_pooled)], time_ids)

        with torch.no_grad():
            _, prepared, outputs, _ = drive_stream(settings, setup)
        file = f"stream_sdxl_{name}.safetensors"
        save_golden(file, {"init_noise": prepared["init_noise"], "output": torch.cat(outputs)})
        manifest.append({"name": name, "file": f"golden/{file}", **{
            k: settings[k] for k in ["prompt", "negative_prompt", "seed", "t_index_list",
                                     "num_inference_steps", "guidance_scale", "delta", "cfg_type",
                                     "width", "height", "frames"]}})
        print(f"stream {name}: {len(outputs)} frames, output std {torch.cat(outputs).std():.3f}")
    write_json(FIXTURES / "golden" / "streams_sdxl.json", {"cases": manifest})


SDXL_LORA = FIXTURES / "lora" / "sdxl-kohya" / "pytorch_lora_weights.safetensors"
SDXL_LORA_WEIGHT = 0.8


def stage_lora() -> None:
    """A kohya LoRA for the tiny SDXL pipeline (lora_unet_, lora_te1_, lora_te2_ keys) fused at
    0.8. The golden is the fusion written out (W += w * alpha / r * up @ down: what diffusers'
    fuse_lora computed to the last bit for SD 1.5's UNet and text encoder in
    make_lora_fixtures.py), checked against diffusers' load_lora_weights + fuse_lora for the UNet.
    For the text encoders of an SDXL pipeline, diffusers 0.42.1 with transformers 5.23 does not
    give the fusion: loading the LoRA reports the encoders' base weights missing and their hidden
    states move by ~2e-2 from the written-out fusion, so the golden does not use it there (the
    script prints the gap)."""
    from make_lora_fixtures import kohya_name, lora_pair, target_layers

    base_pipe = load_pipeline()
    g = torch.Generator().manual_seed(61)
    state, keys = {}, []
    for model, prefix, targets in [
        # Not add_embedding: diffusers' kohya reader leaves such keys out.
        (base_pipe.unet, "lora_unet_", ["to_q", "to_v", "to_out.0", "ff.net.2", "conv1",
                                        "time_emb_proj"]),
        (base_pipe.text_encoder, "lora_te1_", ["q_proj", "fc1"]),
        (base_pipe.text_encoder_2, "lora_te2_", ["k_proj", "out_proj", "fc2"]),
    ]:
        for name, module in target_layers(model, targets):
            down, up = lora_pair(g, module.weight.shape[0], module.weight.shape[1:])
            # kohya names CLIP modules with transformers 4's text_model level.
            key = (prefix + name.replace(".", "_") if prefix == "lora_unet_"
                   else kohya_name("lora_te_", name).replace("lora_te_", prefix, 1))
            state[f"{key}.lora_down.weight"] = down.contiguous()
            state[f"{key}.lora_up.weight"] = up.contiguous()
            state[f"{key}.alpha"] = torch.tensor(2.0)
            keys.append(key)
    SDXL_LORA.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, SDXL_LORA)
    gold = load_file(FIXTURES / "golden" / "sdxl_conditioning.safetensors")

    def text(pipe):
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
        return embeds, pooled

    def unet_out(pipe):
        # The UNet on the conditioning golden's own inputs, so it is checked apart from the text.
        added = {"text_embeds": torch.cat([gold["pooled_prompt_embeds"],
                                           gold["negative_pooled_prompt_embeds"]]),
                 "time_ids": gold["add_time_ids"].repeat(2, 1)}
        context = torch.cat([gold["prompt_embeds"], gold["negative_prompt_embeds"]])
        with torch.no_grad():
            return pipe.unet(gold["sample"], gold["timesteps"], encoder_hidden_states=context,
                             added_cond_kwargs=added).sample

    by_hand = load_pipeline()
    modules = {}
    for model, prefix in [(by_hand.unet, "lora_unet_"), (by_hand.text_encoder, "lora_te1_"),
                          (by_hand.text_encoder_2, "lora_te2_")]:
        for name, module in model.named_modules():
            modules[prefix + name.replace(".", "_")] = module
            if prefix != "lora_unet_":
                modules[kohya_name("lora_te_", name).replace("lora_te_", prefix, 1)] = module
    for key in keys:
        down, up = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"]
        module = modules[key]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)
        with torch.no_grad():
            module.weight += SDXL_LORA_WEIGHT * 2.0 / down.shape[0] * delta
    embeds, pooled = text(by_hand)
    out = unet_out(by_hand)

    fused = load_pipeline()
    fused.load_lora_weights(str(SDXL_LORA.parent), weight_name=SDXL_LORA.name, adapter_name="x")
    fused.set_adapters(["x"], adapter_weights=[SDXL_LORA_WEIGHT])
    fused.fuse_lora(components=["unet", "text_encoder"], adapter_names=["x"])
    with torch.no_grad():
        ids = fused.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
        first_theirs = fused.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        first_ours = by_hand.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    base_embeds, base_pooled = text(base_pipe)
    checks = {
        "UNet, diffusers vs by hand": (unet_out(fused) - out).abs().max().item(),
        "text encoder 1, diffusers vs by hand": (first_theirs - first_ours).abs().max().item(),
    }
    for what, err in checks.items():
        print(f"sdxl lora {what}: max {err:.2e}")
    assert checks["UNet, diffusers vs by hand"] < 1e-5, checks
    for what, a, b in [("prompt_embeds", embeds, base_embeds), ("pooled", pooled, base_pooled),
                       ("unet_output", out, unet_out(base_pipe))]:
        change = (a - b).abs().mean().item()
        print(f"sdxl lora changes {what}: mean {change:.3f}")
        assert change > 1e-3, (what, change)
    save_golden("sdxl_lora.safetensors", {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
                                          "unet_output": out},
                {"lora_weight": SDXL_LORA_WEIGHT, "prompt": PROMPT})


# --------------------------------------------------------------------------------------
# TAESDXL, the SDXL VAE and the SDXL ControlNet
# --------------------------------------------------------------------------------------

def make_sdxl_controlnet() -> None:
    """ControlNetModel.from_unet of the tiny SDXL UNet (text_time added conditioning, as xinsir's
    nets), stored as float16 like the other fixture nets."""
    import os

    from diffusers import ControlNetModel, UNet2DConditionModel

    import make_controlnet_fixtures as mcf

    unet = UNet2DConditionModel.from_pretrained(SDXL_DIR / "unet", torch_dtype=torch.float32)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=mcf.EMBEDDING_CHANNELS)
    assert net.config.addition_embed_type == "text_time" and hasattr(net, "add_embedding")
    mcf.randomize_control_parts(net, 59)
    if SDXL_NET_DIR.exists():
        shutil.rmtree(SDXL_NET_DIR)
    SDXL_NET_DIR.mkdir(parents=True)
    net.to(torch.float16).save_pretrained(SDXL_NET_DIR, variant="fp16", safe_serialization=True)
    for f in SDXL_NET_DIR.iterdir():
        os.chmod(f, 0o644)


def load_sdxl_controlnet():
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(SDXL_NET_DIR, variant="fp16",
                                           torch_dtype=torch.float16).float().eval()


def stage_networks() -> None:
    """The SDXL ControlNet alone (with added conditioning), TAESDXL and the SDXL VAE."""
    gold = load_file(FIXTURES / "golden" / "sdxl_conditioning.safetensors")
    g = torch.Generator().manual_seed(60)
    # 8x12 latents (64x96 pixels): the deepest level stays 4x6.
    sample = torch.randn(2, 4, 8, 12, generator=g)
    timesteps = torch.tensor([759, 359], dtype=torch.int64)
    cond = torch.rand(1, 3, 64, 96, generator=g)
    context = torch.cat([gold["prompt_embeds"], gold["negative_prompt_embeds"]])
    text_embeds = torch.cat([gold["pooled_prompt_embeds"], gold["negative_pooled_prompt_embeds"]])
    time_ids = gold["add_time_ids"].repeat(2, 1)
    net = load_sdxl_controlnet()
    with torch.no_grad():
        down, mid = net(sample, timesteps, encoder_hidden_states=context, controlnet_cond=cond.repeat(2, 1, 1, 1),
                        conditioning_scale=1.0, return_dict=False,
                        added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})
        # The added conditioning must matter, or the check would not test it.
        other, _ = net(sample, timesteps, encoder_hidden_states=context, controlnet_cond=cond.repeat(2, 1, 1, 1),
                       conditioning_scale=1.0, return_dict=False,
                       added_cond_kwargs={"text_embeds": text_embeds.flip(0), "time_ids": time_ids * 2})
    moved = max((a - b).abs().max().item() for a, b in zip(down, other))
    print(f"sdxl controlnet: {len(down)} down residuals, mid std {mid.std():.3f}, "
          f"added conditioning moves them by up to {moved:.3f}")
    assert moved > 1e-2, moved
    tensors = {"sample": sample, "timesteps": timesteps, "controlnet_cond": cond,
               "encoder_hidden_states": context, "text_embeds": text_embeds, "time_ids": time_ids,
               "mid": mid}
    for i, d in enumerate(down):
        tensors[f"down_{i:02d}"] = d
    save_golden("sdxl_controlnet_net.safetensors", tensors)

    from make_fixtures import frames_tensor

    pipe = load_pipeline()
    image = frames_tensor()[:2] * 2 - 1
    latent = torch.randn(2, 4, 8, 8, generator=g) * 3
    with torch.no_grad():
        taesdxl = load_taesdxl()
        out = {
            "image": image, "latent": latent,
            "taesdxl_latents": taesdxl.encode(image).latents,
            "taesdxl_decoded": taesdxl.decode(latent).sample,
            "vae_mean": pipe.vae.encode(image).latent_dist.mean,
            "vae_decoded": pipe.vae.decode(latent / pipe.vae.config.scaling_factor).sample,
        }
    for k, v in out.items():
        print(f"  {k}: {tuple(v.shape)} std {v.std():.3f}")
    save_golden("sdxl_autoencoders.safetensors", out,
                {"vae_scaling_factor": pipe.vae.config.scaling_factor})


class SdxlControlledUNet(UNetWithAddedConditioning):
    """The stream's SDXL UNet with ControlNet residuals: each net runs on the same rows,
    timesteps, text embeddings and added conditioning as the UNet call, its residuals scaled and
    masked by its guidance window (diffusers' keep rule), summed over the nets."""

    def __init__(self, unet, texts, time_ids, stream, nets):
        super().__init__(unet, texts, time_ids)
        self.stream, self.nets = stream, nets
        self.configs, self.control_image = [], None

    def forward(self, x, t, encoder_hidden_states=None, return_dict=True, **kwargs):
        pooled = []
        for row in encoder_hidden_states:
            match = [p for e, p in self.texts if torch.equal(row, e[0])]
            assert len(match) == 1
            pooled.append(match[0][0])
        added = {"text_embeds": torch.stack(pooled), "time_ids": self.time_ids.repeat(len(pooled), 1)}
        steps = self.stream.sub_timesteps_tensor.tolist()
        rows = [steps.index(v) for v in t.tolist()]
        n = len(self.stream.t_list)
        down_sum = mid_sum = None
        for cfg in self.configs:
            if not cfg["enabled"] or cfg["conditioning_scale"] == 0:
                continue
            s, e = cfg["control_guidance_start"], cfg["control_guidance_end"]
            keep = [not (i / n < s or (i + 1) / n > e) for i in rows]
            if not any(keep):
                continue
            down, mid = self.nets[cfg["model_id"]](
                x, t, encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=self.control_image.repeat(x.shape[0], 1, 1, 1), conditioning_scale=1.0,
                added_cond_kwargs=added, return_dict=False)
            mask = torch.tensor(keep, dtype=x.dtype).view(-1, 1, 1, 1) * cfg["conditioning_scale"]
            down, mid = [d * mask for d in down], mid * mask
            if down_sum is None:
                down_sum, mid_sum = down, mid
            else:
                down_sum, mid_sum = [a + b for a, b in zip(down_sum, down)], mid_sum + mid
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
                         down_block_additional_residuals=down_sum, mid_block_additional_residual=mid_sum,
                         return_dict=return_dict, **kwargs)


NET_ID = "tiny-sdxl-controlnet"
# Overrides of make_fixtures.STREAM_DEFAULTS (64x64); `vae`: "taesdxl" (tiny-taesdxl), "taesd"
# (tiny-taesd) or "full" (tiny-sdxl's own VAE). The first is the camera app's shape (one canny
# net at 0.3, here with the frame itself as the control image).
CN_STREAM_CASES = {
    "cn_self_t3_taesdxl": dict(vae="taesdxl", controlnets=[dict(model_id=NET_ID, conditioning_scale=0.3)]),
    "cn_window_full_t2": dict(cfg_type="full", t_index_list=[12, 32], controlnets=[
        dict(model_id=NET_ID, conditioning_scale=0.5, control_guidance_end=0.5)]),
    "cn_initialize_t3_fullvae": dict(cfg_type="initialize", vae="full", controlnets=[
        dict(model_id=NET_ID, conditioning_scale=0.7, control_guidance_start=0.3)]),
    "none_t2_fullvae": dict(cfg_type="none", t_index_list=[16, 32], vae="full", controlnets=[]),
    "cn_none_t3_nobatch_taesdxl": dict(cfg_type="none", use_denoising_batch=False, vae="taesdxl",
                                       controlnets=[dict(model_id=NET_ID, conditioning_scale=0.3)]),
}


def stage_controlnet_streams() -> None:
    import numpy as np

    import make_controlnet_fixtures as mcf
    import make_fixtures
    from make_fixtures import STREAM_DEFAULTS, drive_stream, frame_files

    make_fixtures.load_sd_pipeline = load_pipeline
    nets = {NET_ID: load_sdxl_controlnet()}
    manifest = []
    for name, overrides in CN_STREAM_CASES.items():
        settings = dict(STREAM_DEFAULTS, **overrides)
        settings["frames"] = frame_files()[: settings["num_frames"]]
        settings["controlnets"] = [dict(mcf.NET_DEFAULTS, **c) for c in settings["controlnets"]]
        holder = {}

        def setup(stream, settings=settings, holder=holder):
            if settings["vae"] == "taesdxl":
                stream.vae = load_taesdxl()
            with torch.no_grad():
                embeds, negative, pooled, negative_pooled = stream.pipe.encode_prompt(
                    settings["prompt"], device="cpu", num_images_per_prompt=1,
                    do_classifier_free_guidance=True, negative_prompt=settings["negative_prompt"])
                time_ids = stream.pipe._get_add_time_ids(
                    (settings["height"], settings["width"]), (0, 0),
                    (settings["height"], settings["width"]), dtype=torch.float32,
                    text_encoder_projection_dim=int(pooled.shape[-1]))
            unet = SdxlControlledUNet(stream.unet, [(embeds, pooled), (negative, negative_pooled)],
                                      time_ids, stream, nets)
            unet.configs = [dict(c) for c in settings["controlnets"]]
            holder["unet"] = unet
            stream.unet = unet

        def before_frame(k, stream, frame, holder=holder):
            image = np.asarray(frame, dtype=np.float32) / 255.0
            holder["unet"].control_image = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).contiguous()

        with torch.no_grad():
            _, prepared, outputs, patches = drive_stream(settings, setup, before_frame)
        out = torch.cat(outputs)
        file = f"stream_sdxl_{name}.safetensors"
        tensors = {"init_noise": prepared["init_noise"], "output": out}
        if patches.randn_like_draws:
            # The step-by-step path re-noises with torch's global generator: keep its draws per
            # frame (as make_fixtures.py's step_noise).
            per_frame = len(patches.randn_like_draws) // settings["num_frames"]
            tensors["step_noise"] = torch.stack(patches.randn_like_draws).view(
                settings["num_frames"], per_frame, *patches.randn_like_draws[0].shape)
        save_golden(file, tensors)
        manifest.append({"name": name, "file": f"golden/{file}", **{
            k: settings[k] for k in ["prompt", "negative_prompt", "seed", "t_index_list",
                                     "num_inference_steps", "guidance_scale", "delta", "cfg_type",
                                     "width", "height", "frames", "vae", "controlnets",
                                     "use_denoising_batch", "do_add_noise"]}})
        print(f"stream {name}: {len(outputs)} frames, output std {out.std():.3f}")
    write_json(FIXTURES / "golden" / "streams_sdxl_controlnet.json", {
        "description": "The reference stream arithmetic (streamdiffusion 0.1.1) on tiny-sdxl with SDXL's "
                       "added conditioning, the SDXL ControlNet tiny-sdxl-controlnet (a folder under "
                       "tests/fixtures) given the same added conditioning, control image = the input frame "
                       "in [0, 1]; vae taesdxl = tiny-taesdxl, full = tiny-sdxl/vae. See "
                       "tests/reference/make_sdxl_fixtures.py.",
        "cases": manifest,
    })


STAGES = {
    "conditioning": lambda: main(),
    "streams": lambda: stage_stream(),
    "lora": lambda: stage_lora(),
    "autoencoders": lambda: make_taesdxl(),
    "controlnet": lambda: make_sdxl_controlnet(),
    "networks": lambda: stage_networks(),
    "controlnet-streams": lambda: stage_controlnet_streams(),
}


if __name__ == "__main__":
    import argparse

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="all", choices=["all", *STAGES])
    chosen = parser.parse_args().stage
    for stage, run in STAGES.items():
        if chosen in ("all", stage):
            print(f"[{stage}]")
            run()
