"""Gaussians as ``.ply`` files in the original 3DGS layout (what splat viewers open).

Per vertex, float32: x y z; nx ny nz (zeros); f_dc_0..2 = (rgb − 0.5) / C0, the degree-0
spherical-harmonics coefficients with C0 = 0.28209479177387814; opacity as a logit; scale_0..2 as
natural logs of the standard deviations; rot_0..3 the quaternion w x y z. ``load_ply`` also reads
files with higher-degree ``f_rest_*`` (ignored: oxigaf's Gaussians carry one colour each) and
unnormalised quaternions, as 3DGS writes them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError

SH_C0 = 0.28209479177387814
PROPERTIES = ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
              "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")


def _plyfile():
    try:
        import plyfile
    except ImportError as exc:
        raise InputError("reading and writing .ply files needs plyfile: pip install 'oxigaf[splat]'") from exc
    return plyfile


def save_ply(gaussians, path: str | os.PathLike) -> Path:
    """Write ``gaussians`` to ``path`` atomically (a temporary name, then a rename); returns the path."""
    from . import Gaussians

    if not isinstance(gaussians, Gaussians):
        raise InputError(f"save_ply() takes Gaussians; got {type(gaussians).__name__}")
    plyfile = _plyfile()
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a file name ending in .ply")
    raw = gaussians.raw()
    columns = [gaussians.means, np.zeros_like(gaussians.means), (gaussians.colors - 0.5) / SH_C0,
               raw["opacity_logits"][:, None], raw["log_scales"], raw["quats"]]
    table = np.concatenate([np.asarray(c, np.float32).reshape(len(gaussians), -1) for c in columns], 1)
    vertices = np.empty(len(gaussians), dtype=[(name, "f4") for name in PROPERTIES])
    for i, name in enumerate(PROPERTIES):
        vertices[name] = table[:, i]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        plyfile.PlyData([plyfile.PlyElement.describe(vertices, "vertex")]).write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_ply(path: str | os.PathLike):
    """Gaussians from a 3DGS-layout ``.ply``; an ``InputError`` names what is missing or wrong."""
    from . import Gaussians

    plyfile = _plyfile()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no .ply file at {path}")
    try:
        data = plyfile.PlyData.read(str(path))
    except Exception as exc:  # plyfile raises several types for malformed files
        raise InputError(f"{path} is not a readable .ply file: {exc}") from exc
    if "vertex" not in [e.name for e in data.elements]:
        raise InputError(f"{path} has no 'vertex' element")
    v = data["vertex"]
    names = set(v.data.dtype.names or ())
    missing = [p for p in PROPERTIES if p not in names and not p.startswith("n")]
    if missing:
        raise InputError(f"{path} lacks the 3DGS properties {missing}")

    def cols(*keys):
        return np.stack([np.asarray(v[k], np.float64) for k in keys], 1)

    quats = cols("rot_0", "rot_1", "rot_2", "rot_3")
    norm = np.linalg.norm(quats, axis=1, keepdims=True)
    if (norm < 1e-12).any():
        raise InputError(f"{path} holds zero quaternions")
    logits = np.asarray(v["opacity"], np.float64)
    opac = 1.0 / (1.0 + np.exp(-logits))
    colors = cols("f_dc_0", "f_dc_1", "f_dc_2") * SH_C0 + 0.5
    return Gaussians(cols("x", "y", "z"), np.exp(cols("scale_0", "scale_1", "scale_2")), quats / norm,
                     np.clip(opac, 1e-7, 1 - 1e-7), np.clip(colors, 0.0, 1.0))
