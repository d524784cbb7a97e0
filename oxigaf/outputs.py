"""What a generation gives back: ``MultiViewOutput``, its atomic ``save`` and its run record.

The run record (``oxigaf.json`` beside the views) holds everything that decided the views: the
resolved ``DiffusionConfig``, the model and upsampler (path, hub id and revision, a SHA-256 of
every weight file), the backend, device and dtype, the seed, the cameras, the prompts, the input
image (its path and SHA-256; the folder keeps the decoded photo as ``input.png``) and oxigaf's
version. ``oxigaf generate --replay FOLDER/oxigaf.json`` runs the same generation again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cameras import CameraParams, as_cameras, cameras_json, transforms_json
from .checkpoints import weight_files
from .config import DiffusionConfig
from .errors import ConfigError, InputError, OxigafError
from .images import load_image, make_grid

RECORD_NAME = "oxigaf.json"
INPUT_NAME = "input.png"
# The record's layout version: a reader refuses a record of a newer format than it knows.
RECORD_FORMAT = 1
RECORD_KEYS = ("format", "config", "model", "upsampler", "backend", "seed", "cameras", "prompt",
               "negative_prompt", "image")


@dataclass
class MultiViewOutput:
    """What one input image (or prompt) gave.

    ``views`` PIL images; ``images`` float32 (V, H, W, 3) in [0, 1]; ``latents`` float32
    (V, 4, h, w) scaled latents before upsampling; ``cameras`` the views' poses; ``timings``
    seconds per stage; ``memory`` peak bytes (backend counters, and the process's peak RSS).
    """

    views: list
    images: np.ndarray
    latents: np.ndarray
    cameras: list[CameraParams]
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, int | None] = field(default_factory=dict)
    record: dict | None = None

    def grid(self, cols: int | None = None):
        return make_grid(self.views, cols=cols)

    def save(self, folder: str | os.PathLike, *, overwrite: bool = False, fov_deg: float | None = None) -> Path:
        """Write ``view_00.png``…, ``grid.png``, ``cameras.json`` and ``transforms.json``; with a
        ``record`` (``run_record``) also ``oxigaf.json`` and the input photo as ``input.png``.

        Everything is written into a temporary folder beside ``folder`` and renamed into place
        at the end, so a failure never leaves half-written files, and a failed overwrite leaves
        the previous output in place. An existing non-empty folder is an error unless
        ``overwrite=True``; a file-system failure is an ``InputError`` naming the folder.
        """
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise InputError(f"output path {folder} exists and is not a folder")
        if folder.is_dir() and any(folder.iterdir()) and not overwrite:
            raise InputError(f"output folder {folder} is not empty; pass overwrite=True (CLI: --overwrite)")
        kwargs = {} if fov_deg is None else {"fov_deg": fov_deg}
        size = int(self.images.shape[1])
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        except OSError as exc:
            raise InputError(f"cannot create the output folder {folder}: {exc}") from exc
        old = None
        try:
            for i, view in enumerate(self.views):
                view.save(tmp / f"view_{i:02d}.png")
            self.grid().save(tmp / "grid.png")
            (tmp / "cameras.json").write_text(json.dumps(cameras_json(self.cameras, size, **kwargs), indent=2))
            (tmp / "transforms.json").write_text(json.dumps(transforms_json(self.cameras, size, **kwargs), indent=2))
            if self.record is not None:
                record = dict(self.record)
                if record.get("size") is None:
                    record["size"] = size
                (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
                if isinstance(self.record, RunRecord) and self.record.input_png is not None:
                    (tmp / INPUT_NAME).write_bytes(self.record.input_png)
            if folder.exists():
                old = tmp.with_name(tmp.name + "-old")
                folder.rename(old)
            tmp.rename(folder)
        except BaseException as exc:
            if old is not None and old.exists() and not folder.exists():
                try:
                    old.rename(folder)  # the swap failed: put the previous output back
                except OSError:
                    pass
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise InputError(f"cannot write the output folder {folder}: {exc}") from exc
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return folder


# --------------------------------------------------------------------------- the run record


class RunRecord(dict):
    """The JSON of ``oxigaf.json``, carrying the input photo's PNG bytes for ``input.png`` beside it."""

    input_png: bytes | None = None


_HASHES: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()
_HUB_BLOB = re.compile(r"[0-9a-f]{64}")
_HUB_SNAPSHOT = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<revision>[^/]+)$")


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, computed once per (path, size, mtime) in this process.

    A Hugging Face cache file that links to ``blobs/<64 hex digits>`` is named by its SHA-256
    (the hub's LFS object id), so a hub checkpoint is never read to be hashed.
    """
    real = Path(path).resolve()
    stat = real.stat()
    key = (str(real), stat.st_size, stat.st_mtime_ns)
    with _HASH_LOCK:
        hit = _HASHES.get(key)
    if hit is not None:
        return hit
    if real.parent.name == "blobs" and _HUB_BLOB.fullmatch(real.name):
        digest = real.name
    else:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        digest = h.hexdigest()
    with _HASH_LOCK:
        _HASHES[key] = digest
    return digest


def model_record(folder: str | os.PathLike) -> dict[str, Any]:
    """A model folder: its path, hub id and revision when it is a hub snapshot, and the SHA-256 of
    every component's weight files (``{"unet/diffusion_pytorch_model.safetensors": hex, ...}``)."""
    folder = Path(folder)
    hub = _HUB_SNAPSHOT.search(folder.resolve().as_posix()) or _HUB_SNAPSHOT.search(folder.as_posix())
    files = {}
    for part in sorted(p for p in folder.iterdir() if p.is_dir()):
        if any(part.glob("*.safetensors")) or any(part.glob("*.safetensors.index.json")):
            for f in weight_files(part):
                files[f"{part.name}/{f.name}"] = file_sha256(f)
    return {"path": str(folder.absolute()),
            "hub_id": f"{hub['owner']}/{hub['name']}" if hub else None,
            "revision": hub["revision"] if hub else None,
            "files": files}


def _upsampler_record(upsampler) -> dict[str, Any] | None:
    from .upsampler import BilinearUpsampler, LatentUpsampler

    if upsampler is None:
        return None
    if isinstance(upsampler, BilinearUpsampler):
        return {"kind": "bilinear"}
    if isinstance(upsampler, LatentUpsampler) and upsampler.source is not None:
        return {"kind": "latent", **model_record(upsampler.source)}
    return {"kind": type(upsampler).__name__}


def _lora_record(lora) -> dict[str, Any] | None:
    """A merged LoRA adapter: its rank, alpha and a SHA-256 over its tensors (names, shapes, values)."""
    if lora is None:
        return None
    h = hashlib.sha256()
    for name in sorted(lora.tensors):
        arr = np.ascontiguousarray(lora.tensors[name], np.float32)
        h.update(f"{name}{arr.shape}".encode())
        h.update(arr.tobytes())
    return {"rank": lora.rank, "alpha": lora.alpha, "sha256": h.hexdigest()}


def _image_record(image, decoded=None) -> tuple[dict[str, Any] | None, bytes | None]:
    """The input photo: its path (when given as one) and SHA-256, and the PNG of the decoded photo
    that the pipeline conditions on (``input.png``), so a replay needs neither the original file
    nor its decoder. ``decoded`` is that photo where the caller has already loaded it. A
    precomputed ``Conditioning`` has no photo to keep."""
    if image is None:
        return None, None
    path = None
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).absolute()
    elif not isinstance(image, np.ndarray) and type(image).__module__.split(".")[0] != "PIL":
        return {"path": None, "sha256": None, "given": type(image).__name__}, None
    buf = io.BytesIO()
    (load_image(image) if decoded is None else decoded).save(buf, format="PNG")
    png = buf.getvalue()
    png_sha = hashlib.sha256(png).hexdigest()
    return {"path": str(path) if path else None, "sha256": file_sha256(path) if path else png_sha,
            "copy": INPUT_NAME, "copy_sha256": png_sha}, png


