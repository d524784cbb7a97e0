"""The checks of what a caller hands ``generate``, ``refine`` and ``score_distillation`` besides
the settings (those are ``DiffusionConfig``'s): arrays, noise, strength, timesteps, sizes.
Every problem is an ``InputError`` or ``ConfigError`` naming the argument."""

from __future__ import annotations

import math
import os
import sys

import numpy as np

from .errors import ConfigError, InputError


def check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating, np.integer)) \
            or not math.isfinite(strength) or not 0.0 < strength <= 1.0:
        raise ConfigError(f"strength must be a number in (0, 1]; got {strength!r}")
    return float(strength)


def check_timestep(timestep, last: int) -> int:
    """An integer training timestep in [0, last)."""
    ok = isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool)
    if not ok and isinstance(timestep, (float, np.floating)) and float(timestep).is_integer():
        ok, timestep = True, int(timestep)
    if not ok or not 0 <= int(timestep) < last:
        raise InputError(f"timestep must be an integer in [0, {last}); got {timestep!r}")
    return int(timestep)


def check_steps(steps: int, last: int) -> int:
    if steps > last:
        raise ConfigError(f"num_inference_steps must be <= {last}; got {steps}")
    return steps


def numeric(backend, x, name: str) -> np.ndarray:
    """A finite float32 numpy array from numpy or a backend array, else an InputError naming ``name``."""
    if not isinstance(x, (np.ndarray, list, tuple)):
        try:
            x = backend.to_numpy(x)
        except Exception:  # not this backend's array: numpy may still read it
            pass
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be an array of numbers; got {type(x).__name__}: {exc}") from exc
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contain NaN or Inf")
    return arr


def noise_like(backend, noise, shape: tuple, seed: int) -> np.ndarray:
    """``noise`` checked against ``shape``, or drawn from ``default_rng(seed)``."""
    if noise is None:
        return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    arr = numeric(backend, noise, "noise")
    if arr.shape != tuple(shape):
        raise InputError(f"noise must have shape {tuple(shape)}; got {arr.shape}")
    return arr


def initial_noise(latents, items: int, views: int, frames: int, hw: int, seed: int) -> list[np.ndarray]:
    """(frames, 4, hw, hw) float32 per item: from ``latents`` or numpy's generator.

    Item i draws from ``default_rng(seed + i)``, so a batch equals its items run alone with
    those seeds, on every backend. The reference slot's noise (ImageDream) never reaches the
    views: its model input is the clean reference latent at every step.
    """
    if latents is None:
        return [np.random.default_rng(seed + i).standard_normal((frames, 4, hw, hw), dtype=np.float32)
                for i in range(items)]
    try:
        arr = np.asarray(latents, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(f"latents must be an array of numbers; got {type(latents).__name__}: {exc}") from exc
    if arr.ndim == 4:
        arr = arr[None]
    if arr.ndim != 5 or arr.shape[0] != items or arr.shape[1] not in {views, frames} or arr.shape[2:] != (4, hw, hw):
        raise InputError(
            f"latents must have shape ({views} or {frames}, 4, {hw}, {hw}) per image"
            f" (with {items} image(s)); got {tuple(np.shape(latents))}"
        )
    if not np.isfinite(arr).all():
        raise InputError("latents contain NaN or Inf")
    if arr.shape[1] < frames:  # no reference slot given: it only ever holds noise
        arr = np.concatenate([arr, np.zeros((items, frames - arr.shape[1], 4, hw, hw), np.float32)], axis=1)
    return list(arr)


def check_normals(normals, views: int, frames: int, maps: int, in_channels: int):
    """``normals`` as given, checked against the UNet: None for a UNet without conditioning maps
    (``maps`` 0); a normal-conditioned one needs one map per frame, for an image-conditioned model
    one per view and the input photo's last (it fills the reference slot)."""
    need = f"{frames} normal maps ({views} views + the input photo's, last)" if frames > views \
        else f"{frames} normal maps (one per view)"
    if maps == 0:
        if normals is not None:
            raise InputError(f"normals were given, but this UNet takes no conditioning maps "
                             f"(in_channels {in_channels}): pass normals=None")
        return None
    if normals is None:
        raise InputError(f"this UNet is normal-conditioned (in_channels {in_channels}): pass normals= with {need}")
    count = len(normals) if isinstance(normals, (list, tuple, np.ndarray)) else None
    if count != frames:
        raise InputError(f"normals must hold {need}; got {count if count is not None else type(normals).__name__}")
    return normals


def output_size(size: int | None, native: int, upsampler) -> int:
    """The views' size: ``native``, or twice it with an upsampler (its default when there is one)."""
    if size is None:
        return native * 2 if upsampler is not None else native
    if size == native:
        return native
    if size == 2 * native:
        if upsampler is None:
            raise ConfigError(
                f"output_size {size} needs an upsampler: pass upsampler='stabilityai/sd-x2-latent-upscaler'"
                " (or 'bilinear')"
            )
        return size
    raise ConfigError(f"output_size must be {native} or {2 * native} for this model; got {size!r}")


def check_upsampler_kind(upsampler) -> None:
    if upsampler is None or isinstance(upsampler, (str, os.PathLike)) or callable(upsampler):
        return
    raise ConfigError(f"upsampler must be None, 'bilinear', a folder or a hub id; got {upsampler!r}")


def peak_memory(backend) -> dict[str, int | None]:
    """The backend's memory counters and the process's peak RSS in bytes."""
    mem = dict(backend.memory())
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mem["peak_rss_bytes"] = rss if sys.platform == "darwin" else rss * 1024
    except (ImportError, OSError):  # pragma: no cover - Windows
        mem["peak_rss_bytes"] = None
    return mem
