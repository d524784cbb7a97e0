"""Fitting 3D Gaussians to posed frames, and the ``oxigaf fit`` command.

Frames come from folders with a ``transforms.json`` (what ``MultiViewOutput.save`` writes,
``toys.make_dataset`` subjects, nerfstudio-style captures: OpenGL camera-to-world per frame,
intrinsics ``fl_x fl_y cx cy`` or ``camera_angle_x``). The fit is 3DGS's: one frame per step in
a shuffled cycle, Adam on 0.8·L1 + 0.2·D-SSIM, the means' learning rate decaying exponentially to
1/100; it starts from the frames' visual hull (points inside every silhouette, coloured by the
frame that faces them) or a sphere. ``densify`` moves the Gaussians that have faded
(opacity < 0.005) onto copies of those with the largest positional gradients, keeping N fixed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cameras import DEFAULT_FOV_DEG, CameraParams
from ..errors import InputError, NumericsError
from . import Gaussians, _backend, camera_matrices

_GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])
# Learning rates for ``iterations`` of a few hundred (3DGS's are tuned for 30,000 steps).
LEARNING_RATES = {"means": 2e-3, "log_scales": 1e-2, "quats": 2e-3, "opacity_logits": 5e-2, "color_logits": 3e-2}
CHECKPOINT_EVERY = 100  # steps between the .ply snapshots ``oxigaf fit`` writes
FOREGROUND = 0.97  # a pixel with any channel below this is part of the subject (the backgrounds are white)


@dataclass
class Frames:
    """Posed square frames: images (F, S, S, 3) in [0, 1] on white, world-to-camera ``viewmats``
    (F, 4, 4, OpenCV axes), pinhole ``intrinsics`` (fx, fy, cx, cy)."""

    images: np.ndarray
    viewmats: np.ndarray
    intrinsics: tuple
    size: int
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_cameras(cls, images, cameras: list[CameraParams], fov_deg: float = DEFAULT_FOV_DEG) -> Frames:
        images = np.asarray(images, np.float32)
        viewmats, k = camera_matrices(cameras, images.shape[1], fov_deg)
        return cls(images, viewmats, k, images.shape[1], [f"camera {c}" for c in cameras])

    def __add__(self, other: Frames) -> Frames:
        if other.size != self.size or not np.allclose(other.intrinsics, self.intrinsics):
            raise InputError(f"frames of {self.size}×{self.size} and {other.size}×{other.size} px (or different "
                             "intrinsics) cannot be fitted together")
        return Frames(np.concatenate([self.images, other.images]), np.concatenate([self.viewmats, other.viewmats]),
                      self.intrinsics, self.size, self.names + other.names)


def _intrinsics(meta: dict, frame: dict, w: int, h: int, where) -> tuple:
    get = lambda key: frame.get(key, meta.get(key))  # noqa: E731 (nerfstudio allows per-frame intrinsics)
    if get("fl_x") is not None:
        fx = float(get("fl_x"))
        fy = float(get("fl_y") if get("fl_y") is not None else fx)
    elif get("camera_angle_x") is not None:
        fx = fy = 0.5 * w / math.tan(0.5 * float(get("camera_angle_x")))
    else:
        raise InputError(f"{where}: no intrinsics (fl_x/fl_y or camera_angle_x)")
    cx = float(get("cx") if get("cx") is not None else w / 2)
    cy = float(get("cy") if get("cy") is not None else h / 2)
    return fx, fy, cx, cy


def read_frames(folders) -> Frames:
    """The posed frames of every folder (each with a ``transforms.json``), all of one size."""
    from PIL import Image

    from ..training.data import read_subject

    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    images, viewmats, names, ks = [], [], [], []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"{folder} is not a folder")
        if not (folder / "transforms.json").is_file():
            raise InputError(f"{folder} has no poses: a transforms.json is missing (oxigaf generate writes one)")
        subject = read_subject(folder)
        if not subject.frames:
            raise InputError(f"{folder / 'transforms.json'} lists no frames")
        meta = json.loads((folder / "transforms.json").read_text())
        for i, frame in enumerate(subject.frames):
            with Image.open(frame.image) as im:
                im = im.convert("RGBA")
                rgba = np.asarray(im, np.float32) / 255.0
            w, h = im.size
            if w != h:
                raise InputError(f"{frame.image} is {w}×{h} px: oxigaf fit takes square frames")
            if images and rgba.shape[:2] != images[0].shape[:2]:
                raise InputError(f"frames of mixed sizes: {names[0]} is {images[0].shape[1]} px, "
                                 f"{frame.image} is {w} px; fit frames of one size")
            k = _intrinsics(meta, meta["frames"][i], w, h, folder / "transforms.json")
            if ks and not np.allclose(k, ks[0], rtol=1e-4):
                raise InputError(f"{frame.image} has intrinsics {k}, {names[0]} has {ks[0]}: fit frames of one camera")
            images.append(rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:]))  # on white
            viewmats.append(np.linalg.inv(frame.c2w @ _GL_TO_CV))
            names.append(str(frame.image))
            ks.append(k)
    if not images:
        raise InputError("no folders given")
    return Frames(np.stack(images).astype(np.float32), np.stack(viewmats), ks[0], images[0].shape[0], names)


# --------------------------------------------------------------------------- initialisation


def _project(points: np.ndarray, frames: Frames):
    """Pixel coordinates (F, P, 2) and depths (F, P) of world points in every frame."""
    fx, fy, cx, cy = frames.intrinsics
    p = np.einsum("fij,pj->fpi", frames.viewmats[:, :3, :3], points) + frames.viewmats[:, None, :3, 3]
    z = p[..., 2]
    zs = np.where(z > 1e-6, z, 1e-6)
    return np.stack([fx * p[..., 0] / zs + cx, fy * p[..., 1] / zs + cy], -1), z


def _scene_radius(frames: Frames) -> float:
    """Half the width of what the cameras see at the distance of the origin."""
    centres = np.stack([-vm[:3, :3].T @ vm[:3, 3] for vm in frames.viewmats])
    distance = float(np.median(np.linalg.norm(centres, axis=1)))
    return distance * 0.5 * frames.size / frames.intrinsics[0]


def initial_gaussians(frames: Frames, count: int, seed: int = 0, init: str = "hull") -> Gaussians:
    """``count`` Gaussians inside the frames' visual hull (or a sphere), opacity 0.1, isotropic,
    scales the mean distance to the 3 nearest neighbours (as 3DGS starts)."""
    rng = np.random.default_rng(seed)
    radius = _scene_radius(frames)
    points = np.zeros((0, 3))
    if init == "hull":
        masks = (frames.images < FOREGROUND).any(-1)
        for _ in range(8):
            cand = rng.uniform(-radius, radius, (max(20 * count, 10000), 3))
            uv, z = _project(cand, frames)
            pix = np.floor(uv).astype(int)
            inside = (pix >= 0).all(-1) & (pix < frames.size).all(-1) & (z > 0)
            fg = np.zeros(inside.shape, bool)
            f_idx, p_idx = np.nonzero(inside)
            fg[f_idx, p_idx] = masks[f_idx, pix[f_idx, p_idx, 1], pix[f_idx, p_idx, 0]]
            points = np.concatenate([points, cand[fg.all(0)]])
            if len(points) >= count:
                break
    elif init != "sphere":
        raise InputError(f"init must be 'hull' or 'sphere'; got {init!r}")
    if len(points) < count:  # an empty hull (blank frames) or a sphere asked for
        d = rng.normal(size=(count, 3))
        points = d / np.linalg.norm(d, axis=1, keepdims=True) * 0.6 * radius * rng.uniform(0, 1, (count, 1)) ** (1 / 3)
    points = points[rng.permutation(len(points))[:count]]
    colors = _facing_colors(points, frames)
    dist = np.empty(count)
    for i in range(0, count, 512):
        d2 = np.sum((points[i:i + 512, None] - points[None]) ** 2, -1)
        d2.sort(axis=1)
        dist[i:i + 512] = np.sqrt(d2[:, 1:4].mean(1))
    scales = np.repeat(np.maximum(dist, 1e-4)[:, None], 3, 1)
    quats = np.tile([1.0, 0.0, 0.0, 0.0], (count, 1))
    return Gaussians(points, scales, quats, np.full(count, 0.1), np.clip(colors, 0.02, 0.98))


def _facing_colors(points: np.ndarray, frames: Frames) -> np.ndarray:
    """Each point's colour in the frame whose camera looks most directly at its side of the subject."""
    centre = points.mean(0)
    outward = points - centre
    outward /= np.maximum(np.linalg.norm(outward, axis=1, keepdims=True), 1e-9)
    cams = np.stack([-vm[:3, :3].T @ vm[:3, 3] for vm in frames.viewmats])
    to_cam = cams / np.linalg.norm(cams, axis=1, keepdims=True)
    best = np.argmax(outward @ to_cam.T, axis=1)
    uv, _ = _project(points, frames)
    pix = np.clip(np.floor(uv[best, np.arange(len(points))]).astype(int), 0, frames.size - 1)
    return frames.images[best, pix[:, 1], pix[:, 0]].astype(np.float64)


