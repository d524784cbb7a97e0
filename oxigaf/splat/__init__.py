"""3D Gaussians in oxigaf's world: the container, rendering through a backend, ``.ply`` files.

World and cameras are ``oxigaf.cameras``'s: a camera's world-to-camera matrix is the inverse of
its ``opencv_c2w()`` (x right, y down, z forward) and its intrinsics ``intrinsics(size, fov_deg)``,
exactly what ``cameras_json(cameras, size, fov_deg)`` exports. The rasterisers live in the
backends (``oxigaf_torch.splat``, ``oxigaf_mlx.splat``); the core hands them numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..cameras import DEFAULT_FOV_DEG, as_cameras, intrinsics
from ..errors import InputError

FIELDS = ("means", "scales", "quats", "opacities", "colors")
_SHAPES = {"means": (3,), "scales": (3,), "quats": (4,), "opacities": (), "colors": (3,)}


@dataclass(frozen=True)
class Gaussians:
    """N 3D Gaussians, float32: means (N, 3) world positions, scales (N, 3) standard deviations,
    quats (N, 4) unit quaternions (w, x, y, z), opacities (N,) in (0, 1), colors (N, 3) RGB in [0, 1]."""

    means: np.ndarray
    scales: np.ndarray
    quats: np.ndarray
    opacities: np.ndarray
    colors: np.ndarray

    def __post_init__(self):
        count = None
        for name in FIELDS:
            value = np.asarray(getattr(self, name))
            if value.dtype.kind not in "fiu":
                raise InputError(f"Gaussians.{name} must be numeric; got dtype {value.dtype}")
            value = value.astype(np.float32)
            n = value.shape[0] if value.ndim else None
            if value.ndim == 0 or value.shape[1:] != _SHAPES[name]:
                raise InputError(f"Gaussians.{name} must have shape (N, {', '.join(map(str, _SHAPES[name]))})"
                                 .replace(", )", ")") + f"; got {value.shape}")
            if count is None:
                count = n
            elif n != count:
                raise InputError(f"Gaussians.{name} has {n} rows, the means have {count}")
            if not np.isfinite(value).all():
                raise InputError(f"Gaussians.{name} holds non-finite values")
            object.__setattr__(self, name, value)
        if (self.scales <= 0).any():
            raise InputError("Gaussians.scales must be > 0 (standard deviations)")
        if (np.linalg.norm(self.quats, axis=1) < 1e-8).any():
            raise InputError("Gaussians.quats must be non-zero quaternions (w, x, y, z)")
        if ((self.opacities <= 0) | (self.opacities >= 1)).any():
            raise InputError("Gaussians.opacities must lie in (0, 1)")
        if ((self.colors < 0) | (self.colors > 1)).any():
            raise InputError("Gaussians.colors must lie in [0, 1]")

    def __len__(self) -> int:
        return int(self.means.shape[0])

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in FIELDS}

    # The parameters a fit optimises: log-scales, opacity and colour logits (unconstrained).
    def raw(self) -> dict[str, np.ndarray]:
        return {"means": self.means.copy(), "log_scales": np.log(self.scales),
                "quats": self.quats / np.linalg.norm(self.quats, axis=1, keepdims=True),
                "opacity_logits": _logit(self.opacities), "color_logits": _logit(np.clip(self.colors, 1e-4, 1 - 1e-4))}

    @classmethod
    def from_raw(cls, raw: dict[str, np.ndarray]) -> Gaussians:
        q = np.asarray(raw["quats"], np.float64)
        return cls(raw["means"], np.exp(np.asarray(raw["log_scales"], np.float64)),
                   q / np.linalg.norm(q, axis=1, keepdims=True),
                   np.clip(_sigmoid(raw["opacity_logits"]), 1e-7, 1 - 1e-7), _sigmoid(raw["color_logits"]))


def _logit(p) -> np.ndarray:
    p = np.asarray(p, np.float64)
    return np.log(p) - np.log1p(-p)


def _sigmoid(x) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def camera_matrices(cameras, size: int, fov_deg: float = DEFAULT_FOV_DEG) -> tuple[np.ndarray, tuple]:
    """World-to-camera matrices (V, 4, 4, OpenCV axes) and pinhole (fx, fy, cx, cy) of ``cameras``."""
    cams = as_cameras(cameras)
    viewmats = np.stack([np.linalg.inv(c.opencv_c2w()) for c in cams])
    return viewmats, pinhole(size, fov_deg)


def pinhole(size: int, fov_deg: float = DEFAULT_FOV_DEG) -> tuple[float, float, float, float]:
    k = intrinsics(_check_size(size), fov_deg)
    return (k["fl_x"], k["fl_y"], k["cx"], k["cy"])


def _check_size(size) -> int:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise InputError(f"size must be a positive integer; got {size!r}")
    return int(size)


def _backend(backend, device=None):
    from ..backend import Backend

    if isinstance(backend, Backend) or not isinstance(backend, str):
        return backend
    from ..plugins import get_backend

    return get_backend(backend, device)


def render(gaussians: Gaussians, cameras, size: int, fov_deg: float = DEFAULT_FOV_DEG, backend="auto",
           device: str | None = None) -> np.ndarray:
    """float32 (V, size, size, 3) renders on white, with the 3DGS rasteriser's rules, from the poses and
    intrinsics ``cameras_json(cameras, size, fov_deg)`` exports. ``backend``: a name or a Backend.

    The backend's ``render_gaussians`` is the differentiable primitive (backend arrays in and out);
    this function is its numpy face."""
    if not isinstance(gaussians, Gaussians):
        raise InputError(f"render() takes Gaussians; got {type(gaussians).__name__}")
    viewmats, k = camera_matrices(cameras, size, fov_deg)
    be = _backend(backend, device)
    return be.to_numpy(be.render_gaussians(gaussians.as_dict(), viewmats, k, int(size))).astype(np.float32)


from .ply import load_ply, save_ply  # noqa: E402

__all__ = ["FIELDS", "Gaussians", "camera_matrices", "load_ply", "pinhole", "render", "save_ply"]
