"""The full-size raft_small check (not committed: 4 MB of weights): torchvision's raft_small with
its default random init (seed 0) on a 128x128 textured pair shifted by (2, 3). Writes, into the
folder given as the first argument (default: raft-full-check under the system's temporary folder),
raft_small_random.safetensors (the state dict) and flows.safetensors (image1, image2 as uint8;
flow.1 .. flow.12). Then run the ignored Rust test with that folder:

  python tests/reference/make_raft_full_check.py /some/dir
  RAFT_FULL_CHECK_DIR=/some/dir cargo test -p sdstream --test integration -- --ignored raft::full_size
"""

import pathlib
import sys
import tempfile

import torch
from safetensors.torch import save_file
from torchvision.models.optical_flow import Raft_Small_Weights, raft_small

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_raft_fixtures import texture  # noqa: E402

torch.set_num_threads(1)
out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(tempfile.gettempdir()) / "raft-full-check")
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
model = raft_small().eval()
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "raft_small_random.safetensors")
tex = texture(130, 131, 7)
img1 = tex[:, :128, :128].contiguous()
img2 = tex[:, 2:130, 3:131].contiguous()
x1, x2 = Raft_Small_Weights.C_T_V2.transforms()(img1[None], img2[None])
with torch.no_grad():
    flows = model(x1, x2, num_flow_updates=12)
tensors = {"image1": img1, "image2": img2}
for i, f in enumerate(flows):
    tensors[f"flow.{i + 1}"] = f.contiguous()
print("flow magnitudes per update:", [round(f.abs().max().item(), 3) for f in flows])
save_file(tensors, out / "flows.safetensors")
print("wrote", out)
