#!/usr/bin/env python3
"""Build the tiny test checkpoints and the golden vectors for sdstream's tests.

Everything is deterministic (fixed torch seeds, CPU, float32, one thread) and is
written under tests/fixtures/:

  tiny-sd-turbo/   diffusers folder shaped like stabilityai/sd-turbo, tiny, random weights
  tiny-taesd/      AutoencoderTiny shaped like madebyollin/taesd, tiny, random weights
  frames/          8 synthetic 64x64 RGB input frames (NNN.png)
  golden/          per-network goldens and StreamDiffusion stream goldens

Usage (see tests/reference/README.md):
  python tests/reference/make_fixtures.py [--stage checkpoints|networks|streams|all]
                                          [--bpe PATH/bpe_simple_vocab_16e6.txt.gz]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import tempfile
import time
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import regex
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    FIXTURES, GOLDEN_DIR, HostEvent, jitter_norms, scale_vae_mean, tune_taesd, write_json,
)

torch.set_num_threads(1)  # one thread: bit-stable results, and the machine is shared

SD_DIR = FIXTURES / "tiny-sd-turbo"
TAESD_DIR = FIXTURES / "tiny-taesd"
FRAMES_DIR = FIXTURES / "frames"

NUM_FRAMES = 8
FRAME_SIZE = 64
DTYPE = torch.float32

# --------------------------------------------------------------------------------------
# CLIP BPE vocabulary
# --------------------------------------------------------------------------------------

# OpenAI's CLIP keeps this many merges from the BPE file (49152 - 256 byte tokens - 2 specials).
NUM_CLIP_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


# Where `pip download --no-deps open_clip_torch -d DIR` put the wheel: $SDSTREAM_REF_DL, else
# ref_dl under the system's temporary folder.
REF_DL_VAR = "SDSTREAM_REF_DL"


def download_dir() -> Path:
    value = os.environ.get(REF_DL_VAR, "").strip()
    return Path(value) if value else Path(tempfile.gettempdir()) / "ref_dl"


def find_bpe_file(explicit: str | None) -> Path:
    """Locate bpe_simple_vocab_16e6.txt.gz: an explicit path, or inside an open_clip_torch wheel.

    The wheel comes from `pip download --no-deps open_clip_torch -d DIR` (no install needed), DIR
    being download_dir().
    """
    if explicit:
        return Path(explicit)
    cache = download_dir()
    extracted = cache / "open_clip" / "bpe_simple_vocab_16e6.txt.gz"
    if extracted.exists():
        return extracted
    wheels = sorted(cache.glob("open_clip_torch-*.whl"))
    if not wheels:
        sys.exit(
            f"CLIP BPE file not found: run `pip download --no-deps open_clip_torch -d {cache}` "
            f"(or into the folder named by {REF_DL_VAR}), or pass --bpe PATH"
        )
    with zipfile.ZipFile(wheels[-1]) as wheel:
        wheel.extract("open_clip/bpe_simple_vocab_16e6.txt.gz", cache)
    return extracted


def clip_byte_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 reversible byte -> printable unicode table (printable bytes keep their own code)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    # Order matters for the ids: printable bytes first, then the remapped ones.
    return {b: table[b] for b in printable + [b for b in range(256) if b not in printable]}


def clip_vocab_and_merges(bpe_path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """The 49408-token CLIP vocabulary in id order, and the merges in rank order."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + NUM_CLIP_MERGES]]
    byte_tokens = list(clip_byte_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges] + [BOS, EOS]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408, "unexpected CLIP vocabulary size"
    return vocab, merges


class ClipBpeCheck:
    """Independent, minimal CLIP BPE (NFC, whitespace collapse, lowercase, CLIP regex, BPE).

    Only used to cross-check the files written for the tokenizer; the goldens come from transformers.
    It does not treat "!" as a special token (the HF tokenizer does, because it is sd-turbo's pad token).
    """

    PATTERN = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )

    def __init__(self, vocab: list[str], merges: list[tuple[str, str]]):
        self.ids = {t: i for i, t in enumerate(vocab)}
        self.ranks = {m: r for r, m in enumerate(merges)}
        self.byte_map = clip_byte_to_unicode()

    def bpe(self, word: str) -> list[str]:
        """Merge the lowest-ranked adjacent pair until no known pair is left."""
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            rank, pair = min((self.ranks.get(p, math.inf), p) for p in zip(parts, parts[1:]))
            if rank == math.inf:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str, max_len: int = 77, pad_id: int = 0) -> list[int]:
        text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).lower()
        ids = [self.ids[BOS]]
        for piece in self.PATTERN.findall(text):
            if piece in (BOS, EOS):
                ids.append(self.ids[piece])
                continue
            word = "".join(self.byte_map[b] for b in piece.encode("utf-8"))
            ids += [self.ids[t] for t in self.bpe(word)]
        ids = ids[: max_len - 1] + [self.ids[EOS]]
        return ids + [pad_id] * (max_len - len(ids))


