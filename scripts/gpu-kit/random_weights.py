#!/usr/bin/env python3
"""Write full-size random-weight checkpoints in sd-turbo's, TAESD's and an SD 2.1 ControlNet's
shapes from tests/reference/full_size_manifest.json, with torch and safetensors only (no
diffusers, no transformers, no network): the GPU machine's way to get benchmark weights.

  OUT/sd/          diffusers folder laid out like stabilityai/sd-turbo (tokenizer copied from
                   the tiny fixture, as tests/reference/make_full_size.py does)
  OUT/taesd/       AutoencoderTiny laid out like madebyollin/taesd
  OUT/controlnet/  ControlNetModel in the shapes of thibaud/controlnet-sd21-*-diffusers

Each tensor is drawn from normal(mean, std) with the mean and std that make_full_size.py's
initialisation gives it (recorded in the manifest), on the GPU when there is one, seeded, and
written as float32 `*.safetensors` plus float16 `*.fp16.safetensors`. For timing only: these are
not make_full_size.py's weights, only weights of the same shapes and spread.

Usage: python random_weights.py --manifest full_size_manifest.json --tokenizer DIR --out OUT

A manifest with "half": true (full_size_manifest_sdxl.json: sdxl-turbo's shapes and TAESDXL) is
written in float16 only, under the plain names (`model.safetensors`), each tensor drawn in
float32 and rounded at once; its "copy" folders (the scheduler and tokenizers) come from
--fixtures (the tiny fixtures' folder):

  python random_weights.py --manifest full_size_manifest_sdxl.json --fixtures FIXTURES --out OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, help="tests/fixtures/tiny-sd-turbo/tokenizer")
    parser.add_argument("--fixtures", type=Path, help="tests/fixtures: where a manifest's \"copy\" folders are")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fp16", action="store_true")
    args = parser.parse_args()
    manifest = json.loads(args.manifest.read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    for folder, files in manifest["folders"].items():
        for rel, config in files.items():
            path = args.out / folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(config, indent=2) + "\n")
    copies = dict(manifest.get("copy", {}))
    if "sd" in manifest["folders"]:
        if args.tokenizer is None:
            parser.error("this manifest needs --tokenizer (the tiny sd-turbo's)")
        copies["sd/tokenizer"] = args.tokenizer
    elif copies and args.fixtures is None:
        parser.error("this manifest needs --fixtures (the tiny fixtures' folder)")
    for rel, source in copies.items():
        target = args.out / rel
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(Path(source) if rel == "sd/tokenizer" else args.fixtures / source, target)
    half = bool(manifest.get("half", False))
    for stem, rows in manifest["weights"].items():
        state = {}
        for name, shape, mean, std in rows:
            t = torch.empty(shape, dtype=torch.float32, device=device)
            if std > 0:
                t.normal_(mean, std, generator=generator)
            else:
                t.fill_(mean)
            state[name] = t.half() if half else t
        path = args.out / f"{stem}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.cpu().contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})
        if not (args.no_fp16 or half):
            save_file({k: v.half().cpu().contiguous() for k, v in state.items()},
                      args.out / f"{stem}.fp16.safetensors", metadata={"format": "pt"})
        values = sum(v.numel() for v in state.values())
        print(f"  {stem}: {len(state)} tensors, {values / 1e6:.1f} M values", flush=True)
        del state
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
