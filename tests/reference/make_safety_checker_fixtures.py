#!/usr/bin/env python3
"""Build tiny random-weight Stable Diffusion safety checkers and the reference's verdicts.

diffusers' `StableDiffusionSafetyChecker` (a CLIP vision tower, a projection, 17 concept and 3
"special care" embeddings with one threshold each) with transformers' CLIP image processor in
front, as diffusers' pipelines run it (`feature_extractor(pil_images)`, then
`safety_checker(clip_input=..., images=...)`). Writes under tests/fixtures/:

  safety-checker/{config.json, model.safetensors, preprocessor_config.json}
      the checker the parity tests use: CLIP vision with the real checker's layout (patch 14,
      224x224, quick_gelu, pre-LayerNorm) but hidden 32, 4 heads, 2 layers, intermediate 37,
      projection 24; thresholds chosen from the test images' cosines (below) so that some images
      are flagged, some are not, and one is flagged only through the special-care adjustment.
  tiny-sd-turbo/safety_checker, tiny-sd15/safety_checker, tiny-sdxl/safety_checker
      the same network with every threshold at 2.0 (a cosine never exceeds 1): the checker the
      tiny pipelines carry, as diffusers' SD folders carry theirs; it never flags, so every stream
      golden is unchanged with the checker on (Daydream's default).
  safety-checker-bin/{config.json, pytorch_model.bin}
      the same checker as transformers 4.x saved it (keys under `vision_model.vision_model.`,
      the `position_ids` buffer, torch.save's zip format), for the loader's legacy path.
  golden/safety_checker.safetensors
      image_<k>        [H, W, 3] uint8   the test images (the fixture frames and two patterns)
      clip_input_<k>   [1, 3, 224, 224]  CLIPImageProcessorPil (PIL bicubic, shortest edge 224,
                                         centre crop 224, rescale, CLIP mean/std)
      clip_input_tv_<k>                  the torchvision backend transformers 5 uses by default
                                         (reported, not matched: its antialiased bicubic
                                         differs from PIL's by up to a few levels)
      image_embeds_<k> [1, 24]           visual_projection(pooled output)
      special_cos_<k> [3], concept_cos_<k> [17]
  golden/safety_checker.json
      per case: the rounded special and concept scores and has_nsfw_concept, from
      `StableDiffusionSafetyChecker.forward` itself.

Weights: transformers' initialisation (seed 0), then every linear and convolution weight scaled
to std 1 / sqrt(fan_in) and the LayerNorms and biases redrawn (seeded), so that images give
distinct embeddings; the concept embeddings are seeded normals.

Needs torch, transformers (>= 5, for CLIPImageProcessorPil), diffusers, pillow, safetensors.
"""

from __future__ import annotations

import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import _common

FIXTURES = _common.FIXTURES
OUT = FIXTURES / "safety-checker"
PIPELINES = ["tiny-sd-turbo", "tiny-sd15", "tiny-sdxl"]


def tiny_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=49408, max_position_embeddings=8),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, image_size=224, patch_size=14,
                           hidden_act="quick_gelu", layer_norm_eps=1e-5),
        projection_dim=24,
    )


