"""The interface between the core and a compute backend.

The core never imports mlx or torch: it hands numpy arrays to a backend, gets backend arrays
back from its models, combines them with Python operators (``+``, ``*``, slicing), and turns
them back into numpy at the end. Tensors are NCHW at this interface.

``Backend`` is the whole contract: a backend subclasses it and implements the required methods;
the optional ones have defaults here, so the core calls every method unconditionally and never
asks a backend what it has.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import BackendError

Array = Any  # a backend's array type (mx.array, torch.Tensor)


class Backend:
    """What the core calls on a backend. Subclasses set ``name``, ``device`` and ``dtype``."""

    name: str = "?"
    device: Any = None
    dtype: str = "float32"

    # ---------------------------------------------------------------- arrays (required)
    def asarray(self, x: np.ndarray, dtype: str | None = None) -> Array:
        raise NotImplementedError

    def to_numpy(self, x: Array) -> np.ndarray:
        raise NotImplementedError

    def concat(self, xs: list[Array], axis: int = 0) -> Array:
        raise NotImplementedError

    def synchronize(self, x: Array | None = None) -> None:
        """Wait until ``x`` (or all queued work) is computed: timings and memory readings need it."""
        raise NotImplementedError

    def memory(self) -> dict[str, int | None]:
        """``{"current": bytes, "peak": bytes}``, None where the backend cannot tell."""
        raise NotImplementedError

    def isfinite(self, x: Array) -> bool:
        raise NotImplementedError

    # ---------------------------------------------------------------- models (required)
    # Each takes a component folder (the one holding config.json) and loads it strictly.
    def load_unet(self, folder: str | os.PathLike, *, attention: str = "auto", **kw) -> Callable:
        raise NotImplementedError

    def load_vae(self, folder: str | os.PathLike, **kw) -> Any:
        raise NotImplementedError

    def load_image_encoder(self, folder: str | os.PathLike, **kw) -> Callable:
        raise NotImplementedError

    def load_text_encoder(self, folder: str | os.PathLike, **kw) -> Callable:
        raise NotImplementedError

    def load_upsampler_unet(self, folder: str | os.PathLike, **kw) -> Callable:
        raise NotImplementedError

    # ---------------------------------------------------------------- optional, with defaults
    def versions(self) -> dict[str, str]:
        """What ``oxigaf info`` and ``oxigaf.json`` report: the framework's version, the device."""
        return {}

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory reading (before each generation)."""

    def clear_cache(self) -> None:
        """Hand back memory kept for reuse (``low_memory`` calls it when it releases a model)."""

    def compile_function(self, fn: Callable) -> Callable:
        """``fn`` compiled into one graph (``DiffusionConfig.compile``'s guided DDIM step);
        by default ``fn`` itself, which gives the same numbers."""
        return fn

    def unet_trainer(self, config, state: dict[str, np.ndarray], **kw):
        """Loss, gradients and the optimiser step of the UNet (``oxigaf.training``)."""
        raise BackendError(f"the {self.name} backend cannot train a UNet")

    def apply_lora(self, model, deltas: dict[str, np.ndarray]):
        """``model`` with LoRA weight deltas added to the named parameters."""
        raise BackendError(f"the {self.name} backend cannot apply LoRA weights")

    def render_gaussians(self, gaussians: dict[str, Any], viewmats: np.ndarray, intrinsics: tuple, size: int) -> Array:
        """(V, size, size, 3) renders of 3D Gaussians (``oxigaf.splat``): ``gaussians`` maps means, scales,
        quats, opacities, colors to numpy or this backend's arrays (differentiable in the latter);
        ``viewmats`` world-to-camera (V, 4, 4, OpenCV axes); ``intrinsics`` (fx, fy, cx, cy)."""
        raise BackendError(f"the {self.name} backend cannot render 3D Gaussians")

    def gaussian_trainer(self, raw: dict[str, np.ndarray], targets: np.ndarray, viewmats: np.ndarray,
                         intrinsics: tuple, size: int, lrs: dict[str, float]):
        """Adam on 3DGS's loss for raw Gaussian parameters against posed frames (``oxigaf.splat.fit``)."""
        raise BackendError(f"the {self.name} backend cannot fit 3D Gaussians")


@dataclass(frozen=True)
class BackendSpec:
    """What a plugin registers: how to find out whether it can run here and how to make it.

    ``priority`` orders ``backend="auto"`` (higher first); ``available()`` returns None when the
    backend can run, else the reason it cannot. ``factory(device, dtype)`` builds the backend.
    """

    name: str
    factory: Callable[..., Backend]
    available: Callable[[], str | None]
    priority: Callable[[], int] = lambda: 0
    extra: str | None = None
    description: str = ""