def run_record(pipe, *, config: DiffusionConfig, seed: int, cameras, prompt: str, negative_prompt: str,
               image, decoded=None, size: int | None = None, latents=None) -> RunRecord:
    """What ``pipe`` was asked to make one output: the record ``save`` writes as ``oxigaf.json``.

    ``config`` is the call's resolved config (per-call overrides applied); ``seed`` the item's own
    seed; ``image`` the input as the caller gave it (a path, a PIL image, an array, or None) and
    ``decoded`` the photo ``load_image`` made of it, where the caller has it (not decoded again);
    ``latents`` the item's initial noise when the caller gave it instead of the seed drawing it
    (recorded by its SHA-256: such a run cannot be replayed from the record alone).
    """
    from . import __version__

    cams = as_cameras(cameras)
    backend = pipe.backend
    img, png = _image_record(image, decoded)
    record = RunRecord(
        format=RECORD_FORMAT,
        oxigaf=__version__,
        config=config.replace(seed=int(seed), num_views=len(cams)).to_dict(),
        model=model_record(pipe.model_path),
        upsampler=_upsampler_record(pipe.upsampler),
        lora=_lora_record(pipe.lora),
        backend=backend.name,
        device=str(backend.device),
        dtype=config.dtype,
        versions={str(k): str(v) for k, v in backend.versions().items()},
        seed=int(seed),
        cameras=[{"azimuth": float(c.azimuth), "elevation": float(c.elevation), "distance": float(c.distance)}
                 for c in cams],
        prompt=prompt,
        negative_prompt=negative_prompt,
        image=img,
        size=size,
    )
    if latents is not None:
        record["latents_sha256"] = hashlib.sha256(np.ascontiguousarray(latents, np.float32).tobytes()).hexdigest()
    record.input_png = png
    return record


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``oxigaf.json``: a missing or garbled file, or one of a newer format, is an
    ``InputError`` naming it. The ``config`` comes back as a ``DiffusionConfig``."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_NAME
    if not path.is_file():
        raise InputError(f"run record not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"run record {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("format"), int) or isinstance(data["format"], bool):
        raise InputError(f"{path} is not an oxigaf run record (no integer 'format')")
    if data["format"] > RECORD_FORMAT:
        raise InputError(f"run record {path} has format {data['format']}, newer than this oxigaf reads "
                         f"({RECORD_FORMAT}): it was written by oxigaf {data.get('oxigaf', '?')}; upgrade oxigaf")
    missing = [k for k in RECORD_KEYS if k not in data]
    if missing:
        raise InputError(f"run record {path} lacks {', '.join(missing)}")
    try:
        data["config"] = DiffusionConfig.from_dict(data["config"])
    except ConfigError as exc:
        raise InputError(f"run record {path}: {exc}") from exc
    model = data["model"]
    if not isinstance(model, dict) or not (model.get("path") or model.get("hub_id")):
        raise InputError(f"run record {path}: 'model' must name a path or a hub id")
    try:
        data["cameras"] = as_cameras(data["cameras"])
    except OxigafError as exc:
        raise InputError(f"run record {path}: {exc}") from exc
    for key in ("prompt", "negative_prompt"):
        if not isinstance(data[key], str):
            raise InputError(f"run record {path}: {key} must be a string")
    if not isinstance(data["seed"], int) or isinstance(data["seed"], bool) or data["seed"] < 0:
        raise InputError(f"run record {path}: seed must be a non-negative integer")
    data["folder"] = str(path.parent)
    return data


def record_image(record: dict[str, Any]) -> Path | None:
    """Where the recorded input photo is (None for a text-only run): the record folder's ``input.png``
    when its SHA-256 matches, else the original path when its SHA-256 matches."""
    img = record.get("image")
    if img is None:
        return None
    if not isinstance(img, dict) or img.get("given"):
        what = img.get("given") if isinstance(img, dict) else img
        raise InputError(f"the recorded run was given a {what}, not a photo: pass the input image beside --replay")
    copy = Path(record["folder"]) / str(img.get("copy") or INPUT_NAME)
    if copy.is_file() and file_sha256(copy) == img.get("copy_sha256"):
        return copy
    path = img.get("path")
    if path and Path(path).is_file() and file_sha256(path) == img.get("sha256"):
        return Path(path)
    raise InputError(f"the recorded input photo is gone or changed: neither {copy} nor {path} has the recorded "
                     "SHA-256; pass the input image beside --replay")


__all__ = ["MultiViewOutput", "RunRecord", "file_sha256", "model_record", "read_record", "record_image",
           "run_record"]
