"""GAF's loop: fit Gaussians, refine their renders with the multi-view model, fit to the refined views.

Each round renders the current Gaussians from 4 cameras 90° apart (a random azimuth offset),
refines the renders with ``Pipeline.refine`` (SDEdit from a timestep t drawn in [20, t_max], t_max
annealed linearly from 980 to 20 over the rounds; ``strength = t / 1000`` of 50 DDIM steps, GAF's
schedule), conditioned on the photo's ``condition()`` computed once and, for a normal-conditioned
UNet, on normal maps of a coarse template, then fits on the input frames plus the refined views.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..cameras import CameraParams
from ..errors import InputError
from .fit import Fitter, Frames

T_RANGE = (20.0, 980.0)
STEPS = 50


def refine_cameras(rng: np.random.Generator, distance: float) -> list[CameraParams]:
    offset = float(rng.uniform(0.0, 90.0))
    return [CameraParams(offset + 90.0 * i, 0.0, distance) for i in range(4)]


def gaf_loop(fitter: Fitter, model, photo, *, rounds: int = 4, template: Callable | None = None, seed: int = 0,
             progress=None, checkpoint: Callable | None = None, pipeline=None, out=None,
             accumulate: bool = False) -> Fitter:
    """Run ``fitter.total`` steps in ``rounds + 1`` stages: a fit on the fitter's frames, then
    ``rounds`` refine-and-fit rounds. ``model``: a pipeline folder (or pass ``pipeline``);
    ``photo``: the input photo (path, PIL image or array); ``template(cameras, size)``: normal maps
    (N, size, size, 3) of the coarse template, needed when the UNet is normal-conditioned;
    ``checkpoint(gaussians)`` is called after each stage; ``accumulate`` keeps every round's refined
    views as targets (else only the latest round's). Returns the fitter."""
    from ..pipeline import Pipeline

    if not isinstance(rounds, int) or rounds < 1:
        raise InputError(f"rounds must be an integer >= 1; got {rounds!r}")
    pipe = pipeline if pipeline is not None else Pipeline.from_pretrained(model, backend=fitter.backend)
    if pipe.conditioning_maps and template is None:
        raise InputError("this model's UNet is normal-conditioned: GAF's loop needs normal maps of a coarse template "
                         "(for toy heads: --template-seed)")
    size = pipe.native_size
    if fitter.frames.size != size:
        raise InputError(f"the frames are {fitter.frames.size} px, the model refines {size} px views: "
                         f"fit frames of {size} px")
    rng = np.random.default_rng(seed)
    condition = pipe.condition(_load(photo))
    base = fitter.frames
    centres = np.stack([-vm[:3, :3].T @ vm[:3, 3] for vm in base.viewmats])
    distance = float(np.median(np.linalg.norm(centres, axis=1)))
    stage = fitter.total // (rounds + 1)
    fitter.run(stage, progress)
    if checkpoint is not None:
        checkpoint(fitter.gaussians())
    for r in range(rounds):
        t_max = T_RANGE[1] - (T_RANGE[1] - T_RANGE[0]) * r / max(rounds - 1, 1)
        t = float(rng.uniform(T_RANGE[0], max(t_max, T_RANGE[0] + 1)))
        cams = refine_cameras(rng, distance)
        refined = Frames.from_cameras(np.zeros((4, size, size, 3), np.float32), cams, fov_deg=_fov(base))
        renders = fitter.render(refined.viewmats)
        normals = None
        if pipe.conditioning_maps:
            normals = list(np.asarray(template(cams + [CameraParams(0.0, 0.0, distance)], size), np.float32))
        strength = max(t / 1000.0, 1.0 / STEPS)
        result = pipe.refine(list(renders), condition, cams, strength=strength, num_inference_steps=STEPS,
                             normals=normals, seed=int(rng.integers(2**31)), output_size=size, progress=False)
        refined.images = np.asarray(result.images, np.float32)
        if out is not None:
            out(f"round {r + 1}/{rounds}: t = {t:.0f}, azimuths {[round(c.azimuth) for c in cams]}")
        if accumulate:
            base = base + refined
            fitter.set_frames(base)
        else:
            fitter.set_frames(base + refined)
        fitter.run(stage if r < rounds - 1 else fitter.total - fitter.iteration, progress)
        if checkpoint is not None:
            checkpoint(fitter.gaussians())
    return fitter


def _fov(frames: Frames) -> float:
    return float(np.degrees(2.0 * np.arctan(0.5 * frames.size / frames.intrinsics[0])))


def _load(photo):
    from PIL import Image

    if isinstance(photo, np.ndarray):
        from ..images import to_uint8

        return Image.fromarray(to_uint8(photo))
    if isinstance(photo, Image.Image):
        return photo
    try:
        with Image.open(photo) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the photo {photo}: {exc}") from exc
