"""Reference-fixture parity of the torch UNet on a CUDA device (run on a GPU machine).

    python tools/cuda_check.py tests/fixtures/mvunet

float32 with TF32 off must stay within 1e-4 relative L2 of the reference in every attention mode;
float16 / bfloat16 are reported against float32.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from oxigaf_torch.unet import load_unet

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(root: Path) -> int:
    dev = torch.device("cuda")
    print("device", torch.cuda.get_device_name(0), "torch", torch.__version__)
    ok = True
    for case in sorted(p for p in root.iterdir() if (p / "io.safetensors").is_file()):
        io = load_file(case / "io.safetensors")
        frames = json.loads((case / "io.json").read_text())["num_frames"]
        args = {k: torch.from_numpy(io[k]).to(dev) for k in ("x", "timesteps", "context", "camera")}
        kw = {}
        if "ip_per_batch" in io:
            kw = {"ip": torch.from_numpy(np.repeat(io["ip_per_batch"], frames, 0)).to(dev),
                  "ip_img": torch.from_numpy(io["ip_img"]).to(dev)}
        results = {}
        for dtype in ("float32", "float16", "bfloat16"):
            unet = load_unet(case / "unet", dtype=dtype, device=dev)
            for mode in ("sdpa", "chunked", "naive") if dtype == "float32" else ("sdpa",):
                out = unet(args["x"], args["timesteps"], args["context"], camera=args["camera"],
                           num_frames=frames, attention=mode, **kw).float().cpu().numpy()
                results[(dtype, mode)] = out
                err = rel(out, io["expected"])
                good = np.isfinite(out).all() and (err <= 1e-4 if dtype == "float32" else err <= 3e-2)
                ok &= bool(good)
                print(f"{case.name:16s} {dtype:9s} {mode:8s} rel L2 vs reference {err:.2e} {'ok' if good else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/mvunet")))
