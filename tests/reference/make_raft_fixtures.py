"""Goldens for RAFT optical flow (models/src/raft.rs) and torchvision's flow_to_image
(core/src/preprocess/flow_image.rs).

Writes tests/fixtures/raft/:
  ../model-root/torchvision/raft_small/raft_small_C_T_V2-01064c6d.safetensors: a random-weight RAFT built by torchvision's own `_raft` builder in
                            raft_small's layout (bottleneck blocks, instance norm in the feature
                            encoder, no norm in the context encoder, 4 levels radius 3, one 3x3
                            GRU, no mask predictor) with narrower widths (NARROW below);
                            torchvision's default initialisation, seed 0, no rescaling (the flows
                            reach 19 px after 12 updates, so they are far from trivial).
  raft_narrow_flows.safetensors
                            two image pairs, uint8 [3, H, W]: a smooth random texture and the
                            same texture shifted by (dy, dx) = (2, 3): `square` 128x128 and `wide`
                            128x192 (torchvision needs at least 128 a side with 4 pyramid levels);
                            and the narrow RAFT's upsampled flows [1, 2, H, W] (f32) for
                            num_flow_updates=12, `<pair>.flow.<i>` for the 1-based iterations in
                            KEPT_ITERATIONS. The network input is the OpticalFlow preset of
                            Raft_Small_Weights.C_T_V2: x/255 then (x - 0.5)/0.5.
  flow_image.safetensors    flow_to_image goldens: `wheel` (the 55x3 colour wheel) and, per case,
                            `<case>.flow` (f32) and `<case>.image` (uint8 [3, H, W]), batched
                            [K, ...] where each of the K flows is coloured on its own. Cases:
                            random, smooth, zero, single (single non-zero vectors), boundary
                            (vectors along every wheel entry's direction, at several lengths, with
                            their 1-ulp neighbours and signed zeros), raft (the square pair's last
                            flow). `<case>.image_cpu` is the same call with torch's own CPU sqrt and
                            atan2 (see below), kept to measure what 1-ulp differences do.

About `image` versus `image_cpu`: torch 2.15's float32 sqrt and atan2 on CPU are not correctly
rounded (1 ulp off in about 20% / 2% of values here). `image` is torchvision's flow_to_image run
with those two elementwise functions replaced, for the duration of the call, by correctly rounded
ones (evaluated in float64 and rounded to float32); every other operation is torchvision's own.
That makes the golden a property of the arithmetic rather than of one CPU's vector math library.

Run (from the repository root, a few seconds): python tests/reference/make_raft_fixtures.py
Deterministic: fixed seeds, CPU, float32, one thread; running it twice gives identical files.
"""

import pathlib
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.nn import InstanceNorm2d
from torchvision.models.optical_flow import Raft_Small_Weights
from torchvision.models.optical_flow.raft import BottleneckBlock, _raft
from torchvision.utils import _make_colorwheel, flow_to_image

OUT = pathlib.Path(__file__).resolve().parents[2] / "tests/fixtures/raft"
# The narrow net sits where the model root tests/fixtures/model-root finds raft_small's file.
NARROW_FILE = OUT.parent / "model-root/torchvision/raft_small/raft_small_C_T_V2-01064c6d.safetensors"

# raft_small's layout with narrower widths (raft_small: feature (32, 32, 64, 96, 128), context
# (32, 32, 64, 96, 160), motion corr (96,), flow (64, 32), out 82, hidden 96, flow head 128).
NARROW = dict(
    feature_encoder_layers=(8, 8, 12, 16, 24),
    feature_encoder_block=BottleneckBlock,
    feature_encoder_norm_layer=InstanceNorm2d,
    context_encoder_layers=(8, 8, 12, 16, 28),
    context_encoder_block=BottleneckBlock,
    context_encoder_norm_layer=None,
    corr_block_num_levels=4,
    corr_block_radius=3,
    motion_encoder_corr_layers=(24,),
    motion_encoder_flow_layers=(16, 8),
    motion_encoder_out_channels=22,
    recurrent_block_hidden_state_size=16,
    recurrent_block_kernel_size=(3,),
    recurrent_block_padding=(1,),
    flow_head_hidden_size=24,
    use_mask_predictor=False,
)
NUM_FLOW_UPDATES = 12
PAIRS = {"square": (128, 128), "wide": (128, 192)}
KEPT_ITERATIONS = {"square": (1, 2, 12), "wide": (1, 12)}
SHIFT = (2, 3)


