"""Input images, CLIP preprocessing, the VAE's input, and turning outputs into pictures.

- ``load_image`` accepts a path, a PIL image or a numpy array in any common mode and returns an
  RGB PIL image. Transparency is composited onto a background colour, white by default:
  ImageDream and MVDream were trained on renders of objects on white backgrounds, so a cut-out
  portrait on white is what the model expects (black would read as part of the subject).
- ``CLIPPreprocessor`` computes what transformers' ``CLIPImageProcessor`` (its PIL path)
  computes from a ``preprocessor_config.json``.
- ``vae_input`` computes the image the ImageDream pipeline encodes with the VAE as its
  reference latent.
- ``to_uint8`` and ``make_grid`` turn float outputs into 8-bit pictures and a contact sheet.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .checkpoints import read_json
from .errors import ConfigError, InputError, ModelLoadError, NumericsError

__all__ = [
    "CLIPPreprocessor",
    "DEFAULT_BACKGROUND",
    "MAX_SIDE",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "load_image",
    "make_grid",
    "to_uint8",
    "vae_input",
]

DEFAULT_BACKGROUND = (255, 255, 255)
# Longest side kept by ``load_image``. The models see 224 px (CLIP) and 256 px (VAE); 4096 keeps
# every practical photo at full quality while bounding memory for the float copies made later.
MAX_SIDE = 4096
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_EXIF_ORIENTATION = 0x0112
_ORIENT_OPS = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}
# Float arrays may overshoot [0, 1] by rounding; further out means the data is on another scale.
_FLOAT_SLACK = 1e-3


def _check_background(background) -> tuple[int, int, int]:
    if (
        not isinstance(background, (tuple, list))
        or len(background) != 3
        or not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c <= 255 for c in background)
    ):
        raise ConfigError(f"background must be three integers in 0..255 (R, G, B), got {background!r}")
    return tuple(int(c) for c in background)


def _open_path(src: str | os.PathLike) -> Image.Image:
    path = Path(os.path.expanduser(os.fspath(src)))
    if not path.exists():
        raise InputError(f"input image not found: {path}")
    if path.is_dir():
        raise InputError(f"input image path is a folder, not an image file: {path}")
    try:
        return Image.open(path)
    except Image.DecompressionBombError as exc:
        raise InputError(f"input image {path} has too many pixels (Pillow's decompression-bomb guard): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"not an image (or a format Pillow cannot read): {path}") from exc
    except Exception as exc:  # OSError, or a plugin's ValueError / struct.error on a corrupt header
        raise InputError(f"cannot read input image {path}: {type(exc).__name__}: {exc}") from exc


def _array_to_image(arr: np.ndarray, background: tuple[int, int, int]) -> Image.Image:
    """An (H, W[, C]) array as an 8-bit PIL image in mode L, LA, RGB or RGBA."""
    if arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4) and arr.shape[0] in (1, 3, 4):
        raise InputError(f"image array has shape {arr.shape}: channels must come last, (H, W, C)")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 2, 3, 4))):
        raise InputError(f"image array must have shape (H, W) or (H, W, 1|2|3|4), got {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"image array is zero-sized: shape {arr.shape}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    channels = 1 if arr.ndim == 2 else arr.shape[-1]
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[channels]
    if arr.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(arr), mode)
    if arr.dtype == np.bool_:
        return Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8) * 255), mode)
    if arr.dtype == np.uint16:
        values = arr.astype(np.float32) / 65535.0
    elif np.issubdtype(arr.dtype, np.floating):
        values = arr.astype(np.float32)
        if np.isnan(values).any():
            raise InputError("float image array contains NaN")
        if not np.isfinite(values).all():
            raise InputError("float image array contains infinite values")
        lo, hi = float(values.min()), float(values.max())
        if lo < -_FLOAT_SLACK or hi > 1.0 + _FLOAT_SLACK:
            raise InputError(
                f"float image values must lie in [0, 1], got [{lo:g}, {hi:g}] (pass 0..255 data as uint8)"
            )
        values = np.clip(values, 0.0, 1.0)
    else:
        raise InputError(f"unsupported image array dtype {arr.dtype}: use uint8, uint16 or float in [0, 1]")
    if channels in (2, 4):
        # Composite in float so that 16-bit and float inputs are rounded to 8 bits only once.
        color, alpha = values[..., :-1], values[..., -1:]
        if channels == 2:
            color = np.repeat(color, 3, axis=-1)
        bg = np.asarray(background, np.float32) / np.float32(255.0)
        values, mode = color * alpha + bg * (1.0 - alpha), "RGB"
    return Image.fromarray(np.round(values * 255.0).astype(np.uint8), mode)


def _normalise_mode(img: Image.Image) -> Image.Image:
    """Convert to L, LA, RGB, RGBA, I or F, the modes the later steps handle."""
    mode = img.mode
    if mode in ("L", "LA", "RGB", "RGBA", "I", "F"):
        return img
    try:
        if mode == "1":
            return img.convert("L")
        if mode in ("P", "PA"):
            has_alpha = mode == "PA" or img.info.get("transparency") is not None
            return img.convert("RGBA" if has_alpha else "RGB")
        if mode.startswith("I;16"):
            return img.convert("I")
        if mode == "La":
            return img.convert("LA")
        if mode == "RGBa":
            return img.convert("RGBA")
        return img.convert("RGBA" if "A" in img.getbands() else "RGB")
    except (ValueError, OSError) as exc:
        raise InputError(f"cannot convert an image in mode {mode!r} to RGB: {exc}") from exc


def _high_depth_to_l(img: Image.Image, source_mode: str) -> Image.Image:
    """An I (32-bit int) or F (float) image as 8-bit L.

    16-bit files map 0..65535 to 0..255. Other I images are read as 8-bit when their values fit
    in 0..255, as 16-bit when they fit in 0..65535, else scaled by their maximum. F images are
    read as [0, 1] when their maximum is at most 1, as 0..255 when at most 255, else scaled by
    their maximum. Negative values become 0.
    """
    values = np.asarray(img, dtype=np.float32)
    if img.mode == "F" and not np.isfinite(values).all():
        raise InputError("float image contains NaN or infinite values")
    top = float(values.max())
    if source_mode.startswith("I;16"):
        scale = 65535.0
    elif img.mode == "F" and top <= 1.0:
        scale = 1.0
    elif top <= 255.0:
        scale = 255.0
    elif img.mode == "I" and top <= 65535.0:
        scale = 65535.0
    else:
        scale = top
    return Image.fromarray(np.round(np.clip(values / scale, 0.0, 1.0) * 255.0).astype(np.uint8), "L")


def _cap_size(img: Image.Image, max_side: int | None) -> Image.Image:
    if max_side is None or max(img.size) <= max_side:
        return img
    w, h = img.size
    scale = max_side / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    # reducing_gap: Pillow first box-reduces by an integer factor, then filters the rest.
    return img.resize(new, Image.Resampling.LANCZOS, reducing_gap=2.0)


def _to_rgb(img: Image.Image, background: tuple[int, int, int], max_side: int | None) -> Image.Image:
    source_mode = img.mode
    img = _normalise_mode(img)
    img = _cap_size(img, max_side)
    if img.mode in ("I", "F"):
        img = _high_depth_to_l(img, source_mode)
    if img.mode in ("LA", "RGBA"):
        base = Image.new("RGBA", img.size, (*background, 255))
        return Image.alpha_composite(base, img.convert("RGBA")).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(
    src,
    *,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    max_side: int | None = MAX_SIDE,
    exif_transpose: bool = True,
) -> Image.Image:
    """Read an input image and return it as an RGB PIL image.

    ``src`` is a path (``str`` / ``PathLike``), a PIL image (any mode: RGB, RGBA, LA, L, P,
    CMYK, 1, I;16, I, F, ...) or a numpy array (H, W), (H, W, 1|2|3|4) of uint8, uint16, bool or
    float in [0, 1]. Alpha (and a palette's transparent colour) is composited onto
    ``background`` (white by default, the background ImageDream / MVDream were trained on).
    Images whose longest side exceeds ``max_side`` are downscaled (JPEG files are decoded at a
    reduced scale already, via ``Image.draft``), so a huge photo never costs more than its
    decode; ``max_side=None`` keeps the size. Pillow's decompression-bomb guard still applies.
    With ``exif_transpose`` a camera's EXIF orientation is applied, so a phone portrait stands
    upright. Every problem with the input is an ``InputError`` naming it.
    """
    background = _check_background(background)
    if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1):
        raise ConfigError(f"max_side must be a positive integer or None, got {max_side!r}")
    opened_here = False
    if isinstance(src, Image.Image):
        img = src
    elif isinstance(src, np.ndarray):
        img = _array_to_image(src, background)
    elif isinstance(src, (str, os.PathLike)):
        img = _open_path(src)
        opened_here = True
    else:
        raise InputError(f"cannot use a {type(src).__name__} as an image: pass a path, a PIL image or a numpy array")

    where = f" {src}" if opened_here else ""
    try:
        if img.width == 0 or img.height == 0:
            raise InputError(f"input image{where} is zero-sized: {img.width}x{img.height}")
        orientation = 1
        if exif_transpose:
            try:
                orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1))
            except Exception:  # a corrupt EXIF block must not make a readable image unusable
                orientation = 1
        if opened_here and img.format == "JPEG" and max_side is not None and max(img.size) > max_side:
            scale = max_side / max(img.size)
            # The JPEG decoder can scale by 1/2, 1/4, 1/8 while decoding; it keeps at least this size.
            img.draft(img.mode, (math.ceil(img.width * scale), math.ceil(img.height * scale)))
        img.load()
        rgb = _to_rgb(img, background, max_side)
        if opened_here and rgb is img:
            rgb = img.copy()  # closing the file below would also free the returned pixels
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        raise InputError(f"input image{where} has too many pixels (Pillow's decompression-bomb guard): {exc}") from exc
    except Exception as exc:  # Pillow reports corrupt data as OSError, ValueError, struct.error, EOFError...
        raise InputError(f"cannot decode input image{where}: {type(exc).__name__}: {exc}") from exc
    finally:
        if opened_here:
            img.close()
    if orientation in _ORIENT_OPS:
        for op in _ORIENT_OPS[orientation]:
            rgb = rgb.transpose(op)
        # The pixels are upright now: drop the metadata that says otherwise, or an image passed
        # back in (the pipeline loads what it is given) would be turned a second time.
        for key in ("exif", "xmp", "XML:com.adobe.xmp", "Raw profile type exif"):
            rgb.info.pop(key, None)
    return rgb


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


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


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


def to_uint8(images) -> np.ndarray:
    """Float images in [0, 1] (any shape, e.g. (N, H, W, 3)) to uint8: clip, x 255, round half to even."""
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        return arr
    if not np.issubdtype(arr.dtype, np.floating):
        raise InputError(f"to_uint8 expects float images in [0, 1], got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise NumericsError("images contain NaN or infinite values")
    return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)


def make_grid(
    images,
    cols: int | None = None,
    *,
    padding: int = 0,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
) -> Image.Image:
    """A contact sheet: images (PIL, arrays, or an (N, H, W, C) array) in rows of ``cols``
    (default ceil(sqrt(N)), so 4 views make 2 x 2), each centred in a cell of the largest size,
    ``padding`` pixels between cells."""
    background = _check_background(background)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif isinstance(images, (Image.Image, np.ndarray)) or not isinstance(images, Sequence):
        raise InputError("make_grid expects a list of images")
    if not images:
        raise InputError("make_grid needs at least one image")
    pictures = [load_image(im, max_side=None, exif_transpose=False, background=background) for im in images]
    n = len(pictures)
    cols = math.ceil(math.sqrt(n)) if cols is None else _positive_int(cols, "cols")
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ConfigError(f"padding must be a non-negative integer, got {padding!r}")
    cell_w = max(p.width for p in pictures)
    cell_h = max(p.height for p in pictures)
    sheet = Image.new("RGB", (cols * cell_w + (cols - 1) * padding, rows * cell_h + (rows - 1) * padding), background)
    for i, pic in enumerate(pictures):
        r, c = divmod(i, cols)
        x = c * (cell_w + padding) + (cell_w - pic.width) // 2
        y = r * (cell_h + padding) + (cell_h - pic.height) // 2
        sheet.paste(pic, (x, y))
    return sheet
