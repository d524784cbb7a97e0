"""A procedural world of toy heads: oxigaf's embedded default model is trained and measured in it.

Every head is built from analytic shapes (ellipsoids, some of them clipped): a head, eyes with
irises, a nose, a mouth, ears, a hair cap over the top and back with a parting on one side, an
earring on one side, optionally glasses and a hat. Proportions, colours and a small head
rotation are random per seed. Rendering ray-casts every pixel (numpy, vectorised over all views
and pixels), with Lambertian plus ambient shading and a white background.

World and cameras are exactly oxigaf's (``oxigaf.cameras``): the subject stands at the origin
of the Z-up world and faces +X, so azimuth 0 sees the face, +90 the subject's left profile
(its left is +Y), 180 the hair at the back. Rays come from ``CameraParams.opengl_c2w()`` and
``cameras.intrinsics(size, fov_deg)``, the matrices ``transforms_json`` / ``cameras_json``
export, so a 3D point projected with an exported pose lands on the pixel that shows it.

What a side or back view shows is predictable from the front view: every colour (skin, hair,
eyes, earring, glasses, hat) and the head's proportions are visible from the front; the
front (face) and back (hair) differ, and left and right are not mirror images (the parting
and the earring are on one side), so a model has to use the camera.
"""

from __future__ import annotations

import colorsys
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cameras import DEFAULT_FOV_DEG, CameraParams, as_cameras, intrinsics, transforms_json
from .errors import InputError

# Seeds of the subjects the shipped model was trained on; held-out subjects must lie outside.
TRAIN_SEED_RANGE = (0, 1_000_000)
# The first held-out seed the demo and the benchmark use by default.
HELD_OUT_SEED = 1_000_000
AMBIENT = 0.4
DIFFUSE = 0.6
SUPERSAMPLE = 2  # rays per pixel side (box-filtered), for smooth silhouettes
BACKGROUND = 1.0  # white, in images and normal maps alike


# --------------------------------------------------------------------------- the subject


@dataclass(frozen=True)
class Part:
    """An ellipsoid in the head frame (x forward, y left, z up), optionally clipped.

    ``clip``: None, or ("hair", a, h): keep points with x/ax·cos a − z/az·sin a < h (the cap
    over the top and back; ax, az are the head's radii), or ("above", z0): keep z > z0.
    """

    name: str
    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    color: tuple[float, float, float]
    rotation: tuple[float, float, float] = (0.0, 0.0, 0.0)  # yaw, pitch, roll in radians
    clip: tuple | None = None


@dataclass(frozen=True)
class Subject:
    """A toy head: its parts in the head frame and the head's pose in the world."""

    seed: int
    parts: tuple[Part, ...]
    head_radii: tuple[float, float, float]
    head_rotation: np.ndarray = field(repr=False)  # 3x3, head frame -> world
    head_center: np.ndarray = field(repr=False)  # (3,) world
    parting_y: float = 0.0  # the hair parting's y in the head frame (its sign: the side)
    parting_color: tuple[float, float, float] = (0.0, 0.0, 0.0)
    earring_side: int = 0  # +1 left, -1 right, 0 none

    def to_world(self, p) -> np.ndarray:
        """Head-frame point(s) (..., 3) to world coordinates."""
        return np.asarray(p, np.float64) @ self.head_rotation.T + self.head_center

    def part(self, name: str) -> Part:
        return next(p for p in self.parts if p.name == name)


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation about z (yaw), then y (pitch, nose down for > 0), then x (roll)."""
    cy, sy, cp, sp, cr, sr = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch), math.cos(roll), \
        math.sin(roll)
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    rx = np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
    return rz @ ry @ rx


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    return tuple(float(c) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _on_head(radii, azimuth: float, elevation: float, inset: float = 0.0) -> tuple[float, float, float]:
    """A point on the head ellipsoid's surface seen from the centre at these angles (radians)."""
    d = np.array([math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth),
                  math.sin(elevation)])
    r = 1.0 / math.sqrt(float(np.sum((d / np.asarray(radii)) ** 2)))
    return tuple(float(v) for v in d * (r - inset))


