#!/usr/bin/env python3
"""Times torch's fused attention (scaled_dot_product_attention) on the shapes sd-turbo's UNet
meets at 512², one backend at a time (flash, cuDNN, memory-efficient, math), in f16 or bf16 on a
CUDA GPU: the well-kept kernels sdstream's own fused attention (kernels/src/attention.cu) is
measured against. Each figure is the mean of CUDA-event-timed calls after warm-up calls.

  python scripts/gpu-kit/sdpa_reference.py [--dtype f16|bf16] [--reps 50] [--out FILE.md]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

# The CUDA-event timing the kit's torch figures share (this script's folder is on the path).
from graph_reference import timed

# (label, batch, heads, queries, keys, head dim): sd-turbo (SD 2.1) at 512², one-step stream batch.
SHAPES = [
    ("64² self", 1, 5, 4096, 4096, 64),
    ("64² cross", 1, 5, 4096, 77, 64),
    ("32² self", 1, 10, 1024, 1024, 64),
    ("32² cross", 1, 10, 1024, 77, 64),
    ("16² self", 1, 20, 256, 256, 64),
    ("16² cross", 1, 20, 256, 77, 64),
    ("8² self", 1, 20, 64, 64, 64),
    ("SD1.5 64² self", 1, 8, 4096, 4096, 40),
    ("64² self, 8 images", 8, 5, 4096, 4096, 64),
    ("64² cross, 8 images", 8, 5, 4096, 77, 64),
]
BACKENDS = [
    ("flash", SDPBackend.FLASH_ATTENTION),
    ("cudnn", SDPBackend.CUDNN_ATTENTION),
    ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ("math", SDPBackend.MATH),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="f16", choices=("f16", "bf16"))
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    lines = [
        f"torch {torch.__version__} scaled_dot_product_attention, {torch.cuda.get_device_name()}, {args.dtype}, "
        f"mean of {args.reps} calls (CUDA events), ms per call",
        "",
        "| shape | B×H | N | M | d | " + " | ".join(name for name, _ in BACKENDS) + " |",
        "|---|---|---:|---:|---:|" + "---:|" * len(BACKENDS),
    ]
    for label, b, h, n, m, d in SHAPES:
        q = torch.randn(b, h, n, d, device="cuda", dtype=dtype)
        k = torch.randn(b, h, m, d, device="cuda", dtype=dtype)
        v = torch.randn(b, h, m, d, device="cuda", dtype=dtype)
        cells = []
        for _, backend in BACKENDS:
            try:
                with sdpa_kernel(backend):
                    cells.append(f"{timed(lambda: scaled_dot_product_attention(q, k, v), 'cuda', 5, args.reps):.4f}")
            except RuntimeError as e:
                cells.append("n/a")
                print(f"{label} {backend}: {str(e).splitlines()[0][:120]}")
        lines.append(f"| {label} | {b}×{h} | {n} | {m} | {d} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