# --------------------------------------------------------------------------- fitting


class Fitter:
    """Gaussians being fitted to frames on a backend: ``run(n)`` takes n steps; ``set_frames``
    swaps the targets (the GAF loop refreshes its refined views); ``gaussians()`` reads them out."""

    DENSIFY_EVERY = 100
    DEAD_OPACITY = 0.005

    def __init__(self, frames: Frames, gaussians: Gaussians, *, iterations: int, seed: int = 0, backend="auto",
                 device: str | None = None, learning_rates: dict | None = None, densify: bool = False):
        if not isinstance(iterations, int) or iterations < 1:
            raise InputError(f"iterations must be an integer >= 1; got {iterations!r}")
        self.backend = _backend(backend, device)
        self.lrs = {**LEARNING_RATES, **(learning_rates or {})}
        self.frames, self.total, self.densify, self.iteration = frames, iterations, densify, 0
        self.rng = np.random.default_rng(seed)
        self.trainer = self.backend.gaussian_trainer(gaussians.raw(), frames.images, frames.viewmats,
                                                     frames.intrinsics, frames.size, self.lrs)
        self.grads = np.zeros(len(gaussians))
        self.cycle: list[int] = []
        self.loss = float("nan")

    def set_frames(self, frames: Frames) -> None:
        if frames.size != self.frames.size:
            raise InputError(f"new frames are {frames.size} px, the fit's are {self.frames.size} px")
        self.frames, self.cycle = frames, []
        self.trainer.set_targets(frames.images, frames.viewmats)

    def step(self) -> float:
        if not self.cycle:
            self.cycle = list(self.rng.permutation(len(self.frames)))
        frame = self.cycle.pop()
        self.trainer.set_lr("means", self.lrs["means"] * 0.01 ** (self.iteration / self.total))
        out = self.trainer.step([frame])
        self.iteration += 1
        if not math.isfinite(out["loss"]) or not np.isfinite(out["grad_means"]).all():
            raise NumericsError(f"the fit's loss is not finite at iteration {self.iteration} "
                                f"(frame {self.frames.names[frame] if self.frames.names else frame})")
        self.loss = out["loss"]
        self.grads += out["grad_means"]
        if self.densify and self.iteration % self.DENSIFY_EVERY == 0 and self.iteration <= 0.8 * self.total:
            self._relocate()
        return self.loss

    def _relocate(self) -> None:
        """Move faded Gaussians onto the ones whose means the loss pulls hardest, splitting their opacity."""
        raw = self.trainer.raw()
        opacity = 1.0 / (1.0 + np.exp(-raw["opacity_logits"].astype(np.float64)))
        dead = np.nonzero(opacity < self.DEAD_OPACITY)[0]
        alive = np.nonzero(opacity >= self.DEAD_OPACITY)[0]
        if len(dead) and len(alive):
            src = alive[np.argsort(-self.grads[alive])[:len(dead)]]
            dead = dead[:len(src)]
            split = 1.0 - np.sqrt(1.0 - opacity[src])
            logit = np.log(split) - np.log1p(-split)
            for name in ("means", "log_scales", "quats", "color_logits"):
                raw[name][dead] = raw[name][src]
            raw["log_scales"][src] += math.log(0.8)
            raw["log_scales"][dead] += math.log(0.8)
            raw["means"][dead] += self.rng.normal(size=(len(dead), 3)) * np.exp(raw["log_scales"][dead])
            raw["opacity_logits"][src] = logit
            raw["opacity_logits"][dead] = logit
            self.trainer.set_params(raw)
        self.grads[:] = 0.0

    def run(self, steps: int, progress=None) -> float:
        for _ in range(steps):
            self.step()
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{self.loss:.4f}", refresh=False)
        return self.loss

    def gaussians(self) -> Gaussians:
        return Gaussians.from_raw(self.trainer.raw())

    def render(self, viewmats: np.ndarray) -> np.ndarray:
        return np.asarray(self.trainer.render(viewmats), np.float32)


