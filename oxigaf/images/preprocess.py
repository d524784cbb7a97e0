"""What the encoders see: ``CLIPPreprocessor`` (transformers' ``CLIPImageProcessor``, PIL path) and the
VAE's input (``vae_input`` for the reference image, ``vae_views`` for views to refine)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..checkpoints import read_json
from ..errors import ConfigError, InputError, ModelLoadError
from .load import _positive_int, load_image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _size_pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, Mapping):
        value = (value.get("height"), value.get("width"))
    elif isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ConfigError(f"{name} must be a positive integer or {{'height': h, 'width': w}}, got {value!r}")
    return int(value[0]), int(value[1])



def _triple(value, name: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ConfigError(f"{name} must be three numbers (R, G, B), got {value!r}")
    out = tuple(float(v) for v in value)
    if not all(math.isfinite(v) for v in out):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return out


@dataclass(frozen=True)
class CLIPPreprocessor:
    """CLIP image preprocessing: resize, centre crop, rescale, normalise -> float32 (B, 3, H, W).

    ``shortest_edge`` (optionally with ``longest_edge``) resizes keeping the aspect ratio,
    ``resize_to`` (height, width) resizes to a fixed size; ``resample`` is a PIL filter number
    (3 = bicubic). The arithmetic follows transformers' PIL backend step by step (8-bit resize
    and crop, rescale in float64 then float32, normalise in float32), so results agree exactly.
    """

    shortest_edge: int | None = 224
    longest_edge: int | None = None
    resize_to: tuple[int, int] | None = None
    crop_size: tuple[int, int] = (224, 224)
    resample: int = 3
    rescale_factor: float = 1.0 / 255.0
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    def __post_init__(self):
        if self.do_resize and (self.shortest_edge is None) == (self.resize_to is None):
            raise ConfigError("set exactly one of shortest_edge and resize_to")
        if self.shortest_edge is not None:
            _positive_int(self.shortest_edge, "shortest_edge")
        if self.longest_edge is not None:
            _positive_int(self.longest_edge, "longest_edge")
        if self.resize_to is not None:
            object.__setattr__(self, "resize_to", _size_pair(tuple(self.resize_to), "resize_to"))
        object.__setattr__(self, "crop_size", _size_pair(tuple(self.crop_size), "crop_size"))
        if isinstance(self.resample, bool) or self.resample not in tuple(int(r) for r in Image.Resampling):
            raise ConfigError(f"resample must be a PIL filter number 0..5, got {self.resample!r}")
        if not isinstance(self.rescale_factor, (int, float)) or not math.isfinite(self.rescale_factor):
            raise ConfigError(f"rescale_factor must be a finite number, got {self.rescale_factor!r}")
        object.__setattr__(self, "image_mean", _triple(self.image_mean, "image_mean"))
        object.__setattr__(self, "image_std", _triple(self.image_std, "image_std"))
        if any(s == 0 for s in self.image_std):
            raise ConfigError("image_std must not contain 0")

    @classmethod
    def from_dict(cls, d: Mapping) -> CLIPPreprocessor:
        """From a ``preprocessor_config.json`` in either shape: ``size: 224, crop_size: 224`` (older
        files) or ``size: {"shortest_edge": 224}`` / ``{"height", "width"}`` and
        ``crop_size: {"height", "width"}`` (newer files). Missing keys take CLIP's defaults."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"preprocessor config must be a mapping, got {type(d).__name__}")
        kwargs: dict = {}
        size = d.get("size", {"shortest_edge": 224})
        # CLIP reads a bare integer size as the shortest edge (transformers: default_to_square=False).
        if isinstance(size, int) and not isinstance(size, bool):
            kwargs["shortest_edge"] = size
        elif isinstance(size, Mapping) and size.get("shortest_edge") is not None:
            kwargs["shortest_edge"] = size["shortest_edge"]
            kwargs["longest_edge"] = size.get("longest_edge")
        elif isinstance(size, (Mapping, list, tuple)):
            kwargs["shortest_edge"] = None
            kwargs["resize_to"] = _size_pair(size, "size")
        else:
            raise ConfigError(f"size must be an integer or a mapping, got {size!r}")
        kwargs["crop_size"] = _size_pair(d.get("crop_size", 224), "crop_size")
        for key in ("resample", "rescale_factor", "image_mean", "image_std"):
            if d.get(key) is not None:
                kwargs[key] = d[key]
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if d.get(key) is not None:
                kwargs[key] = bool(d[key])
        return cls(**kwargs)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> CLIPPreprocessor:
        """From ``folder/preprocessor_config.json`` (a published ``feature_extractor/`` folder)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelLoadError(f"feature extractor folder not found: {folder}")
        path = folder / "preprocessor_config.json"
        data = read_json(path, "preprocessor_config.json")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ModelLoadError(f"{path}: {exc}") from exc

    def _resize_target(self, height: int, width: int) -> tuple[int, int]:
        if self.resize_to is not None:
            return self.resize_to
        size, longest = self.shortest_edge, self.longest_edge
        if longest is None:
            # torchvision's rule: the short side becomes `size`, the long side is truncated.
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(size * long / short)
            return (new_long, size) if width <= height else (size, new_long)
        raw = None
        lo, hi = float(min(height, width)), float(max(height, width))
        if hi / lo * size > longest:
            raw = longest * lo / hi
            size = int(round(raw))
        if (height <= width and height == size) or (width <= height and width == size):
            return height, width
        if width < height:
            return (int(raw * height / width) if raw is not None else int(size * height / width)), size
        return size, (int(raw * width / height) if raw is not None else int(size * width / height))

    def _center_crop(self, arr: np.ndarray) -> np.ndarray:
        h, w = arr.shape[:2]
        ch, cw = self.crop_size
        top, left = (h - ch) // 2, (w - cw) // 2
        if top >= 0 and left >= 0:
            return arr[top : top + ch, left : left + cw]
        # Smaller than the crop: pad with zeros around the centre (as transformers does).
        nh, nw = max(ch, h), max(cw, w)
        pad_top, pad_left = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
        padded = np.zeros((nh, nw, *arr.shape[2:]), dtype=arr.dtype)
        padded[pad_top : pad_top + h, pad_left : pad_left + w] = arr
        top, left = top + pad_top, left + pad_left
        return padded[max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]

    def _one(self, image) -> np.ndarray:
        # Any other mode is converted whatever do_convert_rgb says: the encoder needs 3 channels.
        if isinstance(image, Image.Image) and image.mode == "RGB":
            img = image
        elif isinstance(image, Image.Image):
            # No EXIF rotation and no size cap here: the image is taken as given, as transformers does.
            img = load_image(image, max_side=None, exif_transpose=False)
        else:
            img = load_image(image)
        if img.width == 0 or img.height == 0:
            raise InputError(f"input image is zero-sized: {img.width}x{img.height}")
        if self.do_resize:
            h, w = self._resize_target(img.height, img.width)
            img = img.resize((w, h), resample=self.resample)
        arr = np.asarray(img)
        if arr.ndim == 2:
            arr = arr[..., None]
        if self.do_center_crop:
            arr = self._center_crop(arr)
        if self.do_rescale:
            out = (arr.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            out = arr if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.float32)
        if self.do_normalize:
            out = (out - np.asarray(self.image_mean, out.dtype)) / np.asarray(self.image_std, out.dtype)
        return np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)

    def __call__(self, images) -> np.ndarray:
        """``images``: one image or a list (anything ``load_image`` takes; a 4-D array is a batch)."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise InputError("no images given")
        arrays = [self._one(im) for im in images]
        if len({a.shape for a in arrays}) != 1:
            raise InputError(f"preprocessed images differ in size: {sorted({a.shape for a in arrays})}")
        return np.stack(arrays)


