"""Float outputs to 8-bit pictures (``to_uint8``) and a contact sheet (``make_grid``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..errors import ConfigError, InputError, NumericsError
from .load import DEFAULT_BACKGROUND, _check_background, _positive_int, load_image


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