# --------------------------------------------------------------------------------------
# Stage 1: checkpoints and frames
# --------------------------------------------------------------------------------------

# Values as in stabilityai/sd-turbo's scheduler/scheduler_config.json.
SD_TURBO_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    interpolation_type="linear",
    timestep_spacing="trailing",
    steps_offset=1,
    use_karras_sigmas=False,
    trained_betas=None,
)
# Keys of sd-turbo's scheduler config that EulerDiscreteScheduler does not define itself; kept in the
# JSON so the file reads like sd-turbo's (diffusers ignores them).
SD_TURBO_SCHEDULER_EXTRA = dict(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, sample_max_value=1.0)


def make_tokenizer(out_dir: Path, bpe_path: Path) -> None:
    """Tokenizer folder as in sd-turbo (vocab.json, merges.txt, configs) plus a tokenizer.json."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(bpe_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "vocab.json", "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(out_dir / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")

    def added(content: str) -> dict:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}

    # sd-turbo (SD 2.x, OpenCLIP) pads with "!" (id 0); SD 1.5 pads with <|endoftext|>.
    tokenizer_config = {
        "add_prefix_space": False,
        "bos_token": added(BOS),
        "do_lower_case": True,
        "eos_token": added(EOS),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": "!",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added(EOS),
    }
    write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    write_json(out_dir / "special_tokens_map.json",
               {"bos_token": BOS, "eos_token": EOS, "pad_token": "!", "unk_token": EOS})

    # Built from vocab.json + merges.txt only (no tokenizer.json yet), then its fast form is saved.
    tokenizer = CLIPTokenizer.from_pretrained(out_dir)
    tokenizer.backend_tokenizer.save(str(out_dir / "tokenizer.json"), pretty=False)

    # Check: loading the finished folder (now with tokenizer.json) gives the same ids as the
    # vocab/merges build and as an independent BPE implementation.
    reloaded = CLIPTokenizer.from_pretrained(out_dir)
    check = ClipBpeCheck(vocab, merges)
    assert reloaded.pad_token == "!" and reloaded.pad_token_id == 0 and reloaded.model_max_length == 77
    for prompt in TOKENIZER_PROMPTS:
        a = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        b = reloaded(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert a == b, f"tokenizer.json and vocab/merges disagree on {prompt!r}"
        if "!" not in prompt:  # "!" is a special (pad) token for HF, see ClipBpeCheck
            c = check.encode(prompt)
            if c != a:
                print(f"  note: independent BPE differs from transformers on {prompt!r}:\n    {a}\n    {c}")


def make_text_encoder_config():
    from transformers import CLIPTextConfig

    # OpenCLIP ViT-H text tower as in sd-turbo (gelu, eos_token_id 2 like its config), tiny widths.
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        attention_dropout=0.0,
        dropout=0.0,
        initializer_factor=1.0,
        initializer_range=0.02,
    )


# The deterministic rescalings applied after the default random init (VAE_MEAN_SCALE,
# UNET_NORM_JITTER, TAESD_*) live in _common.py: make_full_size.py applies the same ones.


def make_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        # sd-turbo has (320, 640, 1280, 1280). With 8x8 latents the last level runs at 1x1, where
        # GroupNorm(32) needs more than 32 channels (torch rejects one value per group): hence 64 there.
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        # As in sd-turbo, diffusers' "attention_head_dim" here is really the number of heads per level.
        attention_head_dim=(2, 4, 4, 4),
        cross_attention_dim=32,
        use_linear_projection=True,
        upcast_attention=False,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
        downsample_padding=1,
        mid_block_scale_factor=1,
        center_input_sample=False,
        dual_cross_attention=False,
        only_cross_attention=False,
    )
    # Default init leaves every norm at weight 1, bias 0. Then an all-zero input (the stream's
    # zero latent buffer on its first frames) stays spatially constant through the network, each
    # one-channel GroupNorm sees zero variance and normalises float rounding noise instead of a
    # signal: the output becomes chaotic (a 1e-9 perturbation moved ε by ~0.9). Trained checkpoints
    # have non-trivial norm affines; give the fixture some, so its outputs are well-conditioned.
    jitter_norms(unet, torch.Generator().manual_seed(11))
    return unet


def make_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 64),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.18215,
    )
    # With default init the posterior mean is tiny (std ~0.2, i.e. ~0.04 after the 0.18215 scaling),
    # so the input frame would hardly matter downstream. Scale the mean half of quant_conv so scaled
    # latents have std ~0.8, like a real VAE's; the logvar half is left as initialised.
    scale_vae_mean(vae)
    return vae


def make_taesd(out_dir: Path) -> None:
    from diffusers import AutoencoderTiny

    torch.manual_seed(3)
    taesd = AutoencoderTiny(
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        act_fn="relu",
        latent_channels=4,
        upsampling_scaling_factor=2,
        num_encoder_blocks=(1, 3, 3, 3),
        num_decoder_blocks=(3, 3, 3, 1),
        latent_magnitude=3,
        latent_shift=0.5,
        force_upcast=False,
        scaling_factor=1.0,
    )
    # diffusers' default init makes latents nearly the same for every input (frame-to-frame change
    # < 1% of their spread); see _common.tune_taesd (a unit-normal latent then decodes to std ~0.14).
    tune_taesd(taesd, 3)
    taesd.save_pretrained(out_dir, safe_serialization=True)


def make_tiny_sd_turbo(out_dir: Path, bpe_path: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    make_tokenizer(out_dir / "tokenizer", bpe_path)
    tokenizer = CLIPTokenizer.from_pretrained(out_dir / "tokenizer")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(make_text_encoder_config()).eval()
    pipe = StableDiffusionPipeline(
        vae=make_vae().eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=make_unet().eval(),
        scheduler=EulerDiscreteScheduler(**SD_TURBO_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # Text encoder weights in float16 on disk (size, and exercises f16 loading); the rest stays f32.
    # transformers 5 saves CLIPTextModel keys without the "text_model." prefix that sd-turbo's file
    # (written by transformers 4) has; write them with the prefix, which transformers 5 still loads.
    text_encoder.to(torch.float16).save_pretrained(out_dir / "text_encoder", safe_serialization=True)
    weights = load_file(out_dir / "text_encoder" / "model.safetensors")
    save_file({f"text_model.{k}": v.contiguous() for k, v in weights.items()},
              out_dir / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
    # sd-turbo's model_index.json has no image_encoder entry (diffusers 0.42 adds a null one).
    model_index = json.loads((out_dir / "model_index.json").read_text())
    model_index.pop("image_encoder", None)
    write_json(out_dir / "model_index.json", model_index)
    # The pipeline save rewrote the tokenizer folder in transformers' own format: restore sd-turbo's.
    make_tokenizer(out_dir / "tokenizer", bpe_path)
    scheduler_config = json.loads((out_dir / "scheduler" / "scheduler_config.json").read_text())
    scheduler_config.update(SD_TURBO_SCHEDULER_EXTRA)
    write_json(out_dir / "scheduler" / "scheduler_config.json", scheduler_config)


def make_frames(out_dir: Path) -> None:
    """8 frames, 64x64 RGB: a drifting colour gradient, a moving disc and a moving square."""
    out_dir.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:FRAME_SIZE, 0:FRAME_SIZE].astype(np.float64) / (FRAME_SIZE - 1)
    for k in range(NUM_FRAMES):
        phase = k / NUM_FRAMES
        r = 0.5 + 0.4 * np.sin(2 * np.pi * (x + phase))
        g = 0.5 + 0.4 * np.cos(2 * np.pi * (y - 0.5 * phase))
        b = 0.3 + 0.4 * x * y
        img = np.stack([r, g, b], axis=-1)
        cx, cy = 0.2 + 0.6 * phase, 0.5 + 0.25 * np.sin(2 * np.pi * phase)
        disc = (x - cx) ** 2 + (y - cy) ** 2 < 0.15**2
        img[disc] = [0.95, 0.85, 0.1]
        sx, sy = 0.7 - 0.5 * phase, 0.15 + 0.1 * phase
        square = (np.abs(x - sx) < 0.1) & (np.abs(y - sy) < 0.1)
        img[square] = [0.1, 0.2, 0.9]
        pixels = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
        PIL.Image.fromarray(pixels, "RGB").save(out_dir / f"{k:03d}.png")


def stage_checkpoints(bpe_path: Path) -> None:
    print("[checkpoints] tiny-sd-turbo, tiny-taesd, frames")
    make_tiny_sd_turbo(SD_DIR, bpe_path)
    make_taesd(TAESD_DIR)
    make_frames(FRAMES_DIR)
    check_not_degenerate()


def check_not_degenerate() -> None:
    """Random weights must still give outputs with structure (not constant, not saturated)."""
    sd = load_sd_pipeline()
    taesd = load_taesd()
    image = frames_tensor()[:1] * 2 - 1
    with torch.no_grad():
        torch.manual_seed(0)
        latent = torch.randn(1, 4, 8, 8)
        for name, decoded in [
            ("vae.decode", sd.vae.decode(latent / 0.18215).sample),
            ("taesd.decode", taesd.decode(latent).sample),
        ]:
            describe(name, decoded)
            assert decoded.std() > 0.05, f"{name} output is nearly constant"
            assert (decoded.abs() > 0.999).float().mean() < 0.5, f"{name} output is saturated"
        describe("vae.encode mean", sd.vae.encode(image).latent_dist.mean)
        describe("taesd.encode", taesd.encode(image).latents)
        ids = sd.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids
        embeds = sd.text_encoder(ids)[0]
        describe("text_encoder", embeds)
        eps = sd.unet(latent, 599, encoder_hidden_states=embeds).sample
        describe("unet", eps)
        assert eps.std() > 0.05, "unet output is nearly constant"


def describe(name: str, t: torch.Tensor) -> None:
    print(f"  {name:18s} shape={list(t.shape)} mean={t.mean():+.4f} std={t.std():.4f} "
          f"min={t.min():+.4f} max={t.max():+.4f}")


# --------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------


def write_json_compact_cases(path: Path, obj: dict) -> None:
    """Like write_json, but each entry of obj["cases"] on one line (keeps id lists readable)."""
    head = {k: v for k, v in obj.items() if k != "cases"}
    lines = [json.dumps(head, indent=2, ensure_ascii=False)[:-2] + ',\n  "cases": [']
    lines += ["    " + json.dumps(c, ensure_ascii=False) + "," for c in obj["cases"]]
    lines[-1] = lines[-1][:-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n  ]\n}\n", encoding="utf-8")


def save_golden(name: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    meta = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in (metadata or {}).items()}
    save_file(tensors, GOLDEN_DIR / name, metadata=meta or None)
    os.chmod(GOLDEN_DIR / name, 0o644)


def load_sd_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(SD_DIR, torch_dtype=DTYPE, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def load_taesd():
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(TAESD_DIR, torch_dtype=DTYPE).eval()


def frame_files() -> list[str]:
    return [f"frames/{k:03d}.png" for k in range(NUM_FRAMES)]


def frames_tensor() -> torch.Tensor:
    """All frames as [F,3,H,W] float32 in [0,1]."""
    arrays = [np.asarray(PIL.Image.open(FIXTURES / f).convert("RGB"), dtype=np.float32) / 255.0
              for f in frame_files()]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------
# Stage 2: per-network goldens
# --------------------------------------------------------------------------------------

TOKENIZER_PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "flowers",
    "",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n  collapse",
    "Hello, world! How's it going? I'm fine; you'll see: it's (very) [good].",
    "punctuation!!! ??? ... --- *** @#$%^&",
    "digits 0123456789 and 3.14159, 2024-01-01",
    "mixedCASE camelCase SHOUTING whisper",
    "café naïve résumé Zürich São Paulo",
    "e\u0301te\u0301 (decomposed accents)",
    "日本語のテキスト 猫 中文 한국어",
    "emoji 🐱🚀✨ and 👍🏽 skin tone",
    "ünïcödé ß ﬁ ligature Ωμέγα Привет",
    "don't won't they're we've I'd she'll",
    "a&amp;b <tag> \"quoted\" 'single'",
    "cyberpunk city at night, neon lights, rain, highly detailed, 8k, trending on artstation",
    " ".join(["word"] * 100),
    "a very long prompt " + ", ".join(f"detail number {i}" for i in range(40)),
]


def golden_tokenizer() -> None:
    from transformers import CLIPTokenizer

    turbo = CLIPTokenizer.from_pretrained(SD_DIR / "tokenizer")
    sd15 = CLIPTokenizer.from_pretrained(SD_DIR / "tokenizer", pad_token=EOS)
    cases = []
    for prompt in TOKENIZER_PROMPTS:
        kwargs = dict(padding="max_length", max_length=77, truncation=True)
        cases.append({
            "prompt": prompt,
            "input_ids_pad_bang": turbo(prompt, **kwargs).input_ids,
            "input_ids_pad_eos": sd15(prompt, **kwargs).input_ids,
            "untruncated_len": len(turbo(prompt).input_ids),
        })
    write_json_compact_cases(GOLDEN_DIR / "tokenizer_ids.json", {
        "description": "CLIPTokenizer (transformers, as diffusers loads it) with padding='max_length', "
                       "max_length=77, truncation=True. input_ids_pad_bang: sd-turbo config (pad '!' = id 0); "
                       "input_ids_pad_eos: SD1.5-style config (pad '<|endoftext|>' = id 49407). "
                       "untruncated_len: number of ids without padding/truncation (incl. BOS/EOS).",
        "tokenizer": "tiny-sd-turbo/tokenizer",
        "cases": cases,
    })


TEXT_ENCODER_PROMPTS = ["a photo of a cat", "", "Hello, world! café 猫 🐱", " ".join(["word"] * 100)]


def golden_text_encoder(pipe) -> None:
    ids = pipe.tokenizer(TEXT_ENCODER_PROMPTS, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        out = pipe.text_encoder(ids, output_hidden_states=True)
    save_golden("text_encoder.safetensors", {
        "input_ids": ids.to(torch.int64),
        "last_hidden_state": out.last_hidden_state,
        "hidden_state_before_final_norm": out.hidden_states[-1],
    }, {"prompts": TEXT_ENCODER_PROMPTS})


def down_residual_shapes(unet, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
    """Shapes of the 12 skip connections (conv_in, then each resnet/downsampler) and the mid block."""
    shapes, h, w = [], height, width
    channels = unet.config.block_out_channels
    shapes.append((batch, channels[0], h, w))
    for level, ch in enumerate(channels):
        for _ in range(unet.config.layers_per_block):
            shapes.append((batch, ch, h, w))
        if level < len(channels) - 1:
            h, w = h // 2, w // 2
            shapes.append((batch, ch, h, w))
    return shapes, (batch, channels[-1], h, w)


def golden_unet(pipe) -> None:
    unet = pipe.unet
    g = torch.Generator().manual_seed(100)
    sample = torch.randn(3, 4, 8, 8, generator=g)
    timesteps = torch.tensor([759, 599, 359], dtype=torch.int64)
    ids = pipe.tokenizer(["a photo of a cat", "flowers", ""], padding="max_length", max_length=77,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0]
        out_per_row = unet(sample, timesteps, encoder_hidden_states=embeds).sample
        out_single = unet(sample, torch.tensor(599, dtype=torch.int64), encoder_hidden_states=embeds).sample

        down_shapes, mid_shape = down_residual_shapes(unet, 3, 8, 8)
        down_res = [torch.randn(s, generator=g) * 0.5 for s in down_shapes]
        mid_res = torch.randn(mid_shape, generator=g) * 0.5
        out_control = unet(sample, timesteps, encoder_hidden_states=embeds,
                           down_block_additional_residuals=down_res,
                           mid_block_additional_residual=mid_res).sample

        # Non-square, larger latent (more spatial structure than 8x8; 2x2 reaches level 3).
        sample_wide = torch.randn(1, 4, 16, 24, generator=g)
        out_wide = unet(sample_wide, torch.tensor([999], dtype=torch.int64),
                        encoder_hidden_states=embeds[:1]).sample

    tensors = {
        "sample": sample,
        "timesteps": timesteps,
        "encoder_hidden_states": embeds,
        "output": out_per_row,
        "single_timestep": torch.tensor([599], dtype=torch.int64),
        "output_single_timestep": out_single,
        "control_mid_residual": mid_res,
        "output_control": out_control,
        "wide_sample": sample_wide,
        "wide_timesteps": torch.tensor([999], dtype=torch.int64),
        "wide_encoder_hidden_states": embeds[:1],
        "wide_output": out_wide,
    }
    for i, r in enumerate(down_res):
        tensors[f"control_down_residual_{i:02d}"] = r
    assert all(torch.isfinite(v.float()).all() for v in tensors.values())
    save_golden("unet.safetensors", tensors)


def golden_vae(pipe) -> None:
    vae = pipe.vae
    image = frames_tensor()[:1] * 2 - 1
    g = torch.Generator().manual_seed(200)
    latent = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        h = vae.encoder(image)
        moments = vae.quant_conv(h)
        dist = vae.encode(image).latent_dist
        sample_gen = torch.Generator().manual_seed(7)
        posterior_sample = dist.sample(sample_gen)
        decoded = vae.decode(latent).sample
    save_golden("vae.safetensors", {
        "image": image,
        "moments": moments,
        "posterior_mean": dist.mean,
        "posterior_logvar": dist.logvar,
        "posterior_std": dist.std,
        "posterior_sample_seed7": posterior_sample,
        "latent": latent,
        "decoded": decoded,
    })


def golden_taesd() -> None:
    taesd = load_taesd()
    image = frames_tensor()[:2] * 2 - 1
    g = torch.Generator().manual_seed(300)
    latent = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        encoded = taesd.encode(image).latents
        decoded = taesd.decode(latent).sample
    save_golden("taesd.safetensors", {"image": image, "latents": encoded, "latent": latent, "decoded": decoded})


def golden_scheduler() -> None:
    """alphas_cumprod of the reference's LCMScheduler and some set_timesteps grids."""
    from diffusers import LCMScheduler
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler.from_pretrained(SD_DIR / "scheduler")
    lcm = LCMScheduler.from_config(euler.config)
    grids = {}
    for n in (1, 2, 4, 10, 25, 30, 49, 50):
        lcm.set_timesteps(n)
        grids[f"timesteps_n{n}"] = lcm.timesteps.clone()
    # The stream passes 0-d int64 tensors (an element of scheduler.timesteps), so the scalings are
    # computed in float32 tensor arithmetic; do the same here.
    scalings = [lcm.get_scalings_for_boundary_condition_discrete(torch.tensor(t)) for t in range(1000)]
    save_golden("scheduler.safetensors", {
        "alphas_cumprod": lcm.alphas_cumprod,
        "c_skip": torch.stack([c for c, _ in scalings]),
        "c_out": torch.stack([c for _, c in scalings]),
        **grids,
    }, {"original_inference_steps": lcm.config.original_inference_steps})


