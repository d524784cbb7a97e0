"""Tiny models and datasets for the training tests (built once per module, in a temp folder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from oxigaf.cameras import default_cameras, transforms_json

from conftest import FIXTURES

E2E_MODEL = FIXTURES / "imagedream_e2e" / "model"

# A much smaller UNet than the fixtures' (two levels, 64 channels, 8x8 latents) so a training
# step is cheap; the other components are the e2e fixture's. 64 channels, not 32: with one
# channel per GroupNorm group a conv bias before a norm has no effect and its gradient is
# rounding noise, which Adam would blow up to ±lr.
TINY_UNET = {
    "_class_name": "MultiViewUNetModel", "image_size": 8, "in_channels": 4, "model_channels": 64,
    "out_channels": 4, "num_res_blocks": 1, "attention_resolutions": [1, 2], "channel_mult": [1, 1],
    "num_head_channels": 32, "context_dim": 64, "camera_dim": 16, "transformer_depth": 1, "ip_dim": 4,
}


def unet_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    import torch

    from oxigaf.config import UNetConfig
    from oxigaf_torch.unet import MultiViewUNet

    with torch.device("meta"):
        model = MultiViewUNet(UNetConfig.from_dict(config, "tiny"))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def random_unet_state(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights: fan-in scaled normals for matrices, ones for norm scales, small biases."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in sorted(unet_shapes(config).items()):
        if len(shape) == 1:
            v = np.ones(shape) if "norm" in name and name.endswith("weight") else 0.02 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            v = rng.standard_normal(shape) / np.sqrt(fan_in)
        out[name] = v.astype(np.float32)
    return out


def make_model(folder: Path, unet_config: dict | None = None, seed: int = 0) -> Path:
    """The e2e fixture's pipeline folder with a tiny random UNet."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    shutil.copytree(E2E_MODEL, folder, ignore=shutil.ignore_patterns("unet"))
    cfg = dict(unet_config or TINY_UNET)
    (folder / "unet").mkdir()
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))
    save_file(random_unet_state(cfg, seed), str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    return folder


def make_subject(folder: Path, seed: int, size: int = 48, frames: int = 5, elevation: float = 5.0,
                 normals: bool = False, rgba: bool = False, prompt: str | None = None) -> Path:
    """Random images at ``frames`` orbit cameras, written as MultiViewOutput.save() writes them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cams = default_cameras(frames, elevation)
    tj = transforms_json(cams, size)
    rng = np.random.default_rng(seed)
    for i, fr in enumerate(tj["frames"]):
        channels = 4 if rgba else 3
        Image.fromarray(rng.integers(0, 256, (size, size, channels), dtype=np.uint8)).save(folder / fr["file_path"])
        if normals:
            name = f"normal_{i:02d}.png"
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
            fr["normal_file_path"] = name
    if prompt is not None:
        tj["prompt"] = prompt
    (folder / "transforms.json").write_text(json.dumps(tj))
    return folder


def make_data(root: Path, subjects: int = 2, **kw) -> Path:
    root = Path(root)
    for s in range(subjects):
        make_subject(root / f"subject_{s}", seed=s, size=48 + 16 * s, rgba=s == 1, **kw)
    return root
