"""What a generation gives back: ``MultiViewOutput``, and its atomic ``save``."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cameras import CameraParams, cameras_json, transforms_json
from .errors import InputError
from .images import make_grid


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

    def grid(self, cols: int | None = None):
        return make_grid(self.views, cols=cols)

    def save(self, folder: str | os.PathLike, *, overwrite: bool = False, fov_deg: float | None = None) -> Path:
        """Write ``view_00.png``…, ``grid.png``, ``cameras.json`` and ``transforms.json``.

        Everything is written into a temporary folder beside ``folder`` and renamed into place
        at the end, so a failure never leaves half-written files, and a failed overwrite leaves
        the previous output in place. An existing non-empty folder is an error unless
        ``overwrite=True``; a file-system failure is an ``InputError`` naming the folder.
        """
        import json

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


__all__ = ["MultiViewOutput"]
