"""Golden ids for sdstream's CLIP tokenizer built from vocab.json + merges.txt (no tokenizer.json),
the layout of the real sd-turbo / SD1.5 repositories (models/src/tokenizer.rs).

tests/fixtures/golden/tokenizer_ids.json (made by make_fixtures.py) covers the tokenizer.json path.
This script copies tests/fixtures/tiny-sd-turbo/tokenizer without tokenizer.json into a temp folder,
once with sd-turbo's special tokens (pad "!") and once with SD1.5's (pad "<|endoftext|>"), loads each
with transformers' CLIPTokenizer exactly as diffusers does, and encodes the same prompts with
padding="max_length", max_length=77, truncation=True.

Writes tests/fixtures/tokenizer/vocab_merges_ids.json.
Run: python tests/reference/make_tokenizer_golden.py   (in the environment of tests/reference/README.md)
"""

import json
import os
import shutil
import tempfile

import transformers
from transformers import CLIPTokenizer

from _common import FIXTURES, write_json_dense

ROOT = str(FIXTURES)
SRC = os.path.join(ROOT, "tiny-sd-turbo", "tokenizer")
EOS = "<|endoftext|>"


def main() -> None:
    with open(os.path.join(ROOT, "golden", "tokenizer_ids.json")) as f:
        prompts = [c["prompt"] for c in json.load(f)["cases"]]
    out = {"transformers": transformers.__version__, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        turbo = os.path.join(tmp, "turbo")
        sd15 = os.path.join(tmp, "sd15")
        for d in (turbo, sd15):
            os.makedirs(d)
            for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
                shutil.copy(os.path.join(SRC, name), d)
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            path = os.path.join(sd15, name)
            with open(path) as f:
                cfg = json.load(f)
            cfg["pad_token"] = EOS
            with open(path, "w") as f:
                json.dump(cfg, f, indent=2)
        tok_turbo = CLIPTokenizer.from_pretrained(turbo)
        tok_sd15 = CLIPTokenizer.from_pretrained(sd15)
        kwargs = dict(padding="max_length", max_length=77, truncation=True)
        for prompt in prompts:
            out["cases"].append({
                "prompt": prompt,
                "input_ids_pad_bang": tok_turbo(prompt, **kwargs).input_ids,
                "input_ids_pad_eos": tok_sd15(prompt, **kwargs).input_ids,
            })
    write_json_dense(os.path.join(ROOT, "tokenizer", "vocab_merges_ids.json"), out, ensure_ascii=False)


if __name__ == "__main__":
    main()
