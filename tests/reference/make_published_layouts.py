"""Stand-ins in the layouts the published repositories hold (issue #42), made from the tiny
fixtures with torch itself, so that the readers meet files torch and diffusers wrote.

Writes under tests/fixtures/:

  * torch-legacy/mixed.pth and mixed.safetensors: one state dict saved in torch's legacy
    format (`torch.save(..., _use_new_zipfile_serialization=False)`, what torch wrote before
    1.6) under `state_dict`, and the same tensors (made contiguous) as safetensors, the answer
    the reader must give. It mixes what a legacy file can hold: float32, float16, bfloat16 and
    int64 storages, a transposed (non-contiguous) view, two slices of one storage at different
    offsets, a scalar and an empty tensor.
  * published-root/: a model root whose files are in the layouts the real repositories
    publish, beside tests/fixtures/model-root (the same networks in today's layouts):
    - lllyasviel/Annotators/body_pose_model.pth: the tiny OpenPose body network
      (model-root/.../body_pose_model.safetensors, its keys as the real file's) in the legacy
      format, as pytorch-openpose saved the real `body_pose_model.pth` in 2018 (torch 0.4);
    - thibaud/controlnet-sd21-{openpose,hed,canny,depth,color}-diffusers/: what those
      repositories hold, a config.json of diffusers 0.15 (ControlNetModel's arguments of that
      release only) and a lone fp16 `diffusion_pytorch_model.bin` (torch.save's zip format), made
      from tiny-controlnet-a (the same fp16 values; like the real nets, and unlike model-root's
      stand-ins, it has the cross-attention mid block, the only one diffusers 0.15 knew);
    - the rest (sd-turbo, TAESD, Depth Anything, ControlNetHED.pth) as links to model-root, whose
      layouts are already the published ones.
  * tiny-sdxl-sharded/: tiny-sdxl with its UNet saved by diffusers in shards
    (`diffusion_pytorch_model-0000k-of-00003.safetensors` and
    `diffusion_pytorch_model.safetensors.index.json`), as a recent diffusers saves an fp32 SDXL
    UNet (10.3 GB, over its 10 GB shard size); the other components link to tiny-sdxl.

Run from the repository root with the reference environment (tests/reference/README.md):
    "$REFENV/bin/python" tests/reference/make_published_layouts.py
Deterministic: the same bytes every run (torch's legacy storage keys are memory addresses,
so they are renamed in the file to 0, 1, 2, ... in order).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from _common import FIXTURES


def legacy_save(obj, path: Path) -> None:
    """torch.save in the legacy format, with its storage keys (the storages' addresses, which
    differ from run to run) replaced by their rank among the sorted keys."""
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    # The five pickles: magic number, protocol version, system information, the object and the
    # sorted list of storage keys; the keys appear as strings in the last two.
    stream = io.BytesIO(data)

    class Skipper(pickle.Unpickler):
        def persistent_load(self, pid):
            return None

        def find_class(self, module, name):
            return lambda *args, **kwargs: None

    for _ in range(4):
        Skipper(stream).load()
    keys = pickle.load(stream)
    assert keys == sorted(keys) and all(k.isdigit() for k in keys), keys
    head = data[: stream.tell()]
    rest = data[stream.tell():]
    # Rewrite the keys inside the pickled bytes: each is a short string opcode followed by the
    # key's characters; replace by same-length strings so no length byte moves.
    for rank, key in enumerate(keys):
        new = str(rank).rjust(len(key), "0")
        assert head.count(key.encode()) >= 2, key
        head = head.replace(key.encode(), new.encode())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(head + rest)
    # torch itself must read the result back.
    back = torch.load(path, weights_only=True)
    assert back.keys() == obj.keys()
    print("wrote", path.relative_to(FIXTURES.parent.parent), path.stat().st_size, "bytes")


def mixed() -> None:
    g = torch.Generator().manual_seed(42)
    base = torch.randn(6, 5, generator=g)
    shared = torch.randn(40, generator=g)
    tensors = {
        "linear.weight": torch.randn(4, 3, generator=g),
        "half.weight": torch.randn(3, 7, generator=g).half(),
        "bf16.weight": torch.randn(2, 2, 3, generator=g).bfloat16(),
        "steps": torch.tensor([3, -1, 1 << 40], dtype=torch.int64),
        "transposed": base.t(),
        "first_half": shared[:20].view(4, 5),
        "second_half": shared[20:].view(5, 4),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    assert not tensors["transposed"].is_contiguous()
    assert tensors["second_half"].storage_offset() == 20
    out = FIXTURES / "torch-legacy"
    legacy_save({"state_dict": tensors, "epoch": 7}, out / "mixed.pth")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "mixed.safetensors"))
    print("wrote", (out / "mixed.safetensors").relative_to(FIXTURES.parent.parent))


def body_pose() -> None:
    src = FIXTURES / "model-root" / "lllyasviel" / "Annotators" / "body_pose_model.safetensors"
    state = load_file(str(src))
    # pytorch-openpose's file is a plain OrderedDict of the network's tensors.
    ordered = dict(sorted(state.items()))
    legacy_save(ordered, FIXTURES / "published-root" / "lllyasviel" / "Annotators" / "body_pose_model.pth")


# ControlNetModel.__init__'s arguments in diffusers 0.15.0, the release the thibaud nets were
# converted with: a config of that time holds these and no others.
DIFFUSERS_015_CONTROLNET_KEYS = [
    "act_fn", "attention_head_dim", "block_out_channels", "class_embed_type",
    "conditioning_embedding_out_channels", "controlnet_conditioning_channel_order",
    "cross_attention_dim", "down_block_types", "downsample_padding", "flip_sin_to_cos",
    "freq_shift", "in_channels", "layers_per_block", "mid_block_scale_factor", "norm_eps",
    "norm_num_groups", "num_class_embeds", "only_cross_attention",
    "projection_class_embeddings_input_dim", "resnet_time_scale_shift", "upcast_attention",
    "use_linear_projection",
]


def link(target: str, at: Path) -> None:
    at.parent.mkdir(parents=True, exist_ok=True)
    if at.is_symlink() or at.exists():
        at.unlink()
    os.symlink(target, at)


def thibaud() -> None:
    from diffusers import ControlNetModel

    for kind in ("openpose", "hed", "canny", "depth", "color"):
        name = f"controlnet-sd21-{kind}-diffusers"
        src = FIXTURES / "tiny-controlnet-a"
        out = FIXTURES / "published-root" / "thibaud" / name
        out.mkdir(parents=True, exist_ok=True)
        modern = json.loads((src / "config.json").read_text())
        config = {"_class_name": "ControlNetModel", "_diffusers_version": "0.15.0.dev0"}
        config.update({k: modern[k] for k in DIFFUSERS_015_CONTROLNET_KEYS})
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        state = load_file(str(src / "diffusion_pytorch_model.fp16.safetensors"))
        assert all(t.dtype == torch.float16 for t in state.values())
        torch.save(OrderedDict(sorted(state.items())), out / "diffusion_pytorch_model.bin")
        # diffusers reads the old layout into the same network as the modern one.
        old = ControlNetModel.from_pretrained(out).float().eval()
        new = ControlNetModel.from_pretrained(src, variant="fp16").float().eval()
        for (a, x), (b, y) in zip(sorted(old.state_dict().items()), sorted(new.state_dict().items())):
            assert a == b and torch.equal(x, y), a
        print("wrote", out.relative_to(FIXTURES.parent.parent), "config.json + diffusion_pytorch_model.bin",
              (out / "diffusion_pytorch_model.bin").stat().st_size, "bytes")
    root = FIXTURES / "published-root"
    link("../../tiny-sd-turbo", root / "stabilityai" / "sd-turbo")
    link("../../tiny-taesd", root / "madebyollin" / "taesd")
    link("../../model-root/depth-anything/Depth-Anything-V2-Small-hf",
         root / "depth-anything" / "Depth-Anything-V2-Small-hf")
    link("../../../model-root/lllyasviel/Annotators/ControlNetHED.pth",
         root / "lllyasviel" / "Annotators" / "ControlNetHED.pth")


def sharded_sdxl() -> None:
    from diffusers import UNet2DConditionModel

    src = FIXTURES / "tiny-sdxl"
    out = FIXTURES / "tiny-sdxl-sharded"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    for entry in sorted(src.iterdir()):
        if entry.name != "unet":
            link(f"../tiny-sdxl/{entry.name}", out / entry.name)
    unet = UNet2DConditionModel.from_pretrained(src / "unet")
    unet.save_pretrained(out / "unet", max_shard_size="2MB")
    shards = sorted(p.name for p in (out / "unet").iterdir())
    print("wrote tiny-sdxl-sharded/unet:", shards)
    assert "diffusion_pytorch_model.safetensors.index.json" in shards and len(shards) >= 4, shards
    back = UNet2DConditionModel.from_pretrained(out / "unet")
    for (a, x), (b, y) in zip(sorted(unet.state_dict().items()), sorted(back.state_dict().items())):
        assert a == b and torch.equal(x, y), a


if __name__ == "__main__":
    torch.manual_seed(0)
    mixed()
    body_pose()
    thibaud()
    sharded_sdxl()
