"""The page's "3D" action: 3D Gaussians fitted to a request's views (``oxigaf fit``'s fit), as a ``.ply``.

It reads the request's output folder (its ``transforms.json`` and views) exactly as ``oxigaf fit
FOLDER`` does, starts from the views' visual hull with a fixed seed, and writes
``point_cloud.ply`` into the request's folder under a temporary name first. Nothing here imports
Gradio.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError

PLY_NAME = "point_cloud.ply"
# (low, high) of the two settings; the page's sliders use the same bounds.
GAUSSIANS = (100, 20_000)
ITERATIONS = (1, 2_000)
SEED = 0


def count(value, name: str, bounds: tuple[int, int]) -> int:
    """``value`` as an integer within ``bounds``, else an ``InputError`` naming ``name``."""
    low, high = bounds
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
    if not ok or not low <= value <= high:
        raise InputError(f"{name} must be an integer in [{low}, {high}]; got {value!r}")
    return int(value)


def fit(folder, gaussians: int, iterations: int, backend, step=None) -> Path:
    """Fit ``gaussians`` Gaussians to the views in ``folder`` for ``iterations`` steps on ``backend``;
    ``step(i, total)`` after each step. Returns the written ``folder / PLY_NAME``."""
    from ..splat.fit import Fitter, initial_gaussians, read_frames
    from ..splat.ply import save_ply

    gaussians = count(gaussians, "gaussians", GAUSSIANS)
    iterations = count(iterations, "iterations", ITERATIONS)
    folder = Path(folder)
    if not (folder / "transforms.json").is_file():
        raise InputError("there are no views to fit here: generate views first (or they were cleaned up: the "
                         "server keeps only its latest requests)")
    frames = read_frames([folder])
    fitter = Fitter(frames, initial_gaussians(frames, gaussians, SEED), iterations=iterations, seed=SEED,
                    backend=backend)
    for i in range(iterations):
        fitter.step()
        if step is not None:
            step(i, iterations)
    return save_ply(fitter.gaussians(), folder / PLY_NAME)


__all__ = ["GAUSSIANS", "ITERATIONS", "PLY_NAME", "count", "fit"]
