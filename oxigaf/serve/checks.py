"""What ``oxigaf serve`` checks before a request reaches the pipeline: the uploaded photo and the numbers.

Nothing here imports Gradio. Every problem is an ``InputError`` or ``ConfigError`` whose message
names it; the page shows that message as it is.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..config import GUIDANCE_RANGE
from ..errors import ConfigError, InputError
from ..images import load_image

# A photo decodes to width x height x 3 bytes and load_image makes float copies later: 40
# megapixels is a large camera's full frame, and a file claiming more is refused from its header.
MAX_PIXELS = 40_000_000
MAX_VIEWS = 16
DEFAULT_AZIMUTHS = "0, 90, 180, 270"

# (low, high, integer) per number a request carries; the page's sliders use the same bounds.
RANGES: dict[str, tuple[float, float, bool]] = {
    "elevation": (-89.0, 89.0, False),
    "steps": (1, 200, True),
    "guidance": (GUIDANCE_RANGE[0], GUIDANCE_RANGE[1], False),
    "ip_weight": (0.0, 3.0, False),
    "seed": (0, 2**32 - 1, True),
}
AZIMUTH_RANGE = (-360.0, 360.0)


@dataclass(frozen=True)
class Request:
    """A request's checked settings, in the types ``Pipeline.generate`` takes."""

    azimuths: list[float]
    elevation: float
    steps: int
    guidance: float
    ip_weight: float
    seed: int


def number(value, name: str) -> float | int:
    """``value`` as the float (or int) ``RANGES[name]`` allows, else a ``ConfigError`` naming ``name``."""
    low, high, integer = RANGES[name]
    what = "an integer" if integer else "a number"
    span = f"[{_text(low)}, {_text(high)}]"
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigError(f"{name} must be {what} in {span}; got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be {what} in {span}; got {value!r}")
    if integer and float(value) != int(value):
        raise ConfigError(f"{name} must be a whole number; got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be in {span}; got {_text(value)}")
    return int(value) if integer else float(value)


def _text(v) -> str:
    """A number as people write it: whole numbers without a decimal point or an exponent."""
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e16 else f"{v:g}"


def azimuths(text, max_views: int = MAX_VIEWS) -> list[float]:
    """Azimuths in degrees from text such as ``"0, 90, 180, 270"`` (commas or spaces between them)."""
    if not isinstance(text, str):
        raise ConfigError(f"azimuths must be text such as {DEFAULT_AZIMUTHS!r}; got {type(text).__name__}")
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        raise ConfigError(f"azimuths is empty: give one angle in degrees per view, e.g. {DEFAULT_AZIMUTHS!r}")
    if len(parts) > max_views:
        raise ConfigError(f"azimuths names {len(parts)} views; the most this server makes is {max_views}")
    low, high = AZIMUTH_RANGE
    out = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise ConfigError(f"azimuths must be numbers in degrees; {p!r} is not one") from None
        if not math.isfinite(v) or not low <= v <= high:
            raise ConfigError(f"each azimuth must be in [{low:g}, {high:g}] degrees; got {p}")
        out.append(v)
    return out


def even_azimuths(views, max_views: int = MAX_VIEWS) -> str:
    """The text of ``views`` azimuths evenly spaced from 0 (the input's own view)."""
    count = int(views) if isinstance(views, (int, float)) and not isinstance(views, bool) else 0
    if not 1 <= count <= max_views:
        raise ConfigError(f"views must be an integer in [1, {max_views}]; got {views!r}")
    return ", ".join(f"{i * 360.0 / count:g}" for i in range(count))


def request(azimuth_text, elevation, steps, guidance, ip_weight, seed, max_views: int = MAX_VIEWS) -> Request:
    """Every setting of a request checked, in the order the page shows them."""
    return Request(azimuths(azimuth_text, max_views), number(elevation, "elevation"), number(steps, "steps"),
                   number(guidance, "guidance"), number(ip_weight, "ip_weight"), number(seed, "seed"))


def open_photo(path, max_bytes: int, max_pixels: int = MAX_PIXELS, name: str | None = None):
    """The uploaded file at ``path`` as an RGB PIL image, and notes for the page.

    Checked in this order, each before any pixel is decoded: the file is not empty, not over
    ``max_bytes``, an image Pillow recognises, at most ``max_pixels`` by its header. An animated
    image gives its first frame and a note saying so.
    """
    label = name or Path(os.fspath(path)).name
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise InputError(f"cannot read the uploaded file {label}: {exc.strerror or exc}") from exc
    if size == 0:
        raise InputError(f"the uploaded file {label} is empty")
    if size > max_bytes:
        raise InputError(f"the uploaded file {label} is {size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:g} MB")
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{label} has too many pixels (a decompression bomb?); the limit is "
                         f"{max_pixels / 1e6:g} megapixels: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{label} is not an image (or a format Pillow cannot read)") from exc
    except Exception as exc:  # OSError, or a plugin's ValueError / struct.error on a corrupt header
        raise InputError(f"cannot read {label} as an image: {type(exc).__name__}: {exc}") from exc
    with img:
        w, h = img.size
        if w * h > max_pixels:
            raise InputError(f"{label} is {w}x{h} = {w * h / 1e6:.1f} megapixels; the limit is {max_pixels / 1e6:g} "
                             "megapixels (a larger image could exhaust the server's memory when decoded)")
        notes = []
        frames = getattr(img, "n_frames", 1)
        if frames > 1:
            img.seek(0)
            notes.append(f"{label} is animated ({frames} frames): its first frame is used")
        try:
            rgb = load_image(img)
        except InputError as exc:
            raise InputError(f"{label}: {exc}") from exc
        if rgb is img:
            rgb = img.copy()  # closing the file below frees the pixels of the image it opened
    return rgb, notes


__all__ = ["AZIMUTH_RANGE", "DEFAULT_AZIMUTHS", "MAX_PIXELS", "MAX_VIEWS", "RANGES", "Request", "azimuths",
           "even_azimuths", "number", "open_photo", "request"]
