#!/usr/bin/env python3
"""Write a full-size network of the manifest as torch.save writes it (the zip format: an
`archive/data.pkl` whose tensors are `torch._utils._rebuild_tensor_v2` calls on persistent
storage ids, one stored entry `archive/data/<key>` per storage, `byteorder`, `version`), in
float16, with the standard library only: no torch, no numpy. For measuring what loading a
`.bin` as repositories publish it costs (examples/load_memory.rs), not for its values: every
tensor holds the same repeated pattern of finite halves.

  python3 tests/reference/write_torch_bin.py --folder controlnet --out DIR

writes DIR/config.json (the manifest's) and DIR/diffusion_pytorch_model.bin (729 MB for the
SD 2.1 ControlNet's shapes, thibaud's lone fp16 `.bin`).
"""

import argparse
import collections
import io
import json
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

MANIFEST = Path(__file__).resolve().parent / "full_size_manifest.json"


def torch_stand_ins():
    """Modules named like torch's, so that pickle writes torch's globals by name."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    class HalfStorage:  # pickled by reference only
        pass

    HalfStorage.__module__ = "torch"
    HalfStorage.__qualname__ = "HalfStorage"

    def _rebuild_tensor_v2(*args):  # pickled by reference only
        raise RuntimeError("never called here")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    torch.HalfStorage = HalfStorage
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    sys.modules["torch"] = torch
    sys.modules["torch._utils"] = utils
    return HalfStorage, _rebuild_tensor_v2


class Storage:
    def __init__(self, key, elements):
        self.key, self.elements = key, elements


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default="controlnet", help="a folder of the manifest")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    manifest = json.loads(MANIFEST.read_text())
    prefix = f"{args.folder}/"
    weights = [k for k in manifest["weights"] if k.startswith(prefix)]
    if len(weights) != 1:
        sys.exit(f"{args.folder}: {len(weights)} weight files in the manifest; one is written")
    tensors = manifest["weights"][weights[0]]
    half_storage, rebuild = torch_stand_ins()

    class Tensor:
        def __init__(self, storage, shape):
            self.storage, self.shape = storage, tuple(shape)

        def __reduce__(self):
            stride, n = [], 1
            for d in reversed(self.shape):
                stride.insert(0, n)
                n *= d
            return (rebuild, (self.storage, 0, self.shape, tuple(stride), False,
                              collections.OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", half_storage, obj.key, "cpu", obj.elements)
            return None

    state = collections.OrderedDict()
    sizes = []
    for i, (name, shape, _mean, _std) in enumerate(tensors):
        elements = 1
        for d in shape:
            elements *= d
        state[name] = Tensor(Storage(str(i), elements), shape)
        sizes.append((str(i), elements))
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(state)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in manifest["folders"][args.folder]:
        (args.out / name).write_text(json.dumps(manifest["folders"][args.folder][name], indent=2))
    # A pattern of finite halves (±0.001 to ±0.06), 1 MiB, repeated.
    pattern = b"".join(struct.pack("<e", ((i * 7919) % 61 - 30) / 500.0) for i in range(1 << 19))
    path = args.out / "diffusion_pytorch_model.bin"
    total = 0
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, elements in sizes:
            left = elements * 2
            with z.open(f"archive/data/{key}", "w", force_zip64=left > (1 << 31)) as f:
                while left:
                    chunk = pattern[:min(left, len(pattern))]
                    f.write(chunk)
                    left -= len(chunk)
            total += elements * 2
        z.writestr("archive/version", "3\n")
    print(f"{path}: {len(tensors)} tensors, {total / 2**20:.1f} MiB of float16")


if __name__ == "__main__":
    main()