def stage_networks() -> None:
    print("[networks] tokenizer, text encoder, unet, vae, taesd, scheduler")
    pipe = load_sd_pipeline()
    golden_tokenizer()
    golden_text_encoder(pipe)
    golden_unet(pipe)
    golden_vae(pipe)
    golden_taesd()
    golden_scheduler()


# --------------------------------------------------------------------------------------
# Stage 3: StreamDiffusion stream goldens
# --------------------------------------------------------------------------------------

STREAM_DEFAULTS = dict(
    mode="img2img",  # or "txt2img" (stream.txt2img(), no input frames)
    prompt="a photo of a cat",
    negative_prompt="blurry, low quality",
    seed=2,
    t_index_list=[12, 20, 32],
    num_inference_steps=50,
    guidance_scale=1.2,
    delta=0.8,
    cfg_type="self",
    do_add_noise=True,
    use_denoising_batch=True,
    frame_buffer_size=1,
    vae="taesd",
    width=FRAME_SIZE,
    height=FRAME_SIZE,
    num_frames=6,
    updates=[],
)

# Each case: name -> overrides of STREAM_DEFAULTS. Together they cover every cfg_type, t_index_list
# lengths 1 to 4, do_add_noise on/off, TAESD and the full VAE, the batched and the step-by-step
# denoising path, two prompts, two seeds, a mid-stream prompt update and txt2img.
STREAM_CASES = {
    "self_t3": dict(num_frames=8),
    "none_t2": dict(cfg_type="none", t_index_list=[16, 32]),
    # One step with cfg "self": the stock noise feeds back on itself each frame with gain ~b/a, which
    # explodes (random UNet) when (b/a)*1.16 > 1, i.e. t above ~310; index 40 (t = 199) keeps it bounded.
    "self_t1": dict(t_index_list=[40]),
    "full_t2": dict(cfg_type="full", t_index_list=[12, 32]),
    "initialize_t4": dict(cfg_type="initialize", t_index_list=[8, 20, 32, 44]),
    "self_t3_nonoise": dict(do_add_noise=False),
    "self_t3_fullvae": dict(vae="full"),
    "none_t4_fullvae_nonoise": dict(cfg_type="none", t_index_list=[8, 20, 32, 44], vae="full", do_add_noise=False),
    "self_t3_nobatch": dict(use_denoising_batch=False),
    "initialize_t2_nobatch": dict(cfg_type="initialize", t_index_list=[16, 32], use_denoising_batch=False),
    "none_t3_nobatch_nonoise": dict(cfg_type="none", use_denoising_batch=False, do_add_noise=False),
    "self_t3_prompt2_seed2": dict(prompt="a watercolor painting of mountains at sunset, vivid colors", seed=12345),
    "self_t3_update_prompt": dict(updates=[{"before_frame": 3, "prompt": "a watercolor painting of mountains"}]),
    "txt2img_self_t3": dict(mode="txt2img"),
    # num_inference_steps that does not divide 50: the grid depends on original_inference_steps.
    # Indices 4, 13, 22 give t = 879, 579, 279 with original_inference_steps 50 (the reference's);
    # original_inference_steps 100 (sdstream's) gives 869, 569, 269.
    "self_t3_n30": dict(num_inference_steps=30, t_index_list=[4, 13, 22]),
}