def subject(seed: int) -> Subject:
    """The toy head of ``seed`` (any non-negative integer): the same seed, the same head."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed must be a non-negative integer; got {seed!r}")
    rng = np.random.default_rng([int(seed), 0x7045])
    u = rng.uniform
    ax, ay, az = u(0.38, 0.50), u(0.34, 0.46), u(0.42, 0.54)
    head = (ax, ay, az)
    # Skin: mostly human tones, sometimes a toy colour; hair: anything from black to blue.
    if u() < 0.75:
        skin = _hsv(u(0.02, 0.11), u(0.25, 0.65), u(0.35, 1.0))
    else:
        skin = _hsv(u(), u(0.3, 0.7), u(0.5, 1.0))
    hair = _hsv(u(), u(0.2, 1.0), u(0.08, 0.95))
    eye = _hsv(u(), u(0.5, 1.0), u(0.2, 0.8))
    lips = _hsv(u(-0.05, 0.05), u(0.5, 0.9), u(0.45, 0.9))
    nose = tuple(c * 0.88 for c in skin)

    parts = [Part("head", (0.0, 0.0, 0.0), head, skin)]
    eye_az, eye_el, eye_r = u(0.32, 0.5), u(0.08, 0.22), u(0.055, 0.075)
    iris_r = eye_r * u(0.5, 0.7)
    for side in (1, -1):
        c = _on_head(head, side * eye_az, eye_el, inset=eye_r * 0.45)
        parts.append(Part(f"eye_{'left' if side > 0 else 'right'}", c, (eye_r,) * 3, (0.97, 0.97, 0.97)))
        d = np.array([math.cos(eye_el) * math.cos(side * eye_az), math.cos(eye_el) * math.sin(side * eye_az),
                      math.sin(eye_el)])
        ci = tuple(float(v) for v in np.asarray(c) + d * (eye_r - iris_r * 0.55))
        parts.append(Part(f"iris_{'left' if side > 0 else 'right'}", ci, (iris_r,) * 3, eye))
    nose_len = u(0.05, 0.10)
    parts.append(Part("nose", _on_head(head, 0.0, u(-0.12, 0.0), inset=nose_len * 0.3),
                      (nose_len, u(0.035, 0.06), u(0.05, 0.09)), nose))
    mouth_w = u(0.07, 0.14)
    parts.append(Part("mouth", _on_head(head, 0.0, u(-0.45, -0.32), inset=0.012), (0.025, mouth_w, u(0.018, 0.035)),
                      lips))
    ear_el = u(-0.05, 0.12)
    ear = (u(0.04, 0.07), 0.03, u(0.07, 0.11))
    for side in (1, -1):
        parts.append(Part(f"ear_{'left' if side > 0 else 'right'}", _on_head(head, side * math.pi / 2, ear_el,
                                                                              inset=0.01), ear, skin))
    # The hair: a larger ellipsoid clipped to the top and back, sometimes longer at the back.
    grow = u(1.05, 1.13)
    hair_drop = u(0.0, 0.12)
    hair_radii = (ax * grow, ay * grow, az * grow + hair_drop * 0.5)
    parts.append(Part("hair", (-0.01, 0.0, -hair_drop * 0.5), hair_radii, hair,
                      clip=("hair", u(0.55, 0.95), u(0.2, 0.45))))
    parting_y = float(rng.choice([-1, 1]) * u(0.2, 0.5) * ay)
    parting_color = tuple(0.5 * a + 0.5 * b for a, b in zip(skin, hair, strict=True))
    earring_side = int(rng.choice([-1, 1])) if u() < 0.8 else 0
    if earring_side:
        ex, ey, ez = _on_head(head, earring_side * math.pi / 2, ear_el)
        r = u(0.03, 0.05)
        parts.append(Part("earring", (ex + 0.05, ey + earring_side * 0.025, ez - ear[2] - r * 0.6), (r,) * 3,
                          _hsv(u(), u(0.5, 1.0), u(0.7, 1.0))))
    if u() < 0.35:
        frame = _hsv(u(), u(0.0, 1.0), u(0.05, 0.9))
        for side in (1, -1):
            c = _on_head(head, side * eye_az, eye_el, inset=-eye_r * 0.9)
            parts.append(Part(f"lens_{'left' if side > 0 else 'right'}", c, (0.012, eye_r * 1.5, eye_r * 1.2), frame,
                              rotation=(side * eye_az, 0.0, 0.0)))
            # the arm from the lens back to the ear
            arm_len = ax * 0.55
            parts.append(Part(f"arm_{'left' if side > 0 else 'right'}", (c[0] - arm_len * 0.9, side * ay * 0.98,
                                                                           c[2]), (arm_len, 0.012, 0.012), frame))
        bridge = _on_head(head, 0.0, eye_el, inset=-eye_r * 0.9)
        parts.append(Part("bridge", bridge, (0.012, eye_az * ay * 0.5, 0.012), frame))
    if u() < 0.3:
        hat = _hsv(u(), u(0.3, 1.0), u(0.2, 0.95))
        base = az * u(0.55, 0.75)
        parts.append(Part("hat_brim", (0.02, 0.0, base), (ax * u(1.2, 1.4), ay * u(1.2, 1.4), 0.02), hat))
        parts.append(Part("hat_crown", (0.0, 0.0, base), (ax * 0.92, ay * 0.92, u(0.12, 0.22)), hat,
                          clip=("above", base)))
    pose = _rotation(u(-0.18, 0.18), u(-0.1, 0.1), u(-0.1, 0.1))
    center = np.array([0.0, 0.0, u(-0.04, 0.04)])
    return Subject(int(seed), tuple(parts), head, pose, center, parting_y, parting_color, earring_side)


# --------------------------------------------------------------------------- ray casting


def _clip_ok(part: Part, p_head: np.ndarray, head_radii) -> np.ndarray:
    if part.clip is None:
        return np.ones(p_head.shape[:-1], bool)
    kind = part.clip[0]
    if kind == "hair":
        _, angle, h = part.clip
        ax, _, az = head_radii
        return p_head[..., 0] / ax * math.cos(angle) - p_head[..., 2] / az * math.sin(angle) < h
    if kind == "above":
        return p_head[..., 2] > part.clip[1]
    raise ValueError(part.clip)  # pragma: no cover - internal


def _hit(part: Part, origin: np.ndarray, dirs: np.ndarray, subj: Subject):
    """Ray parameter t (inf where missed) and world normals of ``part`` for rays in world space."""
    r_part = _rotation(*part.rotation)
    rot = subj.head_rotation @ r_part  # part frame -> world
    center = subj.to_world(part.center)
    radii = np.asarray(part.radii)
    o = ((origin - center) @ rot) / radii  # (..., 3) in the unit-sphere frame
    d = (dirs @ rot) / radii
    a = np.sum(d * d, -1)
    b = 2.0 * np.sum(o * d, -1)
    c = np.sum(o * o, -1) - 1.0
    disc = b * b - 4 * a * c
    hit = disc > 0
    sq = np.sqrt(np.where(hit, disc, 0.0))
    best_t = np.full(a.shape, np.inf)
    best_n = np.zeros(a.shape + (3,))
    # Nearest root first; where the clip removes it, the far root (the inside of a clipped shell).
    for sign, flip in ((-1.0, 1.0), (1.0, -1.0)):
        t = (-b + sign * sq) / (2 * a)
        q = o + t[..., None] * d
        p_world = q * radii @ rot.T + center
        p_head = (p_world - subj.head_center) @ subj.head_rotation
        ok = hit & (t > 1e-6) & _clip_ok(part, p_head, subj.head_radii) & ~np.isfinite(best_t)
        n = (q / radii) @ rot.T * flip
        best_t = np.where(ok, t, best_t)
        best_n = np.where(ok[..., None], n, best_n)
    norm = np.linalg.norm(best_n, axis=-1, keepdims=True)
    return best_t, best_n / np.maximum(norm, 1e-12)


def _part_color(part: Part, p_world: np.ndarray, subj: Subject) -> np.ndarray:
    color = np.broadcast_to(np.asarray(part.color), p_world.shape).copy()
    if part.name == "hair":
        # The parting: a stripe along x on the top of the head, on one side.
        p = (p_world - subj.head_center) @ subj.head_rotation
        stripe = (np.abs(p[..., 1] - subj.parting_y) < 0.022) & (p[..., 2] > 0.0)
        stripe &= p[..., 0] > -0.6 * subj.head_radii[0]
        color[stripe] = subj.parting_color
    return color


def _rays(cameras: list[CameraParams], size: int, fov_deg: float, supersample: int):
    """World ray origins (V, 1, 1, 3), directions (V, S, S, 3) and camera rotations (V, 3, 3).

    The pinhole model of ``cameras.intrinsics``: pixel (row i, column j) spans [j, j+1) x [i, i+1)
    in the exported intrinsics' pixel units; OpenGL camera axes (x right, y up, looking down −z).
    """
    k = intrinsics(size, fov_deg)
    n = size * supersample
    offsets = (np.arange(n) + 0.5) / supersample  # sub-pixel centres, in pixels
    x = (offsets - k["cx"]) / k["fl_x"]
    y = -(offsets - k["cy"]) / k["fl_y"]
    d_cam = np.stack(np.broadcast_arrays(x[None, :], y[:, None], -np.ones((n, n))), -1)  # (S, S, 3)
    c2w = np.stack([c.opengl_c2w() for c in cameras])
    rot = c2w[:, :3, :3]
    dirs = np.einsum("vij,hwj->vhwi", rot, d_cam)
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    return c2w[:, None, None, :3, 3], dirs, rot


def render(seed: int, cameras, size: int = 64, *, fov_deg: float = DEFAULT_FOV_DEG) -> tuple[np.ndarray, np.ndarray]:
    """Render the toy head of ``seed`` from ``cameras``.

    ``cameras``: a list of ``CameraParams`` (or azimuths / tuples, as ``generate`` takes them).
    Returns ``(images, normals)``, both float32 (V, size, size, 3) in [0, 1]: shaded colour on
    white, and camera-space normals (OpenGL camera axes: x right, y up, z towards the camera)
    as RGB = (n + 1) / 2, white where no surface is hit. Deterministic per seed.
    """
    return _render_subject(subject(seed), cameras, size, fov_deg)


# The parts of a head's bare shape: GAF's coarse template (FLAME) carries no hair, glasses or jewellery.
TEMPLATE_PARTS = ("head", "ear_left", "ear_right", "nose")


def template_normals(seed: int, cameras, size: int = 64, *, fov_deg: float = DEFAULT_FOV_DEG) -> np.ndarray:
    """Normal maps (as ``render`` returns them) of the bare shape of ``seed``'s head: head, ears and
    nose, without hair, eyes, mouth, glasses, hat or earring, in the head's pose."""
    subj = subject(seed)
    bare = dataclasses.replace(subj, parts=tuple(p for p in subj.parts if p.name in TEMPLATE_PARTS))
    return _render_subject(bare, cameras, size, fov_deg)[1]