def _linear_taps(in_size: int, out_size: int):
    """Source indices and weights of PyTorch's bilinear resize, align_corners=False, no antialias."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = src.astype(np.int64)
    lam = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0))
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, np.float32(1.0) - lam, lam


def _resize_bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(H, W, C) float32 resized like ``F.interpolate(mode="bilinear", align_corners=False)``."""
    h, w = x.shape[:2]
    if (h, w) == (out_h, out_w):
        return x
    c0, c1, cw0, cw1 = _linear_taps(w, out_w)
    r0, r1, rw0, rw1 = _linear_taps(h, out_h)
    # PyTorch blends along the width first, then the two rows.
    rows = x[:, c0] * cw0[None, :, None] + x[:, c1] * cw1[None, :, None]
    return rows[r0] * rw0[:, None, None] + rows[r1] * rw1[:, None, None]


def vae_input(image, size: int = 256, *, antialias: bool = False) -> np.ndarray:
    """The image the ImageDream pipeline encodes as its reference latent: float32 (1, 3, size, size) in [-1, 1].

    The reference (``encode_image_latents``) takes the RGB image as floats in [0, 1], maps it to
    [-1, 1] and resizes it to 256 x 256 with bilinear interpolation (align_corners=False, no
    antialiasing), squashing a non-square picture. Here a non-square image is first centre-cropped
    to a square, so a face keeps its proportions (the CLIP branch crops the centre as well);
    a square image gives what the reference computes. ``antialias=True`` resizes with Pillow's
    antialiased bilinear filter instead, which avoids aliasing when shrinking large photos but
    departs from the reference.
    """
    size = _positive_int(size, "size")
    img = image if isinstance(image, Image.Image) and image.mode == "RGB" else load_image(image)
    w, h = img.size
    if w == 0 or h == 0:
        raise InputError(f"input image is zero-sized: {w}x{h}")
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    x = np.float32(2.0) * x - np.float32(1.0)
    if antialias and img.size != (size, size):
        x = np.stack(
            [
                np.asarray(Image.fromarray(x[..., c], "F").resize((size, size), Image.Resampling.BILINEAR))
                for c in range(3)
            ],
            axis=-1,
        )
    else:
        x = _resize_bilinear(x, size, size)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def vae_views(views, size: int) -> np.ndarray:
    """Views as the VAE encodes them: float32 (V, 3, size, size) in [-1, 1].

    ``views``: a list of PIL images or (H, W, 3) arrays (uint8, or float in [0, 1]), or one array
    (V, H, W, 3). Float values are used as they are (no 8-bit rounding); PIL images are loaded like
    inputs. A square view of another size is resized bilinearly (PyTorch's align_corners=False, no
    antialiasing, as ``vae_input``); a non-square one, NaN or Inf, or values outside [0, 1] are an
    ``InputError`` naming the view.
    """
    size = _positive_int(size, "size")
    if isinstance(views, np.ndarray) and views.ndim == 4:
        items = list(views)
    elif isinstance(views, (list, tuple)):
        items = list(views)
    else:
        raise InputError(f"views must be a list of images or one (V, H, W, 3) array; got {type(views).__name__}"
                         + (f" of shape {views.shape}" if isinstance(views, np.ndarray) else ""))
    if not items:
        raise InputError("views is empty: pass at least one view")
    out = []
    for i, view in enumerate(items):
        if isinstance(view, Image.Image):
            arr = np.asarray(load_image(view), dtype=np.float32) / np.float32(255.0)
        else:
            arr = np.asarray(view)
            if arr.ndim != 3 or arr.shape[-1] != 3:
                raise InputError(f"view {i} must be (H, W, 3) RGB; got shape {arr.shape}")
            if arr.dtype == np.uint8:
                arr = arr.astype(np.float32) / np.float32(255.0)
            elif np.issubdtype(arr.dtype, np.floating):
                arr = arr.astype(np.float32)
                if not np.isfinite(arr).all():
                    raise InputError(f"view {i} contains NaN or Inf")
                lo, hi = float(arr.min()), float(arr.max())
                if lo < 0.0 or hi > 1.0:
                    raise InputError(f"view {i} has values in [{lo:.4g}, {hi:.4g}]; float views must lie in [0, 1]")
            else:
                raise InputError(f"view {i} must be uint8 or float in [0, 1]; got dtype {arr.dtype}")
        h, w = arr.shape[:2]
        if h != w or h == 0:
            raise InputError(f"view {i} is {w}x{h}: views must be square (the model's native size is {size})")
        x = np.float32(2.0) * arr - np.float32(1.0)
        out.append(_resize_bilinear(x, size, size).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(out), dtype=np.float32)

