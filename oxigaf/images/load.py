"""``load_image``: a path, a PIL image or a numpy array in any common mode in, an RGB PIL image out."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError, InputError

DEFAULT_BACKGROUND = (255, 255, 255)
# Longest side kept by ``load_image``. The models see 224 px (CLIP) and 256 px (VAE); 4096 keeps
# every practical photo at full quality while bounding memory for the float copies made later.
MAX_SIDE = 4096

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


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value

