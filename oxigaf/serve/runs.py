"""Where ``oxigaf serve`` keeps what each request made: one folder per request under ``ROOT/runs``.

A request's folder holds ``oxigaf/`` (exactly what ``MultiViewOutput.save`` writes), the
turntable ``turntable.gif`` and ``oxigaf-<id>.zip`` (that folder zipped). It is built under a
hidden temporary name and renamed into place when complete, so a half-written request is never
served; the oldest folders beyond ``keep`` are removed after each new one. Nothing here imports
Gradio.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, InputError

OUTPUT_NAME = "oxigaf"
TURNTABLE_NAME = "turntable.gif"
# Each view shows this long in the turntable: four views go round in a second and a half.
TURNTABLE_FRAME_MS = 400
TURNTABLE_MIN_SIDE = 256
# A hidden temporary folder this old belongs to no running request (a crash left it).
STALE_TMP_S = 3600


@dataclass(frozen=True)
class Run:
    """One request's finished folder and the files the page shows."""

    id: str
    folder: Path
    output: Path
    views: list[Path]
    turntable: Path
    zip: Path


def turntable(views, cameras, path: Path) -> Path:
    """An endlessly looping GIF of ``views`` in order of azimuth (0 to 360 degrees), enlarged by a
    whole factor (nearest neighbour) to at least ``TURNTABLE_MIN_SIDE`` pixels so small views show."""
    from PIL import Image

    order = sorted(range(len(views)), key=lambda i: (float(cameras[i].azimuth) % 360.0, i))
    frames = [views[i].convert("RGB") for i in order]
    scale = -(-TURNTABLE_MIN_SIDE // max(frames[0].size))
    if scale > 1:
        frames = [f.resize((f.width * scale, f.height * scale), Image.Resampling.NEAREST) for f in frames]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=TURNTABLE_FRAME_MS,
                   loop=0, disposal=1)
    return path


def zip_folder(folder: Path, path: Path, arc_root: str) -> Path:
    """``folder``'s files (recursively, sorted) into ``path`` under the top-level folder ``arc_root``."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            zf.write(f, f"{arc_root}/{f.relative_to(folder).as_posix()}")
    return path


class RunStore:
    """The request folders under ``root / "runs"``, the newest ``keep`` of them kept."""

    def __init__(self, root, keep: int = 20):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"keep must be an integer >= 1; got {keep!r}")
        self.root = Path(root).absolute()
        self.runs = self.root / "runs"
        self.keep = keep
        self._lock = threading.Lock()
        self._count = 0
        try:
            self.runs.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create the output folder {self.runs}: {exc}") from exc

    def new_id(self) -> str:
        """Sorts in creation order (the time to the second, then this store's count), unique by its
        random tail."""
        with self._lock:
            self._count += 1
            count = self._count
        return f"{time.strftime('%Y%m%d-%H%M%S')}-{count:06d}-{secrets.token_hex(4)}"

    def write(self, result) -> Run:
        """Save ``result`` (a ``MultiViewOutput``), its turntable and its zip as a new request folder."""
        run_id = self.new_id()
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{run_id}.", dir=self.runs))
        except OSError as exc:
            raise InputError(f"cannot write under {self.runs}: {exc}") from exc
        try:
            result.save(tmp / OUTPUT_NAME)
            turntable(result.views, result.cameras, tmp / TURNTABLE_NAME)
            zip_folder(tmp / OUTPUT_NAME, tmp / f"oxigaf-{run_id}.zip", f"oxigaf-{run_id}")
            folder = self.runs / run_id
            tmp.rename(folder)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise InputError(f"cannot write the request folder under {self.runs}: {exc}") from exc
            raise
        self.clean()
        out = folder / OUTPUT_NAME
        return Run(run_id, folder, out, [out / f"view_{i:02d}.png" for i in range(len(result.views))],
                   folder / TURNTABLE_NAME, folder / f"oxigaf-{run_id}.zip")

    def finished(self) -> list[Path]:
        """The finished request folders, oldest first."""
        return sorted(p for p in self.runs.iterdir() if p.is_dir() and not p.name.startswith("."))

    def clean(self) -> None:
        """Remove all but the newest ``keep`` request folders, and temporary ones left by a crash."""
        with self._lock:
            for old in self.finished()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            now = time.time()
            for p in self.runs.iterdir():
                try:
                    stale = p.name.startswith(".") and now - p.stat().st_mtime > STALE_TMP_S
                except OSError:
                    continue
                if stale:
                    shutil.rmtree(p, ignore_errors=True)


__all__ = ["OUTPUT_NAME", "Run", "RunStore", "TURNTABLE_NAME", "turntable", "zip_folder"]
