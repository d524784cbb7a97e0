"""Real-shape random checkpoints for the benchmarks, built once into a cache folder.

``manifests/`` holds the published ``config.json`` and ``keys.json`` (every tensor name and
shape) of the four ImageDream components and the two of the sd-x2 latent upscaler, copied
from ``shared/checkpoints`` so the benchmarks
run on a machine without the test fixtures. Weights (``random_weights``) are float16: matrices
and convolution kernels normal with std 1/sqrt(fan_in), every 1-D ``weight`` (in these models
always a normalisation scale, whatever its module is called: the LDM names say ``in_layers.0``)
1 + N(0, 0.1²), biases N(0, 0.02²). Activations then stay in a realistic range through the
whole network, which matters for the bfloat16 drift figure (a fixed std 0.02 would shrink the
signal layer by layer, and zero norm scales would switch whole blocks off).

The folder ``<cache>/imagedream`` is laid out as the published pipeline
(``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``image_encoder/``,
``scheduler/``, ``tokenizer/``, ``feature_extractor/``); the small files come from the demo
model's data (its tokenizer is a stub vocabulary, which only changes which ids are looked up).
``<cache>/upscaler`` is the upscaler's folder (``unet/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``), the small files again from the demo's.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from oxigaf import synthetic

HERE = Path(__file__).resolve().parent
MANIFESTS = HERE / "manifests"
# Bump when the manifests or the weight recipe change, so stale caches are rebuilt.
VERSION = "2"

# model folder -> component folder -> (manifest, weight file name, seed)
MODELS = {
    "imagedream": {
        "unet": ("imagedream-unet", "diffusion_pytorch_model.safetensors", 0),
        "vae": ("sd21-vae", "diffusion_pytorch_model.safetensors", 1),
        "text_encoder": ("sd21-text-encoder", "model.safetensors", 2),
        "image_encoder": ("clip-vit-h14-vision", "model.safetensors", 3),
    },
    # stabilityai/sd-x2-latent-upscaler: its K-UNet and its CLIP ViT-L/14 text encoder
    "upscaler": {
        "unet": ("sd-x2-latent-upscaler-unet", "diffusion_pytorch_model.safetensors", 4),
        "text_encoder": ("clip-vit-l14-text", "model.safetensors", 5),
    },
}
# the small files each model folder takes from the demo model's data of the same name
SMALL_FOLDERS = {"imagedream": ("scheduler", "tokenizer", "feature_extractor"), "upscaler": ("scheduler", "tokenizer")}


def random_weights(shapes: dict[str, list[int]], seed: int) -> dict[str, np.ndarray]:
    """The benchmarks' recipe (``oxigaf.synthetic.random_weights``; module docstring)."""
    return synthetic.random_weights(shapes, seed, norm_scale_std=0.1, bias_std=0.02)


def cache_dir() -> Path:
    return Path(os.environ.get("OXIGAF_BENCH_CACHE") or HERE / ".cache")


def model_root() -> Path:
    return cache_dir() / "imagedream"


def component(name: str, model: str = "imagedream") -> Path:
    """The folder of one component (config.json + random weights), built on first use."""
    manifest, filename, seed = MODELS[model][name]
    dst = cache_dir() / model / name
    marker = dst / "BENCH_VERSION"
    if marker.is_file() and marker.read_text() == VERSION:
        return dst
    from safetensors.numpy import save_file

    def fill(tmp: Path) -> None:
        shutil.copy(MANIFESTS / manifest / "config.json", tmp / "config.json")
        shapes = json.loads((MANIFESTS / manifest / "keys.json").read_text())
        save_file(random_weights(shapes, seed), str(tmp / filename))
        (tmp / "BENCH_VERSION").write_text(VERSION)

    synthetic.build_folder(dst, fill)
    return dst


def model_folder(model: str) -> Path:
    """A whole model folder in its published layout: every component built, the small files
    (scheduler, tokenizer, ..., model_index.json) copied from the demo model's data."""
    from oxigaf.demo import DATA

    root = cache_dir() / model
    for name in MODELS[model]:
        component(name, model)
    demo = DATA / model
    for small in SMALL_FOLDERS[model]:
        if not (root / small).is_dir():
            shutil.copytree(demo / small, root / small)
    if not (root / "model_index.json").is_file():
        shutil.copy(demo / "model_index.json", root / "model_index.json")
    return root


def pipeline_folder() -> Path:
    """The whole ImageDream folder."""
    return model_folder("imagedream")


def upscaler_folder() -> Path:
    """The sd-x2 latent upscaler folder (UNet and text encoder)."""
    return model_folder("upscaler")


if __name__ == "__main__":
    print(pipeline_folder())