def orbit_cameras(frames: Frames, count: int = 24, elevation: float = 10.0) -> list[CameraParams]:
    centres = np.stack([-vm[:3, :3].T @ vm[:3, 3] for vm in frames.viewmats])
    distance = float(np.median(np.linalg.norm(centres, axis=1)))
    return [CameraParams(i * 360.0 / count, elevation, distance) for i in range(count)]


def save_orbit(fitter: Fitter, path: Path, frames: Frames) -> Path:
    """An animated GIF of the Gaussians turning once, written atomically."""
    from PIL import Image

    from ..images import to_uint8

    viewmats, _ = camera_matrices(orbit_cameras(frames), frames.size)
    pictures = [Image.fromarray(to_uint8(v)) for v in fitter.render(viewmats)]
    tmp = path.with_name(f".{path.name}.tmp")
    pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:], duration=80, loop=0)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- the command


def add_arguments(parser) -> None:
    parser.add_argument("folders", nargs="+", metavar="FOLDER",
                        help="folders of posed frames (transforms.json, as oxigaf generate writes)")
    parser.add_argument("-o", "--output", required=True, help="output folder (point_cloud.ply, orbit.gif)")
    parser.add_argument("--gaussians", type=int, default=5000, help="number of Gaussians (default 5000)")
    parser.add_argument("--iterations", type=int, default=500, help="optimisation steps (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and frame order")
    parser.add_argument("--backend", default="auto", help="torch, mlx or auto (default)")
    parser.add_argument("--device", default=None, help="backend device (torch: cpu, cuda, mps)")
    parser.add_argument("--init", choices=("hull", "sphere"), default="hull",
                        help="start inside the frames' visual hull (default) or a sphere")
    parser.add_argument("--densify", action="store_true",
                        help="move faded Gaussians onto the ones with the largest gradients every 100 steps")
    parser.add_argument("--refine", metavar="MODEL", default=None,
                        help="run GAF's loop: refine renders with this multi-view model (needs --photo)")
    parser.add_argument("--photo", default=None, help="the input photo the refinement is conditioned on")
    parser.add_argument("--rounds", type=int, default=4, help="refinement rounds of the GAF loop (default 4)")
    parser.add_argument("--template-seed", type=int, default=None,
                        help="coarse template for a normal-conditioned model: the bare shape of this toy head")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _check_count(name: str, value, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InputError(f"--{name} must be an integer >= {low}; got {value!r}")
    return value


def run(args) -> int:
    from tqdm.auto import tqdm

    from .ply import save_ply

    _check_count("gaussians", args.gaussians)
    _check_count("iterations", args.iterations)
    if (args.refine is None) != (args.photo is None):
        raise InputError("--refine MODEL and --photo PATH go together (GAF's loop refines renders conditioned on "
                         "the photo)")
    frames = read_frames(args.folders)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    start = initial_gaussians(frames, args.gaussians, args.seed, args.init)
    fitter = Fitter(frames, start, iterations=args.iterations, seed=args.seed, backend=args.backend,
                    device=args.device, densify=args.densify)
    ply = out / "point_cloud.ply"
    with tqdm(total=args.iterations, desc="fitting Gaussians", disable=args.quiet) as bar:
        if args.refine is not None:
            from .loop import gaf_loop

            template = None
            if args.template_seed is not None:
                from ..toys import template_normals

                template = lambda cams, size: template_normals(args.template_seed, cams, size)  # noqa: E731
            gaf_loop(fitter, args.refine, args.photo, rounds=args.rounds, template=template, seed=args.seed,
                     progress=bar, checkpoint=lambda g: save_ply(g, ply))
        else:
            done = 0
            while done < args.iterations:
                steps = min(CHECKPOINT_EVERY, args.iterations - done)
                fitter.run(steps, bar)
                done += steps
                save_ply(fitter.gaussians(), ply)  # the last good state stays if a later step fails
    save_orbit(fitter, out / "orbit.gif", frames)
    if not args.quiet:
        print(f"{len(start)} Gaussians fitted to {len(frames)} frames ({args.iterations} steps, final loss "
              f"{fitter.loss:.4f}) -> {ply}, {out / 'orbit.gif'}")
    return 0
