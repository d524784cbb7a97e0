"""Training data: a folder of subjects in the format ``MultiViewOutput.save()`` writes.

Layout::

    DATA/
      subject_a/
        transforms.json        nerfstudio / instant-ngp: {"frames": [{"file_path", "transform_matrix"}, ...]}
        view_00.png ...        RGB, or RGBA composited on white (as inputs are)
        normal_00.png ...      optional normal maps, named per frame by "normal_file_path"
      subject_b/ ...

``DATA`` may also be a single subject (it holds ``transforms.json`` itself). Every other
visible sub-folder of ``DATA`` is a subject and must hold a ``transforms.json``. Files that
are not named by a frame (``grid.png``, ``cameras.json``) are ignored. Optional keys:
``"prompt"`` (top level: the subject's caption, default ""), ``"up"`` (top level: the world's
up axis, a 3-vector; default: the mean of the cameras' up vectors, nerfstudio's "up"
orientation), and per frame ``"normal_file_path"`` (RGB = (n + 1) / 2).

Cameras: ``transform_matrix`` is an OpenGL camera-to-world matrix (x right, y up, looking
down -z) in any world whose origin is the subject. For each sample the whole world is rotated
so that the world's up axis becomes the model's up (+Z of its Blender world) and the chosen
reference camera sits at azimuth 0 (it keeps its elevation), exactly as at inference; the
16-float camera vectors are then built as ``CameraParams.vector`` builds them (translation
normalised to unit length). oxigaf's own outputs are already in that world.

Latents are the VAE posterior mean times ``scaling_factor`` (deterministic, as the
pipeline's reference latent), encoded once and cached in ``SUBJECT/.oxigaf_cache/``, keyed
by a hash of the VAE's weight files and the image size; CLIP states likewise by the image
encoder's weights and preprocessing. A changed image (size or modification time) is
re-encoded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cameras import CameraParams
from ..errors import InputError

NORMAL_KEY = "normal_file_path"
CACHE_DIR = ".oxigaf_cache"
_MODEL_UP = np.array([0.0, 0.0, 1.0])
# The azimuth-0 camera's direction from the subject in the model's world.
_MODEL_FRONT = CameraParams(0.0, 0.0, 1.0).opengl_c2w()[:3, 3]


@dataclass
class Frame:
    image: Path
    c2w: np.ndarray  # (4, 4) float64 OpenGL camera-to-world, data world
    normal: Path | None = None


@dataclass
class Subject:
    folder: Path
    frames: list[Frame]
    prompt: str = ""
    up: np.ndarray = field(default_factory=lambda: _MODEL_UP.copy())

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def has_normals(self) -> bool:
        return all(f.normal is not None for f in self.frames)


def _is_matrix(m) -> bool:
    try:
        arr = np.asarray(m, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return arr.shape in ((4, 4), (3, 4)) and bool(np.isfinite(arr).all())


def _check_image(path: Path, what: str, where: Path) -> None:
    if not path.is_file():
        raise InputError(f"{where}: {what} {path.name} does not exist ({path})")
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as exc:  # Pillow reports a corrupt file as any of several exceptions
        raise InputError(f"{where}: {what} {path.name} cannot be read as an image ({path}): {exc}") from exc


def read_subject(folder: str | os.PathLike, *, check_images: bool = True) -> Subject:
    """Parse one subject folder; every problem is an ``InputError`` naming the file."""
    folder = Path(folder)
    tf = folder / "transforms.json"
    if not tf.is_file():
        raise InputError(f"subject {folder} has no transforms.json")
    try:
        data = json.loads(tf.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{tf} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("frames"), list):
        raise InputError(f"{tf} must be an object with a 'frames' list")
    frames = []
    for i, fr in enumerate(data["frames"]):
        if not isinstance(fr, dict) or not isinstance(fr.get("file_path"), str):
            raise InputError(f"{tf}: frame {i} has no 'file_path' string")
        if not _is_matrix(fr.get("transform_matrix")):
            raise InputError(f"{tf}: frame {i} ({fr['file_path']}) needs a finite 4x4 'transform_matrix'")
        m = np.eye(4)
        m[: len(fr["transform_matrix"])] = np.asarray(fr["transform_matrix"], dtype=np.float64)
        if np.linalg.norm(m[:3, 3]) < 1e-8:
            raise InputError(f"{tf}: frame {i} ({fr['file_path']}) has its camera at the origin (the subject)")
        image = folder / fr["file_path"]
        normal = None
        if fr.get(NORMAL_KEY) is not None:
            if not isinstance(fr[NORMAL_KEY], str):
                raise InputError(f"{tf}: frame {i} has a non-string {NORMAL_KEY!r}")
            normal = folder / fr[NORMAL_KEY]
        if check_images:
            _check_image(image, "image", tf)
            if normal is not None:
                _check_image(normal, "normal map", tf)
        frames.append(Frame(image, m, normal))
    prompt = data.get("prompt", "")
    if not isinstance(prompt, str):
        raise InputError(f"{tf}: 'prompt' must be a string; got {prompt!r}")
    if "up" in data:
        try:
            up = np.asarray(data["up"], dtype=np.float64)
        except (TypeError, ValueError):
            up = np.zeros(0)
        if up.shape != (3,) or not np.isfinite(up).all() or np.linalg.norm(up) < 1e-8:
            raise InputError(f"{tf}: 'up' must be a non-zero 3-vector; got {data['up']!r}")
    elif frames:
        # nerfstudio's "up" orientation: the mean of the cameras' up axes.
        up = np.mean([f.c2w[:3, 1] for f in frames], axis=0)
        if np.linalg.norm(up) < 1e-6:
            raise InputError(f"{tf}: the cameras' up vectors cancel out; give the world's up axis as 'up'")
    else:
        up = _MODEL_UP.copy()
    return Subject(folder, frames, prompt, up / np.linalg.norm(up))


def relative_camera_vectors(c2ws: list[np.ndarray], reference: np.ndarray, up: np.ndarray) -> np.ndarray:
    """float32 (N, 16): the model's camera vectors of ``c2ws`` with ``reference`` at azimuth 0.

    The rotation maps ``up`` to the model's up and the reference camera's horizontal direction
    to the azimuth-0 direction; translations are then normalised to unit length.
    """
    up = np.asarray(up, np.float64) / np.linalg.norm(up)
    r = reference[:3, 3]
    h = r - np.dot(r, up) * up
    if np.linalg.norm(h) < 1e-6 * max(np.linalg.norm(r), 1e-12):
        raise InputError("the reference camera looks straight down the up axis: its azimuth is undefined")
    h = h / np.linalg.norm(h)
    front_m = _MODEL_FRONT - np.dot(_MODEL_FRONT, _MODEL_UP) * _MODEL_UP
    front_m = front_m / np.linalg.norm(front_m)
    data_basis = np.stack([h, np.cross(up, h), up], axis=1)
    model_basis = np.stack([front_m, np.cross(_MODEL_UP, front_m), _MODEL_UP], axis=1)
    rot = model_basis @ data_basis.T
    out = []
    for m in c2ws:
        c = np.eye(4)
        c[:3, :3] = rot @ m[:3, :3]
        t = rot @ m[:3, 3]
        c[:3, 3] = t / np.linalg.norm(t)
        out.append(c.reshape(16))
    return np.asarray(out, dtype=np.float32)


def _subject_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise InputError(f"training data folder {root} does not exist or is not a folder")
    if (root / "transforms.json").is_file():
        return [root]
    subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subs:
        raise InputError(f"training data folder {root} is empty: expected subject folders with a transforms.json")
    return subs


def weights_fingerprint(folder: str | os.PathLike, extra: str = "") -> str:
    """A short content hash of a component's weight and config files (and ``extra``)."""
    from ..checkpoints import weight_files

    h = hashlib.sha256(extra.encode())
    folder = Path(folder)
    for f in [folder / "config.json", *weight_files(folder)]:
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def _file_stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _save_atomic(tensors: dict[str, np.ndarray], meta: dict[str, str], path: Path) -> None:
    from safetensors.numpy import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only dataset still trains; it is only encoded again next time
        import sys

        print(f"oxigaf: warning: cannot write the latent cache {path}: {exc}", file=sys.stderr)
        try:
            tmp.unlink()
        except OSError:
            pass


