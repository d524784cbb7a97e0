"""One chunk of a batch: the ``generate`` call (or calls) an engine makes for a group of items,
and the result record of each item. Both engines run chunks with ``run_chunk``, so they make
the same calls and write the same views."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import OxigafError
from ..outputs import INPUT_NAME, RECORD_NAME
from .settings import BatchItem, BatchSettings, settings_hash


def expected_files(num_views: int) -> list[str]:
    """The files ``MultiViewOutput.save()`` writes for an item of ``num_views`` views: the views, the
    grid, the camera files, the run record ``oxigaf.json`` and the input photo ``input.png``."""
    return [f"view_{i:02d}.png" for i in range(num_views)] + ["grid.png", "cameras.json", "transforms.json",
                                                              RECORD_NAME, INPUT_NAME]


def output_complete(folder: Path, num_views: int) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in expected_files(num_views))


def run_chunk(pipe, chunk: list[BatchItem], settings: BatchSettings, out: Path) -> Iterator[dict]:
    """Generate and save one chunk, yielding a result record per item as soon as it is saved.

    Photos are read first, so a bad file fails alone; the rest go through ``generate`` as one
    batch, and if that batch fails (NaN, out of memory…), item by item.
    """
    from ..images import load_image

    loaded = []
    for item in chunk:
        t0 = time.perf_counter()
        try:
            load_image(item.image)
            loaded.append((item, time.perf_counter() - t0))
        except Exception as exc:
            yield _record(item, settings, "error", time.perf_counter() - t0, None, _error_text(item, exc))
    for run in _consecutive(loaded):
        outputs = None
        if len(run) > 1:
            t0 = time.perf_counter()
            try:
                outputs = _generate(pipe, [item for item, _ in run], settings)
                share = (time.perf_counter() - t0) / len(run)
            except Exception:
                outputs = None  # one item spoilt the batch: find out which, one at a time
        if outputs is not None:
            for (item, load_s), output in zip(run, outputs, strict=True):
                yield _save(item, output, settings, out, load_s + share)
            continue
        for item, load_s in run:
            t0 = time.perf_counter()
            try:
                (output,) = _generate(pipe, [item], settings)
            except Exception as exc:
                yield _record(item, settings, "error", load_s + time.perf_counter() - t0, None, _error_text(item, exc))
                continue
            yield _save(item, output, settings, out, load_s + time.perf_counter() - t0)


def _consecutive(loaded: list) -> list[list]:
    """Split after dropped items, so every run still has consecutive seeds."""
    runs: list[list] = []
    for entry in loaded:
        if runs and entry[0].seed == runs[-1][-1][0].seed + 1:
            runs[-1].append(entry)
        else:
            runs.append([entry])
    return runs


def _generate(pipe, items: list[BatchItem], settings: BatchSettings) -> list:
    """One ``generate`` call for ``items`` (one prompt, one set of cameras, seeds s, s+1, …).

    The photos go in as paths, so each output's run record names its item's file; every other
    generation setting is the config the pipeline was loaded with (``settings.config``).
    """
    from ..cameras import as_cameras

    first = items[0]
    cameras = as_cameras(list(first.azimuths), elevation=first.elevation) if first.azimuths else None
    return pipe.generate([item.image for item in items], cameras=cameras, prompt=first.prompt,
                         negative_prompt=settings.negative_prompt, elevation=first.elevation, seed=first.seed,
                         output_size=settings.size, progress=False)


def record_mismatch(item: BatchItem, record: dict | None) -> str | None:
    """What in an output's run record does not belong to ``item`` (None: it all does, or no record).

    Item i of a batched call must be recorded as that item alone: its own seed, prompt, cameras
    and photo; a record of another item would make ``--replay`` of this folder draw other views.
    """
    if record is None:
        return None
    image = record.get("image") or {}
    wrong = []
    if record.get("seed") != item.seed:
        wrong.append(f"seed {record.get('seed')!r} (the item's is {item.seed})")
    if record.get("prompt") != item.prompt:
        wrong.append(f"prompt {record.get('prompt')!r}")
    if image.get("path") != str(Path(item.image).absolute()):
        wrong.append(f"image {image.get('path')!r}")
    cams = record.get("cameras") or []
    if item.azimuths and [c.get("azimuth") for c in cams] != list(item.azimuths):
        wrong.append(f"azimuths {[c.get('azimuth') for c in cams]}")
    if any(c.get("elevation") != item.elevation for c in cams):
        wrong.append(f"elevation {[c.get('elevation') for c in cams]}")
    return "; ".join(wrong) or None


def _error_text(item: BatchItem, exc: BaseException) -> str:
    message = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, OxigafError):
        message = f"{type(exc).__name__}: {message}"
    # Every error names the item's file, whatever stage raised it.
    return message if item.image in message else f"{item.image}: {message}"


def _record(item: BatchItem, settings: BatchSettings, status: str, seconds: float, output: Path | None,
            error: str | None) -> dict:
    return {"id": item.id, "status": status, "error": error, "seconds": round(seconds, 4),
            "output": str(output) if output is not None else None, "settings_hash": settings_hash(settings, item),
            "image": item.image, "seed": item.seed, "finished": round(time.time(), 3)}


def _save(item: BatchItem, output, settings: BatchSettings, out: Path, seconds: float) -> dict:
    folder = out / item.id
    t0 = time.perf_counter()
    wrong = record_mismatch(item, output.record)
    if wrong is not None:
        return _record(item, settings, "error", seconds, None,
                       f"{item.image}: the run record does not match the item: {wrong}")
    try:
        output.save(folder, overwrite=True)  # atomic: a temporary folder renamed into place
    except Exception as exc:
        return _record(item, settings, "error", seconds + time.perf_counter() - t0, None, _error_text(item, exc))
    return _record(item, settings, "ok", seconds + time.perf_counter() - t0, folder, None)