class CpuPatches:
    """The reference times each frame with CUDA events; replace them with host-clock ones.

    Also records every torch.randn_like draw (the step-by-step path re-noises with the global RNG).
    """

    def __init__(self):
        self.randn_like_draws: list[torch.Tensor] = []

    def __enter__(self):
        self.saved = (torch.cuda.Event, torch.cuda.synchronize, torch.randn_like)
        original_randn_like = torch.randn_like

        def recording_randn_like(*args, **kwargs):
            out = original_randn_like(*args, **kwargs)
            self.randn_like_draws.append(out.detach().clone())
            return out

        torch.cuda.Event = HostEvent
        torch.cuda.synchronize = lambda *a, **k: None
        torch.randn_like = recording_randn_like
        return self

    def __exit__(self, *exc):
        torch.cuda.Event, torch.cuda.synchronize, torch.randn_like = self.saved
        return False


def stream_settings(name: str) -> dict:
    settings = dict(STREAM_DEFAULTS, **STREAM_CASES[name])
    settings["name"] = name
    settings["file"] = f"golden/stream_{name}.safetensors"
    settings["frames"] = frame_files()[: settings["num_frames"]] if settings["mode"] == "img2img" else []
    # txt2img and the step-by-step path draw from torch's global generator, seeded with this.
    settings["global_seed"] = settings["seed"]
    return settings


