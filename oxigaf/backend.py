"""The interface between the core and a compute backend.

The core never imports mlx or torch: it hands numpy arrays to a backend, gets backend arrays
back from its models, combines them with Python operators (``+``, ``*``, slicing), and turns
them back into numpy at the end. Tensors are NCHW at this interface.

Optional, used where a backend has them: ``reset_peak_memory()`` (before each generation),
``clear_cache()`` (hand back memory kept for reuse; ``low_memory`` calls it on release) and
``compile_function(fn)`` (``DiffusionConfig.compile``'s fused guided DDIM step).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

Array = Any  # a backend's array type (mx.array, torch.Tensor)


@runtime_checkable
class Backend(Protocol):
    name: str
    device: str
    dtype: str

    # arrays
    def asarray(self, x: np.ndarray, dtype: str | None = None) -> Array: ...
    def to_numpy(self, x: Array) -> np.ndarray: ...
    def concat(self, xs: list[Array], axis: int = 0) -> Array: ...
    def synchronize(self, x: Array | None = None) -> None: ...
    def memory(self) -> dict[str, int | None]: ...
    def isfinite(self, x: Array) -> bool: ...

    # models: each takes a component folder (the one holding config.json)
    def load_unet(self, folder: str | os.PathLike, *, attention: str = "auto", **kw) -> Callable: ...
    def load_vae(self, folder: str | os.PathLike, **kw) -> Any: ...
    def load_image_encoder(self, folder: str | os.PathLike, **kw) -> Callable: ...
    def load_text_encoder(self, folder: str | os.PathLike, **kw) -> Callable: ...
    def load_upsampler_unet(self, folder: str | os.PathLike, **kw) -> Callable: ...


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
