"""Golden vectors for sdstream's torch-compatible generator (core/src/pipeline/rng.rs).

Writes tests/fixtures/rng/torch_randn.json: torch.randn / torch.rand outputs on CPU float32 for several
seeds and shapes, as hex-encoded IEEE-754 bit patterns (8 hex digits per value, big-endian u32), so the
Rust test can compare in ulps. Large tensors are stored sampled (every `stride`-th value plus the last 16)
with an exact f64 sum of all values and the sum of all bit patterns (u64).

Run: python tests/reference/make_rng_golden.py   (in the environment of tests/reference/README.md)
"""

import math

import numpy as np
import torch

from _common import FIXTURES, hexbits, write_json_dense

SEEDS = [0, 1, 42, 789, 2**32 + 5, 2**53 - 1]
FULL_SHAPES = [[1], [7], [15], [16], [17], [33], [256], [1, 4, 8, 8]]
SAMPLED_SHAPES = [[1000], [3, 4, 64, 64]]
STRIDE = 97

# Sequences of calls on one generator: draws must be consumed in torch's order, including the cached
# second Box-Muller sample of the scalar (n < 16) path.
SEQUENCES = [
    (42, [("randn", [7]), ("randn", [5]), ("randn", [33]), ("randn", [1, 4, 8, 8]), ("randn", [3]),
          ("rand", [20]), ("randn", [1]), ("randn", [1])]),
    (789, [("randn", [2, 4, 8, 8]), ("randn", [16]), ("randn", [9]), ("rand", [5]), ("randn", [17])]),
    (2**32 + 5, [("randn", [1]), ("randn", [1]), ("randn", [1]), ("randn", [31])]),
]


def main() -> None:
    out = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "full": [], "sampled": [], "sequences": []}
    for seed in SEEDS:
        for shape in FULL_SHAPES:
            g = torch.Generator().manual_seed(seed)
            t = torch.randn(shape, generator=g)
            out["full"].append({"seed": seed, "shape": shape, "bits": hexbits(t)})
        for shape in SAMPLED_SHAPES:
            g = torch.Generator().manual_seed(seed)
            flat = torch.randn(shape, generator=g).view(-1)
            out["sampled"].append({
                "seed": seed, "shape": shape, "stride": STRIDE,
                "bits": hexbits(flat[::STRIDE]), "tail": hexbits(flat[-16:]),
                "fsum": math.fsum(flat.double().tolist()),
                # Order-independent exact checksum of every value's bit pattern.
                "bitsum": int(flat.numpy().view(np.uint32).astype(np.uint64).sum()),
            })
    for seed, calls in SEQUENCES:
        g = torch.Generator().manual_seed(seed)
        results = []
        for op, shape in calls:
            t = torch.randn(shape, generator=g) if op == "randn" else torch.rand(shape, generator=g)
            results.append({"op": op, "shape": shape, "bits": hexbits(t)})
        out["sequences"].append({"seed": seed, "calls": results})
    write_json_dense(FIXTURES / "rng" / "torch_randn.json", out)


if __name__ == "__main__":
    main()