def drive_stream(settings: dict, setup=None, before_frame=None):
    """Run the reference StreamDiffusion through one case as a user would, on the CPU.

    Builds `streamdiffusion.StreamDiffusion` from `settings` (the keys of STREAM_DEFAULTS), puts
    tiny-taesd in place of the VAE when `vae` is "taesd" (what StreamDiffusionWrapper does for
    use_tiny_vae), calls `setup(stream)` (to wrap its methods or networks), seeds torch's global
    generator with `global_seed` (default: `seed`), runs `prepare`, then makes `num_frames` calls:
    `stream(frame)` on the case's frames, or `stream.txt2img()`. `before_frame(k, stream, frame)`
    runs before call k (`frame` is the PIL input, None for txt2img).

    Returns the stream, what `prepare` computed, the outputs `(decoded / 2 + 0.5).clamp(0, 1)`
    (streamdiffusion.image_utils.denormalize) and the CpuPatches with the recorded global draws.
    """
    from streamdiffusion import StreamDiffusion

    pipe = load_sd_pipeline()
    stream = StreamDiffusion(
        pipe,
        t_index_list=settings["t_index_list"],
        torch_dtype=DTYPE,
        width=settings["width"],
        height=settings["height"],
        do_add_noise=settings["do_add_noise"],
        use_denoising_batch=settings["use_denoising_batch"],
        frame_buffer_size=settings["frame_buffer_size"],
        cfg_type=settings["cfg_type"],
    )
    if settings["vae"] == "taesd":
        stream.vae = load_taesd()
    if setup is not None:
        setup(stream)

    with CpuPatches() as patches:
        torch.manual_seed(settings.get("global_seed", settings["seed"]))
        stream.prepare(
            prompt=settings["prompt"],
            negative_prompt=settings["negative_prompt"],
            num_inference_steps=settings["num_inference_steps"],
            guidance_scale=settings["guidance_scale"],
            delta=settings["delta"],
            generator=torch.Generator(),
            seed=settings["seed"],
        )
        prepared = {
            "init_noise": stream.init_noise.clone(),
            "prompt_embeds": stream.prompt_embeds.clone(),
            "timesteps": stream.sub_timesteps_tensor.clone(),
            "alpha_prod_t_sqrt": stream.alpha_prod_t_sqrt.flatten().clone(),
            "beta_prod_t_sqrt": stream.beta_prod_t_sqrt.flatten().clone(),
            "c_skip": stream.c_skip.flatten().clone(),
            "c_out": stream.c_out.flatten().clone(),
        }
        outputs = []
        for k in range(settings["num_frames"]):
            frame = None
            if settings["mode"] != "txt2img":
                frame = PIL.Image.open(FIXTURES / settings["frames"][k]).convert("RGB")
            if before_frame is not None:
                before_frame(k, stream, frame)
            decoded = stream.txt2img() if frame is None else stream(frame)
            outputs.append((decoded / 2 + 0.5).clamp(0, 1))
    return stream, prepared, outputs, patches


