"""The frame layout of a multi-view UNet call, shared by inference and training.

One item is ``frames`` latents, views first; an ImageDream model adds the reference slot as
the last frame (``frames = views + 1``). The slot's camera is all zeros, its noisy input never
matters (the UNet puts the clean reference latent there), and it is dropped from the output.

With classifier-free guidance the batch is ``[unconditional rows…, conditional rows…]``, each
``items × frames`` rows with views fastest. Conditional: the prompt's text states, the photo's
CLIP states and its reference latent. Unconditional: the negative prompt's text states, zero
CLIP states (the UNet still resamples them) and a zero reference latent, the same cameras.
Training's image dropout is that unconditional image condition; its text dropout the empty
prompt.

Noising is ``x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε`` (``add_noise``), for refinement, score
distillation and training alike.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .cameras import CameraParams, camera_vectors

# The components of every published MVDream / ImageDream folder; ImageDream adds the image encoder.
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
IMAGE_COMPONENTS = ("image_encoder", "feature_extractor")
CAMERA_DIM = 16  # a flattened 4x4 camera-to-world matrix


def components(model_path: Path, index: dict) -> tuple[list[str], bool]:
    """``(missing, image_conditioned)`` for a model folder and its ``model_index.json``: the
    required components it lacks (not listed, or no folder), and whether it has both image ones."""
    listed = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}

    def present(name: str) -> bool:
        return name in listed and (Path(model_path) / name).is_dir()

    return [c for c in REQUIRED_COMPONENTS if not present(c)], all(present(c) for c in IMAGE_COMPONENTS)


def networks(image_conditioned: bool) -> tuple[str, ...]:
    """The components with weights, in loading order."""
    return ("unet", "vae", "text_encoder") + (("image_encoder",) if image_conditioned else ())


def num_frames(views: int, image_conditioned: bool) -> int:
    """Frames per item: the views, and ImageDream's reference slot."""
    return views + 1 if image_conditioned else views


def with_reference_slot(x: np.ndarray, frames: int) -> np.ndarray:
    """float32 views' rows (V, ...) and zeros for the frames after them (the reference slot)."""
    x = np.asarray(x, np.float32)
    return np.concatenate([x, np.zeros((frames - len(x),) + x.shape[1:], np.float32)])


def camera_rows(cameras: list[CameraParams] | np.ndarray, frames: int) -> np.ndarray:
    """float32 (frames, 16): the views' camera vectors, then the reference slot's zero camera."""
    vectors = camera_vectors(cameras) if isinstance(cameras, list) else np.asarray(cameras, np.float32)
    return with_reference_slot(vectors, frames)


def add_noise(x0: Any, noise: Any, alpha_bar: float) -> Any:
    """``√ᾱ·x₀ + √(1 − ᾱ)·ε`` (numpy or backend arrays; float32 stays float32)."""
    a = float(alpha_bar)
    return math.sqrt(a) * x0 + math.sqrt(1.0 - a) * noise


def unconditional(x: Any) -> Any:
    """The unconditional branch's image condition for ``x`` (CLIP states or a reference latent): zeros."""
    return x * 0.0


def branches(unconditional_rows: list, conditional_rows: list, guided: bool) -> list:
    """The rows of a UNet call: the unconditional ones first when guidance is on, then the conditional ones."""
    return (list(unconditional_rows) if guided else []) + list(conditional_rows)


def unet_inputs(backend, conds: list, cameras: list[CameraParams], frames: int, guided: bool,
                image_conditioned: bool) -> dict:
    """The UNet's conditioning arguments for ``conds`` (``Conditioning``s, one per item) in the
    layout above: ``context``, ``camera``, ``num_frames`` and, for ImageDream, ``ip`` (per frame)
    and ``ip_img`` (per item). Cameras repeat per item (c0..c3, ref, c0..c3, ref), never interleaved."""
    b = backend
    per_frame = [c for c in conds for _ in range(frames)]
    kw = {"context": b.concat(branches([c.negative_text for c in per_frame], [c.text for c in per_frame], guided)),
          "num_frames": frames}
    if image_conditioned:
        ip = [c.clip_states for c in per_frame]
        ref = [c.reference_latent for c in conds]
        kw["ip"] = b.concat(branches([unconditional(ip[0])] * len(ip), ip, guided))
        kw["ip_img"] = b.concat(branches([unconditional(ref[0])] * len(ref), ref, guided))
    kw["camera"] = b.asarray(np.tile(camera_rows(cameras, frames), ((2 if guided else 1) * len(conds), 1)))
    return kw


__all__ = ["CAMERA_DIM", "IMAGE_COMPONENTS", "REQUIRED_COMPONENTS", "add_noise", "branches", "camera_rows",
           "components", "networks", "num_frames", "unconditional", "unet_inputs", "with_reference_slot"]