def texture(height, width, seed):
    """A smooth random RGB texture, uint8 [3, height, width]: two octaves of bicubically
    upsampled uniform noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 16 + 2, width // 16 + 2, generator=g)
    fine = torch.rand(1, 3, height // 4 + 2, width // 4 + 2, generator=g)
    size = (height, width)
    img = 0.7 * F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
    img = img + 0.3 * F.interpolate(fine, size=size, mode="bicubic", align_corners=False)
    return (img[0] * 255).round().clamp(0, 255).to(torch.uint8)


def raft_fixtures():
    torch.manual_seed(0)
    model = _raft(**NARROW).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    NARROW_FILE.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, NARROW_FILE)
    preset = Raft_Small_Weights.C_T_V2.transforms()
    tensors = {}
    last_square_flow = None
    for seed, (name, (h, w)) in enumerate(PAIRS.items(), start=1):
        dy, dx = SHIFT
        tex = texture(h + dy, w + dx, seed)
        img1 = tex[:, :h, :w].contiguous()
        img2 = tex[:, dy : dy + h, dx : dx + w].contiguous()
        tensors[f"{name}.image1"] = img1
        tensors[f"{name}.image2"] = img2
        x1, x2 = preset(img1[None], img2[None])
        with torch.no_grad():
            flows = model(x1, x2, num_flow_updates=NUM_FLOW_UPDATES)
        for i in KEPT_ITERATIONS[name]:
            tensors[f"{name}.flow.{i}"] = flows[i - 1].contiguous()
        print(name, "max |flow| per iteration:", [round(f.abs().max().item(), 3) for f in flows])
        if name == "square":
            last_square_flow = flows[-1][0]
    save_file(tensors, OUT / "raft_narrow_flows.safetensors")
    return last_square_flow


def _sqrt_correctly_rounded(self):
    return torch.sqrt(self.double()).float()


def _atan2_correctly_rounded(y, x):
    return torch.from_numpy(np.arctan2(y.double().numpy(), x.double().numpy())).float()


def flow_to_image_exact(flow):
    """torchvision's flow_to_image with correctly rounded float32 sqrt and atan2."""
    with (
        mock.patch.object(torch.Tensor, "sqrt", _sqrt_correctly_rounded),
        mock.patch.object(torch, "atan2", _atan2_correctly_rounded),
    ):
        return flow_to_image(flow)


def flow_cases(raft_flow):
    g = torch.Generator().manual_seed(5)
    cases = {}
    cases["random"] = (torch.randn(2, 48, 64, generator=g) * 4.0)[None]

    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 48), torch.linspace(-1.5, 1.5, 72), indexing="ij")
    smooth_u = -2.0 * yy + 0.7 * xx + 0.5 * torch.sin(3.0 * xx + 1.0)
    smooth_v = 2.0 * xx + 0.3 * yy + 0.4 * torch.cos(2.5 * yy)
    cases["smooth"] = torch.stack([smooth_u, smooth_v])[None]

    cases["zero"] = torch.zeros(1, 2, 8, 8)

    vectors = torch.randn(24, 2, generator=g) * torch.logspace(-3, 2, 24)[:, None]
    # Axis-aligned, generic, tiny (where epsilon matters), and three vectors (found by a search)
    # whose normalised length rounds to 1 + 1 ulp, so that zero channels wrap to 255.
    vectors[:7] = torch.tensor(
        [
            [3.0, 0.0],
            [0.0, -2.0],
            [2.5, -1.25],
            [1e-6, 3e-6],
            [12.034028, -1.238278],
            [-8.423567, -18.061327],
            [17.206947, 15.866823],
        ]
    )
    single = torch.zeros(len(vectors), 2, 4, 5)
    for k, (u, v) in enumerate(vectors):
        single[k, 0, k % 4, (3 * k) % 5] = u
        single[k, 1, k % 4, (3 * k) % 5] = v
    cases["single"] = single

    # The direction of wheel entry k: atan2(-v, -u) = pi * (2k/54 - 1).
    k = np.arange(55)
    angle = np.pi * (2.0 * k / 54.0 - 1.0)
    lengths = np.array([0.05, 0.3, 0.5, 0.999, 1.0, 2.0])
    u = (-np.outer(lengths, np.cos(angle))).astype(np.float32)
    v = (-np.outer(lengths, np.sin(angle))).astype(np.float32)
    rows_u = [u, u, u]
    rows_v = [v, np.nextafter(v, np.float32(np.inf)), np.nextafter(v, np.float32(-np.inf))]
    boundary_u = np.concatenate(rows_u)
    boundary_v = np.concatenate(rows_v)
    # Axis directions with both signs of zero (atan2 tells -0 from +0).
    axes = np.array(
        [[1, 0], [1, -0.0], [-1, 0], [-1, -0.0], [0, 1], [-0.0, 1], [0, -1], [-0.0, -1]]
        + [[0, 0], [-0.0, -0.0]],
        dtype=np.float32,
    )
    axis_u = np.zeros((1, 55), np.float32)
    axis_v = np.zeros((1, 55), np.float32)
    axis_u[0, : len(axes)] = axes[:, 0] * 0.5
    axis_v[0, : len(axes)] = axes[:, 1] * 0.5
    boundary_u = np.concatenate([boundary_u, axis_u])
    boundary_v = np.concatenate([boundary_v, axis_v])
    # One field normalised by its own longest vectors (the length-2 row, which therefore sits on
    # the wheel entries at full length) and one by a longer vector added off the wheel
    # directions, so that maximal-length and shorter boundary vectors are both covered.
    bounded = torch.from_numpy(np.stack([boundary_u, boundary_v]))
    longer = bounded.clone()
    longer[:, -1, -1] = torch.tensor([-2.7, 1.9])
    cases["boundary"] = torch.stack([bounded, longer])

    cases["raft"] = raft_flow[None].contiguous()
    return cases


def flow_image_fixtures(raft_flow):
    tensors = {"wheel": _make_colorwheel().to(torch.uint8)}
    for name, flows in flow_cases(raft_flow).items():
        flows = flows.contiguous().float()
        exact = torch.stack([flow_to_image_exact(f) for f in flows])
        cpu = torch.stack([flow_to_image(f) for f in flows])
        tensors[f"{name}.flow"] = flows
        tensors[f"{name}.image"] = exact
        tensors[f"{name}.image_cpu"] = cpu
        differing = (exact != cpu).sum().item()
        print(
            f"flow_to_image {name}: {tuple(flows.shape)}, {differing} of {exact.numel()} bytes"
            " differ with torch's CPU sqrt/atan2"
        )
    save_file(tensors, OUT / "flow_image.safetensors")


def main():
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    raft_flow = raft_fixtures()
    flow_image_fixtures(raft_flow)
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