def _load_cache(path: Path, stamps: list[str]) -> dict[str, np.ndarray] | None:
    """The cached tensors when the file exists and was made from these exact files."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "numpy") as fh:
            meta = fh.metadata() or {}
            if json.loads(meta.get("stamps", "null")) != stamps:
                return None
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception:  # an unreadable cache is rebuilt, never trusted
        return None


class MultiViewDataset:
    """Subjects read from ``root`` (see the module docstring); samples of ``views`` targets plus a reference.

    Construction only parses and checks files (cheap, before any model is loaded): an empty
    folder, a missing or corrupt ``transforms.json``, a missing or unreadable image (named),
    and a subject with fewer than ``views`` frames are ``InputError``s. ``encode`` fills the
    latent / CLIP caches with a backend's models; ``sample`` draws one training sample's
    indices with a numpy Generator (so both backends see the same data).
    """

    def __init__(self, root: str | os.PathLike, views: int = 4, *, check_images: bool = True):
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise InputError(f"views must be a positive integer; got {views!r}")
        self.root = Path(root)
        self.views = views
        self.subjects = [read_subject(f, check_images=check_images) for f in _subject_folders(self.root)]
        for s in self.subjects:
            if len(s.frames) < views:
                raise InputError(
                    f"subject {s.folder} has {len(s.frames)} frame(s) in transforms.json; a sample needs at least "
                    f"{views} (the target views; the reference is one of its frames)"
                )
        self.latents: list[np.ndarray] = []
        self.normal_latents: list[np.ndarray] = []
        self.clip_states: list[np.ndarray] = []
        self.size: int | None = None

    def __len__(self) -> int:
        return len(self.subjects)

    def __getitem__(self, i: int) -> Subject:
        return self.subjects[i]

    @property
    def has_normals(self) -> bool:
        return all(s.has_normals for s in self.subjects)

    def require_normals(self) -> None:
        for s in self.subjects:
            for f in s.frames:
                if f.normal is None:
                    raise InputError(
                        f"the UNet takes normal maps (8 input channels) but frame {f.image.name} of {s.folder} "
                        f"has no {NORMAL_KEY!r} in transforms.json"
                    )

    # -- sampling --------------------------------------------------------------------------

    def sample(self, rng: np.random.Generator, reference: int | None = None) -> tuple[int, int, list[int]]:
        """(subject, reference frame, target frames): uniform subject, uniform reference among its
        frames (or frame ``reference`` of every subject), ``views`` distinct targets (in frame order)
        among its frames (the reference may be one, as the azimuth-0 view at inference)."""
        s = int(rng.integers(len(self.subjects)))
        n = len(self.subjects[s].frames)
        ref = int(rng.integers(n))
        if reference is not None:
            if not -n <= reference < n:
                raise InputError(f"reference frame {reference} does not exist in {self.subjects[s].folder} "
                                 f"({n} frames)")
            ref = reference % n
        targets = sorted(int(i) for i in rng.choice(n, size=self.views, replace=False))
        return s, ref, targets

    def cameras(self, s: int, ref: int, targets: list[int]) -> np.ndarray:
        sub = self.subjects[s]
        return relative_camera_vectors([sub.frames[i].c2w for i in targets], sub.frames[ref].c2w, sub.up)

    # -- encoding --------------------------------------------------------------------------

    def encode(self, backend, vae_folder, size: int, encoder_folder=None, preprocessor=None, *,
               normals: bool = False, progress: bool = True) -> None:
        """VAE-encode every frame (and normal map) at ``size`` px and run CLIP on every frame
        (``encoder_folder``: ImageDream), reading the caches where they are valid and writing them
        where not. The encoders are loaded only when some cache is missing or stale."""
        from ..conditioning import encode_image
        from ..denoise import progress_bar

        self.size = size
        vae_key = weights_fingerprint(vae_folder, f"size={size}")
        clip_key = None
        if encoder_folder is not None:
            clip_key = weights_fingerprint(encoder_folder, json.dumps(vars(preprocessor), default=str, sort_keys=True))
        models: dict = {}

        # the pipeline's image encoding, its two halves cached apart
        def vae_latents(paths):
            if "vae" not in models:
                models["vae"] = backend.load_vae(vae_folder, dtype="float32")
            return np.stack([encode_image(backend, p, vae=models["vae"], size=size)[1][0] for p in paths])

        def clip_states(paths):
            if "clip" not in models:
                models["clip"] = backend.load_image_encoder(encoder_folder, dtype="float32")
            states = [encode_image(backend, p, image_encoder=models["clip"], preprocessor=preprocessor)[0]
                      for p in paths]
            return np.stack([backend.to_numpy(hs).astype(np.float32)[0] for hs in states])

        def cached(path: Path, paths: list[Path], make, key: str) -> np.ndarray:
            stamps = [_file_stamp(p) for p in paths]
            found = _load_cache(path, stamps)
            if found is None:
                found = {key: make(paths)}
                _save_atomic(found, {"stamps": json.dumps(stamps), "size": str(size)}, path)
            return found[key]

        self.latents, self.normal_latents, self.clip_states = [], [], []
        for sub in progress_bar(self.subjects, "encoding data", progress, len(self.subjects)):
            images = [f.image for f in sub.frames]
            cache = sub.folder / CACHE_DIR
            self.latents.append(cached(cache / f"latents-{vae_key}.safetensors", images, vae_latents, "latents"))
            if normals:
                self.normal_latents.append(cached(cache / f"normals-{vae_key}.safetensors",
                                                  [f.normal for f in sub.frames], vae_latents, "latents"))
            if encoder_folder is not None:
                self.clip_states.append(cached(cache / f"clip-{clip_key}.safetensors", images, clip_states, "states"))
        models.clear()


def azimuth_of(vector: np.ndarray) -> float:
    """Public azimuth (degrees) of a model camera vector (for checks and docs)."""
    m = np.asarray(vector, np.float64).reshape(4, 4)
    p = m[:3, 3]
    return math.degrees(math.atan2(p[1], p[0])) % 360.0