def _render_subject(subj: Subject, cameras, size, fov_deg: float):
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise InputError(f"size must be a positive integer; got {size!r}")
    cams = as_cameras(cameras)
    ss = SUPERSAMPLE
    origins, dirs, rot = _rays(cams, int(size), fov_deg, ss)
    shape = dirs.shape[:-1]
    d = dirs.reshape(-1, 3)
    o = np.broadcast_to(origins, dirs.shape).reshape(-1, 3)
    depth = np.full(d.shape[0], np.inf)
    normal = np.zeros(d.shape)
    color = np.full(d.shape, BACKGROUND)
    for part in subj.parts:
        # Only rays that pass the part's bounding sphere are intersected (most pixels are background).
        to_c = subj.to_world(part.center) - o
        along = np.sum(to_c * d, -1)
        bound = max(part.radii)
        idx = np.nonzero((np.sum(to_c * to_c, -1) - along ** 2 < bound ** 2) & (along > -bound))[0]
        if idx.size == 0:
            continue
        t, n = _hit(part, o[idx], d[idx], subj)
        closer = t < depth[idx]
        idx, t, n = idx[closer], t[closer], n[closer]
        p = o[idx] + t[:, None] * d[idx]
        depth[idx] = t
        normal[idx] = n
        color[idx] = _part_color(part, p, subj)
    hit_any = np.isfinite(depth).reshape(shape)
    normal = normal.reshape(dirs.shape)
    color = color.reshape(dirs.shape)
    # A light at the camera, raised a little: every view is lit alike, so colours carry over.
    light = rot @ np.array([0.25, 0.45, 1.0]) / np.linalg.norm([0.25, 0.45, 1.0])  # (V, 3) world
    lambert = np.clip(np.einsum("vhwi,vi->vhw", normal, light), 0.0, 1.0)
    shade = AMBIENT + DIFFUSE * lambert
    image = np.where(hit_any[..., None], color * shade[..., None], BACKGROUND)
    n_cam = np.einsum("vji,vhwj->vhwi", rot, normal)  # world -> camera: R^T n
    normals = np.where(hit_any[..., None], (n_cam + 1.0) / 2.0, BACKGROUND)
    return _downsample(image, ss), _downsample(normals, ss)