def rescale_and_redraw(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight.mul_(1.0 / (module.weight.std() * module.weight[0].numel() ** 0.5))
        for name, p in sorted(model.named_parameters()):
            if "layer_norm" in name or "layrnorm" in name or "post_layernorm" in name:
                if name.endswith(".weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("class_embedding") or name.endswith("position_embedding.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
        model.concept_embeds.copy_(torch.randn(model.concept_embeds.shape, generator=g))
        model.special_care_embeds.copy_(torch.randn(model.special_care_embeds.shape, generator=g))


def test_images() -> list[np.ndarray]:
    images = []
    for i in (0, 3, 5, 7):
        path = FIXTURES / "frames" / f"{i:03d}.png"
        images.append(np.asarray(Image.open(path).convert("RGB")))
    # A 512x512 pattern (the stream's usual size: a downscale) and a 96x160 one (shortest edge
    # then centre crop).
    for h, w, seed in ((512, 512, 5), (96, 160, 6)):
        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([
            128 + 100 * np.sin(x / (7 + seed)) * np.cos(y / 11),
            128 + 90 * np.cos((x + y) / 13),
            (x * 255 // max(w - 1, 1)),
        ], axis=-1)
        noise = rng.integers(-20, 21, size=(h, w, 3))
        images.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return images


def cosines(checker, clip_input):
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    with torch.no_grad():
        pooled = checker.vision_model(clip_input)[1]
        embeds = checker.visual_projection(pooled)
        special = cosine_distance(embeds, checker.special_care_embeds)[0]
        concept = cosine_distance(embeds, checker.concept_embeds)[0]
    return embeds, special, concept


def choose_thresholds(checker, inputs) -> None:
    """Thresholds in the middle of gaps between the images' cosines, so no score is near 0."""
    cos = [cosines(checker, x) for x in inputs]
    special = torch.stack([c[1] for c in cos])  # [images, 3]
    concept = torch.stack([c[2] for c in cos])  # [images, 17]

    def between(values: torch.Tensor, rank: int) -> float:
        v = torch.sort(values).values
        return float((v[rank] + v[rank + 1]) / 2)

    n = len(inputs)
    with torch.no_grad():
        # Special care: only the top image of concept 0 triggers, and only for special 0.
        checker.special_care_embeds_weights.copy_(torch.tensor([
            between(special[:, 0], n - 2), 2.0, 2.0]))
        # Concepts: most never trigger; concept 3 triggers for the top two images; concept 5 is
        # set 0.005 above one image's cosine, so that image is flagged only if the special-care
        # adjustment (0.01) applies to it.
        weights = torch.full((17,), 2.0)
        weights[3] = between(concept[:, 3], n - 3)
        top_special = int(torch.argmax(special[:, 0]))
        weights[5] = float(concept[top_special, 5]) + 0.005
        checker.concept_embeds_weights.copy_(weights)


def write_legacy_copy(src, out) -> None:
    """The checker as transformers 4.x saved it before safetensors: `pytorch_model.bin`
    (torch.save's zip format), keys under `vision_model.vision_model.`, with the
    `position_ids` buffer — what CompVis's repository may still serve."""
    from safetensors.torch import load_file

    state = {}
    for key, value in load_file(str(src / "model.safetensors")).items():
        if key.startswith("vision_model."):
            key = "vision_model." + key
        state[key] = value
    state["vision_model.vision_model.embeddings.position_ids"] = torch.arange(257)[None]
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", out / "config.json")
    torch.save(state, out / "pytorch_model.bin")
    print("wrote", out / "pytorch_model.bin")


def main() -> None:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(tiny_config()).eval()
    rescale_and_redraw(checker, 1)
    pil_processor = CLIPImageProcessorPil()
    tv_processor = CLIPImageProcessor()
    images = test_images()
    inputs = [pil_processor(Image.fromarray(im), return_tensors="pt").pixel_values
              for im in images]
    choose_thresholds(checker, inputs)

    OUT.mkdir(parents=True, exist_ok=True)
    checker.save_pretrained(OUT, safe_serialization=True)
    pil_processor.save_pretrained(OUT)

    tensors = {}
    cases = []
    for k, (image, clip_input) in enumerate(zip(images, inputs)):
        tv_input = tv_processor(Image.fromarray(image), return_tensors="pt").pixel_values
        embeds, special, concept = cosines(checker, clip_input)
        blank = [np.zeros((8, 8, 3), np.float32)]
        with torch.no_grad():
            _, flags = checker(clip_input=clip_input, images=blank)
        # The scores exactly as forward computes them (numpy float32 minus Python floats,
        # rounded to 3 decimals), re-done here so the golden can list them.
        special_np = special.numpy().astype(np.float32)
        concept_np = concept.numpy().astype(np.float32)
        adjustment, special_scores, concept_scores = 0.0, [], []
        for j, c in enumerate(special_np):
            s = round(c - checker.special_care_embeds_weights[j].item() + adjustment, 3)
            special_scores.append(float(s))
            if s > 0:
                adjustment = 0.01
        for j, c in enumerate(concept_np):
            concept_scores.append(float(round(c - checker.concept_embeds_weights[j].item()
                                              + adjustment, 3)))
        assert bool(flags[0]) == any(s > 0 for s in concept_scores)
        tensors[f"image_{k}"] = torch.from_numpy(np.ascontiguousarray(image))
        tensors[f"clip_input_{k}"] = clip_input.contiguous()
        tensors[f"clip_input_tv_{k}"] = tv_input.contiguous()
        tensors[f"image_embeds_{k}"] = embeds.contiguous()
        tensors[f"special_cos_{k}"] = special.contiguous()
        tensors[f"concept_cos_{k}"] = concept.contiguous()
        diff = (tv_input - clip_input).abs().max().item()
        cases.append({
            "name": f"case_{k}",
            "index": k,
            "size": list(image.shape[:2]),
            "special_scores": special_scores,
            "concept_scores": concept_scores,
            "has_nsfw_concept": bool(flags[0]),
            "adjusted": adjustment > 0,
            "torchvision_max_abs_vs_pil": diff,
        })
        print(f"case {k} {image.shape[:2]} flagged={bool(flags[0])} special={special_scores} "
              f"concept[3,5]={concept_scores[3]},{concept_scores[5]} tv-vs-pil={diff:.4f}")
    flagged = sum(c["has_nsfw_concept"] for c in cases)
    assert 0 < flagged < len(cases), "the thresholds must flag some images and pass others"
    assert any(c["adjusted"] and c["has_nsfw_concept"] for c in cases)
    save_file(tensors, str(FIXTURES / "golden" / "safety_checker.safetensors"))
    _common.write_json(FIXTURES / "golden" / "safety_checker.json", {
        "about": "StableDiffusionSafetyChecker.forward verdicts on the tiny checker of "
                 "tests/fixtures/safety-checker; written by make_safety_checker_fixtures.py",
        "cases": cases,
    })

    write_legacy_copy(OUT, FIXTURES / "safety-checker-bin")

    # The never-flagging copy the tiny pipelines carry.
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(2.0)
        checker.special_care_embeds_weights.fill_(2.0)
    for name in PIPELINES:
        folder = FIXTURES / name / "safety_checker"
        if folder.exists():
            shutil.rmtree(folder)
        checker.save_pretrained(folder, safe_serialization=True)
        pil_processor.save_pretrained(FIXTURES / name / "feature_extractor")
        print("wrote", folder)


if __name__ == "__main__":
    main()
