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
    - the rest (sd-turbo, TAESD, Depth Anything, ControlNetHED.pth, and `tiny-taesd`, the server
      tests' VAE id) as links, their layouts being already the published ones.
  * tiny-sdxl-sharded/: tiny-sdxl with its UNet saved by diffusers in shards
    (`diffusion_pytorch_model-0000k-of-00003.safetensors` and
    `diffusion_pytorch_model.safetensors.index.json`), as a recent diffusers saves an fp32 SDXL
    UNet (10.3 GB, over its 10 GB shard size), its first text encoder as transformers' sharded
    torch pickles (`pytorch_model-0000k-of-0000n.bin`, `pytorch_model.bin.index.json`) and its
    second in transformers' safetensors shard names (`model-0000k-of-0000n.safetensors`,
    `model.safetensors.index.json`); the other components link to tiny-sdxl.

Run from the repository root with the reference environment (tests/reference/README.md):
    "$REFENV/bin/python" tests/reference/make_published_layouts.py
Deterministic: the same bytes every run (torch's legacy storage keys are memory addresses,
so they are renamed in the file to 0, 1, 2, ... in order; see `legacy_save`), apart from the
files diffusers and transformers write themselves.
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


# Bytes per element of the storage classes a legacy file names.
ELEMENT_SIZES = {"FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "DoubleStorage": 8,
                 "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1,
                 "ByteStorage": 1, "BoolStorage": 1}


def assert_same_weights(a, b) -> None:
    """The two modules hold the same tensors under the same names, bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys(), sorted(sa.keys() ^ sb.keys())
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


class Named:
    """A global of a pickle read without importing it: its name, and a call that makes nothing."""

    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kwargs):
        return None


def legacy_save(obj, path: Path) -> None:
    """torch.save in the legacy format, made reproducible: torch names each storage by its
    memory address and writes them sorted by that name, so the same object gives other bytes
    on every run. The storages are renamed 0, 1, 2, ... (zero-padded to the same length) in the
    order the object's pickle first names them, and the key list and the storages are written
    in that order; the object's pickle is otherwise torch's, byte for byte."""
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=False)
    data = buffer.getvalue()
    stream = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol version, system information
        pickle.load(stream)
    object_start = stream.tell()
    pids = []

    class Reader(pickle.Unpickler):
        def persistent_load(self, pid):
            pids.append(pid)
            return None

        def find_class(self, module, name):
            return Named(name)

    Reader(stream).load()
    object_end = stream.tell()
    keys = pickle.load(stream)
    position = stream.tell()
    order, element = [], {}
    for pid in pids:
        assert pid[0] == "storage" and pid[5] is None, pid
        if pid[2] not in element:
            order.append(pid[2])
            element[pid[2]] = ELEMENT_SIZES[pid[1].name]
    assert sorted(order) == sorted(keys) and len(set(map(len, keys))) == 1, keys
    chunks = {}
    for key in keys:
        count = int.from_bytes(data[position:position + 8], "little")
        end = position + 8 + count * element[key]
        chunks[key] = data[position:end]
        position = end
    assert position == len(data)
    body = data[object_start:object_end]
    renamed = {key: str(rank).rjust(len(key), "0") for rank, key in enumerate(order)}
    for key, new in renamed.items():
        assert body.count(key.encode()) >= 1, key
        body = body.replace(key.encode(), new.encode())
    out = (data[:object_start] + body + pickle.dumps([renamed[k] for k in order], protocol=2)
           + b"".join(chunks[k] for k in order))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out)
    # torch itself must read the result back, equal.
    back = torch.load(path, weights_only=True)
    flat = back.get("state_dict", back)
    want = obj.get("state_dict", obj)
    assert flat.keys() == want.keys() and all(torch.equal(flat[k], want[k]) for k in want)
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
        assert_same_weights(old, new)
        print("wrote", out.relative_to(FIXTURES.parent.parent), "config.json + diffusion_pytorch_model.bin",
              (out / "diffusion_pytorch_model.bin").stat().st_size, "bytes")
    root = FIXTURES / "published-root"
    link("../../tiny-sd-turbo", root / "stabilityai" / "sd-turbo")
    link("../../tiny-taesd", root / "madebyollin" / "taesd")
    link("../tiny-taesd", root / "tiny-taesd")  # the server tests' `vae` id
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
        if entry.name not in ("unet", "text_encoder", "text_encoder_2"):
            link(f"../tiny-sdxl/{entry.name}", out / entry.name)
    # The second text encoder in transformers' shard names (model-0000k-of-0000n.safetensors,
    # model.safetensors.index.json).
    from transformers import CLIPTextModelWithProjection

    encoder = CLIPTextModelWithProjection.from_pretrained(src / "text_encoder_2")
    encoder.save_pretrained(out / "text_encoder_2", max_shard_size="1MB")
    for f in (out / "text_encoder_2").iterdir():
        os.chmod(f, 0o644)  # safetensors writes 0600
    names = sorted(p.name for p in (out / "text_encoder_2").iterdir())
    print("wrote tiny-sdxl-sharded/text_encoder_2:", names)
    assert "model.safetensors.index.json" in names and len(names) >= 4, names
    back = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder_2")
    assert_same_weights(encoder, back)
    # The first one as sharded torch pickles (pytorch_model-0000k-of-0000n.bin,
    # pytorch_model.bin.index.json), as transformers saved before safetensors.
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(src / "text_encoder")
    # transformers 5 writes safetensors only: the shards are torch.save'd here, named and indexed
    # as transformers 4 wrote them (two shards, in the state dict's order).
    (out / "text_encoder").mkdir()
    shutil.copy(src / "text_encoder" / "config.json", out / "text_encoder" / "config.json")
    state = encoder.state_dict()
    names_in_order = list(state)
    half = len(names_in_order) // 2
    weight_map = {}
    for k, part in enumerate((names_in_order[:half], names_in_order[half:]), start=1):
        shard = f"pytorch_model-{k:05d}-of-00002.bin"
        torch.save(OrderedDict((n, state[n].contiguous()) for n in part), out / "text_encoder" / shard)
        weight_map.update({n: shard for n in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "text_encoder" / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    names = sorted(p.name for p in (out / "text_encoder").iterdir())
    print("wrote tiny-sdxl-sharded/text_encoder:", names)
    assert "pytorch_model.bin.index.json" in names and len(names) >= 4, names
    back = CLIPTextModel.from_pretrained(out / "text_encoder")
    assert_same_weights(encoder, back)
    unet = UNet2DConditionModel.from_pretrained(src / "unet")
    unet.save_pretrained(out / "unet", max_shard_size="2MB")
    # diffusers records the folder it loaded from, a path of this machine: the source's config
    # has none, and neither does the copy.
    config_path = out / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("_name_or_path", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shards = sorted(p.name for p in (out / "unet").iterdir())
    print("wrote tiny-sdxl-sharded/unet:", shards)
    assert "diffusion_pytorch_model.safetensors.index.json" in shards and len(shards) >= 4, shards
    back = UNet2DConditionModel.from_pretrained(out / "unet")
    assert_same_weights(unet, back)


if __name__ == "__main__":
    torch.manual_seed(0)
    mixed()
    body_pose()
    thibaud()
    sharded_sdxl()