def _downsample(x: np.ndarray, f: int) -> np.ndarray:
    v, h, w, c = x.shape
    out = x.reshape(v, h // f, f, w // f, f, c).mean(axis=(2, 4))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def project(point, camera: CameraParams, size: int, fov_deg: float = DEFAULT_FOV_DEG) -> tuple[float, float]:
    """Pixel (column u, row v) of a world point, with the pose and intrinsics ``transforms.json`` exports."""
    pose = np.asarray(transforms_json([camera], size, fov_deg)["frames"][0]["transform_matrix"])
    k = intrinsics(size, fov_deg)
    p = np.linalg.inv(pose) @ np.append(np.asarray(point, np.float64), 1.0)
    return k["cx"] + k["fl_x"] * p[0] / -p[2], k["cy"] - k["fl_y"] * p[1] / -p[2]


# --------------------------------------------------------------------------- data sets


def training_azimuths(views_per_subject: int) -> list[float]:
    """Evenly spaced azimuths from the front: 0, 90, 180, 270 for 4 views."""
    return [i * 360.0 / views_per_subject for i in range(views_per_subject)]


def make_dataset(folder, subjects: int, views_per_subject: int = 4, size: int = 64, seed: int = 0) -> Path:
    """Write a training set in oxigaf's multi-view format and return its folder.

    Subject k (0 <= k < ``subjects``) is the head of seed ``seed + k`` in ``folder/subject_{seed+k:07d}/``:
    ``view_00.png``… at azimuths ``training_azimuths(views_per_subject)`` (elevation 0, distance 2,
    40° field of view), ``normal_00.png``… its camera-space normal maps, and a ``transforms.json``
    as ``MultiViewOutput.save`` writes it, each frame also naming its normal map under
    ``normal_file_path``. Each subject folder is written under a temporary name and renamed.
    """
    from PIL import Image

    from .images import to_uint8

    for name, value, low in (("subjects", subjects, 1), ("views_per_subject", views_per_subject, 1),
                             ("size", size, 8), ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise InputError(f"{name} must be an integer >= {low}; got {value!r}")
    root = Path(folder)
    if root.exists() and not root.is_dir():
        raise InputError(f"dataset folder {root} exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    cams = [CameraParams(a) for a in training_azimuths(int(views_per_subject))]
    from tqdm.auto import tqdm

    for k in tqdm(range(int(subjects)), desc="toy heads", disable=not os.isatty(2), leave=False):
        s = int(seed) + k
        images, normals = render(s, cams, int(size))
        dst = root / f"subject_{s:07d}"
        tmp = root / f".{dst.name}.tmp"
        tmp.mkdir(exist_ok=True)
        meta = transforms_json(cams, int(size))
        for i, frame in enumerate(meta["frames"]):
            Image.fromarray(to_uint8(images[i])).save(tmp / f"view_{i:02d}.png")
            Image.fromarray(to_uint8(normals[i])).save(tmp / f"normal_{i:02d}.png")
            frame["normal_file_path"] = f"normal_{i:02d}.png"
        meta["toy_seed"] = s
        (tmp / "transforms.json").write_text(json.dumps(meta, indent=2))
        if dst.exists():
            import shutil

            shutil.rmtree(dst)
        tmp.rename(dst)
    return root


# --------------------------------------------------------------------------- the shipped model


MODEL_DIR = Path(__file__).parent / "toy_model"


def model_path(normals: bool = False) -> Path:
    """The shipped toy ImageDream model (a pipeline folder): plain, or normal-conditioned (8 channels)."""
    path = MODEL_DIR / ("imagedream-normals" if normals else "imagedream")
    if not (path / "model_index.json").is_file():
        from .errors import ModelLoadError

        raise ModelLoadError(f"the toy model is missing from {path} (a broken install?)")
    return path


__all__ = ["HELD_OUT_SEED", "Part", "Subject", "TEMPLATE_PARTS", "TRAIN_SEED_RANGE", "make_dataset", "model_path",
           "project", "psnr", "render", "ssim", "subject", "template_normals", "training_azimuths"]


# --------------------------------------------------------------------------- metrics


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB of two float images in [0, 1]."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim(a, b) -> float:
    """Mean structural similarity (Wang et al. 2004) of two (H, W, 3) float images in [0, 1]:
    Gaussian window sigma 1.5 (truncated at 3.5 sigma, valid region only), K1 0.01, K2 0.03, per
    channel, averaged. The settings of scikit-image's ``structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1)``; benchmarks/quality.py uses scikit-image
    itself where installed."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    radius = int(3.5 * 1.5 + 0.5)
    x = np.arange(-radius, radius + 1)
    g = np.exp(-(x ** 2) / (2 * 1.5 ** 2))
    g /= g.sum()

    def blur(img):
        out = np.apply_along_axis(lambda r: np.convolve(r, g, mode="valid"), 0, img)
        return np.apply_along_axis(lambda r: np.convolve(r, g, mode="valid"), 1, out)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = blur(a), blur(b)
    saa = blur(a * a) - mu_a ** 2
    sbb = blur(b * b) - mu_b ** 2
    sab = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return float(s.mean())
