"""The embedded default: a tiny random-weight ImageDream model and latent upsampler.

With no real weights on the machine, ``oxigaf demo`` still runs the whole path: it builds,
deterministically from the manifests in ``demo_data/`` (configs, tokenizer files, tensor
names and shapes), a tiny model in the published folder layouts under the user cache, then
generates from it. Its views are noise: it proves the machinery, not the model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from . import synthetic

DATA = Path(__file__).parent / "demo_data"
# Bump when the manifests or the weight recipe change, so stale caches are rebuilt.
VERSION = "2"


def cache_dir() -> Path:
    root = os.environ.get("OXIGAF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "oxigaf")
    return Path(root)


def bundled_portrait() -> Path:
    """A public-domain portrait (NASA), 256×256."""
    return DATA / "portrait.png"


def random_weights(shapes: dict[str, list[int]], seed: int) -> dict[str, np.ndarray]:
    """The demo's recipe (``synthetic.random_weights``): norm scales exactly 1, biases 0, matrices
    normal with std 1/sqrt(fan_in), float16."""
    return synthetic.random_weights(shapes, seed, norm_scale_std=0.0, bias_std=0.0)


def _build(src: Path, dst: Path, weight_names: dict[str, str], seed: int) -> None:
    from safetensors.numpy import save_file

    def fill(tmp: Path) -> None:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("keys.json", "*.png"))
        for i, (component, filename) in enumerate(sorted(weight_names.items())):
            shapes = json.loads((src / component / "keys.json").read_text())
            save_file(random_weights(shapes, seed + i), str(tmp / component / filename))
        (tmp / "OXIGAF_DEMO_VERSION").write_text(VERSION)

    synthetic.build_folder(dst, fill)


def tiny_model(root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Folders of the tiny ImageDream model and tiny sd-x2-style upscaler (built once)."""
    root = Path(root) if root is not None else cache_dir() / "tiny-random"
    model, upscaler = root / "imagedream", root / "upscaler"
    for dst, src, names, seed in (
        (model, DATA / "imagedream", {"unet": "diffusion_pytorch_model.safetensors",
                                       "vae": "diffusion_pytorch_model.safetensors",
                                       "text_encoder": "model.safetensors", "image_encoder": "model.safetensors"}, 0),
        (upscaler, DATA / "upscaler", {"unet": "diffusion_pytorch_model.safetensors",
                                        "text_encoder": "model.safetensors"}, 100),
    ):
        marker = dst / "OXIGAF_DEMO_VERSION"
        if not (marker.is_file() and marker.read_text() == VERSION):
            _build(src, dst, names, seed)
    return model, upscaler
