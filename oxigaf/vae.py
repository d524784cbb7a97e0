"""The framework-neutral parts of the SD VAE that both backends share: the legacy weight names
and the tiled decode's plan (tile offsets and cross-fade weights, as numpy).

A tiled decode runs the decoder's trunk (conv_in and the mid block, whose attention is global)
on the whole latent and its tail (the up blocks, where the memory is) per tile of ``tile``
latent pixels overlapping by ``overlap``; each tile's image is weighted by ``Tile.weight`` and
the weighted sum is divided by the summed weights.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from .checkpoints import load_state, rename
from .errors import ConfigError, ModelLoadError

# diffusers < 0.14 names of the mid-block attention's layers -> today's names.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_PREFIXES = ("encoder.mid_block.attentions.", "decoder.mid_block.attentions.")

LOGVAR_RANGE = (-30.0, 20.0)


def read_vae_state(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """The VAE's tensors with legacy (diffusers < 0.14) mid-block attention names mapped to today's."""
    out: dict[str, np.ndarray] = {}
    for key, value in load_state(folder).items():
        new = next(iter(rename({key: None}, LEGACY_ATTENTION_NAMES))) if key.startswith(_ATTENTION_PREFIXES) else key
        if new in out:
            raise ModelLoadError(f"weights in {folder}: {new!r} appears under both its old and its new name")
        out[new] = value
    return out


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``length``; the last one is flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def blend_ramp(size: int, ramp: int, head: bool, tail: bool) -> np.ndarray:
    """1-D tile weight: 1 inside, a linear ramp from ~0 over ``ramp`` samples at each edge that
    another tile overlaps, so overlapping tiles cross-fade and tile borders carry little weight."""
    w = np.ones(size, np.float32)
    r = min(ramp, size)
    if r > 0:
        up = (np.arange(r, dtype=np.float32) + 0.5) / r
        if head:
            w[:r] = np.minimum(w[:r], up)
        if tail:
            w[size - r:] = np.minimum(w[size - r:], up[::-1])
    return w


def tile_plan(tile_size: int, tile_overlap: int | None, factor: int) -> tuple[int, int]:
    """Pixel tile size and overlap, checked: multiples of the VAE's scale factor, overlap < tile.
    ``tile_overlap`` None: a quarter tile."""
    if not isinstance(tile_size, int) or isinstance(tile_size, bool) or tile_size < 0 or tile_size % factor:
        raise ConfigError(f"VAE tile_size must be 0 or a positive multiple of {factor} pixels; got {tile_size!r}")
    if tile_overlap is None:
        tile_overlap = (tile_size // 4) // factor * factor
    if (not isinstance(tile_overlap, int) or isinstance(tile_overlap, bool) or tile_overlap < 0
            or tile_overlap % factor or (tile_size and tile_overlap >= tile_size)):
        raise ConfigError(
            f"VAE tile_overlap must be a multiple of {factor} pixels in [0, tile_size); got {tile_overlap!r}"
        )
    return tile_size, tile_overlap


def call_tiling(loaded: tuple[int, int], tile_size: int | None, tile_overlap: int | None,
                factor: int) -> tuple[int, int]:
    """A decode call's pixel tiling: the load-time ``(tile_size, tile_overlap)``, or this call's
    ``tile_size`` (and ``tile_overlap``, None: a quarter tile) when given; checked."""
    if tile_size is None:
        tile, overlap = loaded[0], loaded[1] if tile_overlap is None else tile_overlap
    else:
        tile, overlap = tile_size, tile_overlap
    return tile_plan(tile, overlap, factor)


def is_tiled(tile: int, height: int, width: int, factor: int) -> bool:
    """Whether a latent of ``height`` x ``width`` decodes in tiles of ``tile`` pixels (0: never)."""
    return bool(tile) and (height * factor > tile or width * factor > tile)


class Tile(NamedTuple):
    """One tile: latent rows ``y:y + h``, columns ``x:x + w``; ``weight`` its (h·f, w·f) float32
    cross-fade in pixels."""

    y: int
    x: int
    h: int
    w: int
    weight: np.ndarray


def tiles(height: int, width: int, tile: int, overlap: int, factor: int) -> list[Tile]:
    """The tiles of a (height, width) latent, ``tile`` latent pixels overlapping by ``overlap``."""
    stride = tile - overlap
    th, tw = min(tile, height), min(tile, width)
    out = []
    for y in tile_starts(height, tile, stride):
        wy = blend_ramp(th * factor, overlap * factor, head=y > 0, tail=y + th < height)
        for x in tile_starts(width, tile, stride):
            wx = blend_ramp(tw * factor, overlap * factor, head=x > 0, tail=x + tw < width)
            out.append(Tile(y, x, th, tw, np.outer(wy, wx)))
    return out