def run_stream(settings: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Run the reference StreamDiffusion for one case; return the tensors to store and extra facts."""
    # Record what goes into and comes out of the denoiser each frame.
    latents_in, latents_out, stock, buffers = [], [], [], []

    def record_denoiser(stream) -> None:
        predict = stream.predict_x0_batch

        def recording_predict(x_t_latent):
            latents_in.append(x_t_latent.detach().clone())
            out = predict(x_t_latent)
            latents_out.append(out.detach().clone())
            stock.append(stream.stock_noise.detach().clone())
            if stream.x_t_latent_buffer is not None:
                buffers.append(stream.x_t_latent_buffer.detach().clone())
            return out

        stream.predict_x0_batch = recording_predict

    updated_embeds = []

    def update_prompts(k: int, stream, frame) -> None:
        for update in settings["updates"]:
            if update["before_frame"] == k:
                stream.update_prompt(update["prompt"])
                updated_embeds.append(stream.prompt_embeds.clone())

    stream, prepared, outputs, patches = drive_stream(settings, record_denoiser, update_prompts)

    tensors = dict(prepared)
    tensors["output"] = torch.cat(outputs)
    tensors["x_t_latent"] = torch.stack(latents_in)
    tensors["x0_pred"] = torch.stack(latents_out)
    tensors["stock_noise"] = torch.stack(stock)
    if buffers and settings["use_denoising_batch"]:  # the step-by-step path never uses the buffer
        tensors["x_t_latent_buffer"] = torch.stack(buffers)
    if patches.randn_like_draws:
        per_frame = len(patches.randn_like_draws) // settings["num_frames"]
        tensors["step_noise"] = torch.stack(patches.randn_like_draws).view(
            settings["num_frames"], per_frame, *patches.randn_like_draws[0].shape)
    for i, e in enumerate(updated_embeds):
        tensors[f"prompt_embeds_update_{i}"] = e
    facts = {"effective_guidance_scale": stream.guidance_scale,
             "unet_batch_rows": int(stream.prompt_embeds.shape[0])}
    return tensors, facts


def stage_streams() -> None:
    print("[streams]")
    manifest = []
    for name in STREAM_CASES:
        settings = stream_settings(name)
        first, facts = run_stream(settings)
        second, _ = run_stream(settings)
        same = first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
        if not same:
            worst = max((first[k] - second[k]).abs().max().item() for k in first if first[k].is_floating_point())
            print(f"  WARNING {name}: two runs differ (max abs {worst:.3g})")
        settings.update(facts, deterministic=same)
        save_golden(f"stream_{name}.safetensors", first)
        out = first["output"]
        print(f"  {name:28s} output {list(out.shape)} mean={out.mean():.4f} std={out.std():.4f} "
              f"deterministic={same}")
        manifest.append({k: v for k, v in settings.items() if k != "num_frames"} | {"num_frames": settings["num_frames"]})
    write_json(GOLDEN_DIR / "streams.json", {
        "description": "StreamDiffusion (PyPI streamdiffusion 0.1.1) on diffusers, CPU, float32, on "
                       "tiny-sd-turbo (+ tiny-taesd when vae is 'taesd'). Tensors: see tests/reference/README.md.",
        "random_numbers": "prepare() seeds the stream generator with `seed`; init_noise = randn[B,4,h,w] is its "
                          "first draw, then (vae 'full') one posterior randn[1,4,h,w] per frame. torch's global "
                          "generator is seeded with `global_seed` just before prepare(); only txt2img "
                          "(randn[1,4,h,w] per frame, contiguous) and the step-by-step path (randn_like of a "
                          "channels-last [1,4,h,w] tensor per re-noise: torch's serial double Box-Muller path "
                          "in NHWC memory order) draw from it; those draws are stored as x_t_latent / step_noise.",
        "cases": manifest,
    })


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="all", choices=["checkpoints", "networks", "streams", "all"])
    parser.add_argument("--bpe", help="path to bpe_simple_vocab_16e6.txt.gz")
    args = parser.parse_args()
    started = time.time()
    if args.stage in ("checkpoints", "all"):
        stage_checkpoints(find_bpe_file(args.bpe))
    if args.stage in ("networks", "all"):
        stage_networks()
    if args.stage in ("streams", "all"):
        stage_streams()
    print(f"done in {time.time() - started:.1f}s")


if __name__ == "__main__":
    main()
