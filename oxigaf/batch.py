"""Batch runs: a manifest of photos in, ``OUT/<id>/`` per item and ``OUT/results.jsonl`` out.

A manifest is a CSV, JSON Lines or Parquet table with at least ``id`` and ``image`` (a path,
relative to the manifest's folder) and optional per-row ``seed``, ``prompt``, ``azimuths`` and
``elevation``; or a folder of images (id = file stem). Each item is written with
``MultiViewOutput.save()`` (a temporary folder renamed into place), then one line is appended
to ``results.jsonl`` and flushed, so an interrupted run loses no finished item.

Resume: an item is skipped when its last line in ``results.jsonl`` is ``ok``, its settings hash
matches and its folder is complete; everything else (failed, changed, missing) runs again.

Seeds: a row without ``seed`` gets ``seed + row index`` (0-based), so rows draw different
noise. Consecutive rows with consecutive seeds and the same prompt and cameras share one
``generate`` call (``--batch-size`` items per UNet call): item i of a batch is, by the
pipeline's contract, the run of that item alone with ``seed + i``. The grouping into calls is
decided here, once, so both engines make exactly the same calls and write the same views.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .config import DiffusionConfig
from .errors import ConfigError, InputError, OxigafError

RESULTS_NAME = "results.jsonl"
ENGINES = ("local", "ray")
TABLE_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
REQUIRED_COLUMNS = ("id", "image")
# What changes the views; the engine, workers, batch size, backend and device do not.
HASHED_SETTINGS = ("model", "upsampler", "dtype", "steps", "guidance", "negative_prompt", "size", "attention")


@dataclass(frozen=True)
class BatchSettings:
    """The generation options of ``oxigaf generate``, shared by every item of a batch.

    ``seed``, ``prompt``, ``azimuths`` and ``elevation`` are the defaults of rows that do not
    set them. Plain data, so it travels to Ray workers as a dict.
    """

    model: str
    upsampler: str | None = None
    backend: str = "auto"
    device: str | None = None
    dtype: str = "float32"
    views: int = 4
    azimuths: tuple[float, ...] | None = None
    elevation: float = 0.0
    steps: int = 50
    guidance: float = 5.0
    seed: int = 0
    prompt: str = ""
    negative_prompt: str = ""
    size: int | None = None
    attention: str = "auto"
    low_memory: bool = False

    def __post_init__(self):
        if self.azimuths is not None:
            object.__setattr__(self, "azimuths", tuple(float(a) for a in self.azimuths))
        self.config()  # validates every value now, before a manifest is read or a worker started

    def config(self) -> DiffusionConfig:
        views = len(self.azimuths) if self.azimuths else self.views
        return DiffusionConfig(num_views=views, num_inference_steps=self.steps, guidance_scale=self.guidance,
                               dtype=self.dtype, attention=self.attention, elevation=self.elevation, seed=self.seed,
                               low_memory=self.low_memory)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BatchSettings:
        return cls(**data)

    def load_pipeline(self):
        from .pipeline import Pipeline

        return Pipeline.from_pretrained(self.model, backend=self.backend, device=self.device,
                                        upsampler=self.upsampler, config=self.config())


@dataclass(frozen=True)
class BatchItem:
    """One manifest row, resolved: ``image`` is the path to read, ``source`` as the manifest wrote it."""

    id: str
    image: str
    source: str
    seed: int
    prompt: str
    azimuths: tuple[float, ...] | None
    elevation: float
    row: int

    @property
    def num_views(self) -> int | None:
        return len(self.azimuths) if self.azimuths else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BatchItem:
        data = dict(data)
        if data.get("azimuths") is not None:
            data["azimuths"] = tuple(data["azimuths"])
        return cls(**data)


@dataclass
class BatchSummary:
    """What a run did: ``ok`` and ``failed`` count this run's items, ``skipped`` those already done."""

    total: int
    ok: int
    failed: int
    skipped: int
    results: Path
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


# -- manifest --------------------------------------------------------------------------------


def read_manifest(manifest: str | os.PathLike, settings: BatchSettings | None = None) -> list[BatchItem]:
    """Read and check a manifest; every problem is an ``InputError`` naming the manifest.

    Checked here, before any model is loaded: the file exists and parses, ``id`` and ``image``
    columns exist, ids are unique and usable as folder names, optional values are well formed.
    Image files are not opened: a missing or corrupt photo is that item's error, not the batch's.
    """
    settings = settings or BatchSettings(model="")
    path = Path(os.path.expanduser(os.fspath(manifest)))
    if not path.exists():
        raise InputError(f"manifest {path} does not exist")
    if path.is_dir():
        rows, where = _folder_rows(path), _folder_where
        base = path
    else:
        suffix = path.suffix.lower()
        readers = {".csv": _csv_rows, ".jsonl": _jsonl_rows, ".ndjson": _jsonl_rows, ".parquet": _parquet_rows}
        if suffix not in readers:
            raise InputError(
                f"manifest {path}: unknown format {path.suffix or '(no suffix)'!r}; expected "
                f"{', '.join(TABLE_SUFFIXES)} or a folder of images"
            )
        rows, where = readers[suffix](path), (_row_where if suffix == ".parquet" else _line_where)
        base = path.parent
    items: list[BatchItem] = []
    seen: dict[str, str] = {}
    for index, (position, row) in enumerate(rows):
        at = f"manifest {path} {where(position)}"
        item = _item(row, index, base, settings, at)
        if item.id in seen:
            raise InputError(f"manifest {path}: duplicate id {item.id!r} ({seen[item.id]} and {where(position)})")
        seen[item.id] = where(position)
        items.append(item)
    if not items:
        raise InputError(f"manifest folder {path} has no images" if path.is_dir() else f"manifest {path} has no rows")
    return items


def _line_where(n: int) -> str:
    return f"line {n}"


def _row_where(n: int) -> str:
    return f"row {n}"


def _folder_where(name) -> str:
    return f"file {name}"


def _folder_rows(folder: Path) -> list[tuple[str, dict]]:
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p.name, {"id": p.stem, "image": p.name}) for p in files]


def _check_columns(path: Path, columns: Iterable) -> None:
    columns = [c for c in columns if c is not None]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        have = ", ".join(map(str, columns)) or "none"
        raise InputError(f"manifest {path} has no {' or '.join(repr(c) for c in missing)} column (columns: {have})")


def _csv_rows(path: Path) -> list[tuple[int, dict]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, strict=True)
            header = next(reader, None)
            if header is None:
                raise InputError(f"manifest {path} is empty (expected a header row with id and image)")
            header = [h.strip() for h in header]
            _check_columns(path, header)
            rows = []
            for values in reader:
                if not values or all(not v.strip() for v in values):
                    continue  # blank lines
                if len(values) != len(header):
                    raise InputError(f"manifest {path} line {reader.line_num}: {len(values)} fields where the "
                                     f"header has {len(header)}")
                rows.append((reader.line_num, dict(zip(header, values, strict=True))))
            return rows
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"manifest {path} cannot be parsed as CSV: {exc}") from exc
    except OSError as exc:
        raise InputError(f"cannot read manifest {path}: {exc}") from exc


def _jsonl_rows(path: Path) -> list[tuple[int, dict]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"manifest {path} cannot be parsed as JSON Lines: {exc}") from exc
    except OSError as exc:
        raise InputError(f"cannot read manifest {path}: {exc}") from exc
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"manifest {path} line {n} cannot be parsed as JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise InputError(f"manifest {path} line {n} is a JSON {type(row).__name__}, not an object")
        rows.append((n, row))
    if rows:
        _check_columns(path, set().union(*(row for _, row in rows)))
    return rows


def _parquet_rows(path: Path) -> list[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InputError(f"manifest {path}: reading Parquet needs pyarrow (pip install pyarrow, or 'oxigaf[ray]')"
                         ) from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError...: all mean "not a Parquet file we can read"
        raise InputError(f"manifest {path} cannot be parsed as Parquet: {exc}") from exc
    _check_columns(path, table.column_names)
    return list(enumerate(table.to_pylist(), start=1))


def _missing(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and math.isnan(value))


def _item(row: dict, index: int, base: Path, settings: BatchSettings, at: str) -> BatchItem:
    for column in REQUIRED_COLUMNS:
        if column not in row or _missing(row[column]):
            raise InputError(f"{at}: no {column!r}")
    item_id = _id(row["id"], at)
    source = row["image"]
    if not isinstance(source, str):
        raise InputError(f"{at}: image must be a path; got {source!r}")
    source = source.strip()
    image = Path(os.path.expanduser(source))
    image = image if image.is_absolute() else base / image
    seed = settings.seed + index if _missing(row.get("seed")) else _seed(row["seed"], at)
    prompt = settings.prompt if _missing(row.get("prompt")) else row["prompt"]
    if not isinstance(prompt, str):
        raise InputError(f"{at}: prompt must be text; got {prompt!r}")
    azimuths = settings.azimuths if _missing(row.get("azimuths")) else _azimuths(row["azimuths"], at)
    elevation = settings.elevation if _missing(row.get("elevation")) else _number(row["elevation"], "elevation", at)
    if not -90.0 < elevation < 90.0:
        raise InputError(f"{at}: elevation must lie strictly between -90 and 90 degrees; got {elevation!r}")
    return BatchItem(item_id, str(image), source, seed, prompt, azimuths, elevation, index)


_BAD_ID = re.compile(r"[/\\\x00-\x1f]")


def _id(value, at: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"{at}: id must be text or an integer; got {value!r}")
    item_id = str(value).strip()
    # The id names the item's folder under OUT: it must be one plain, visible path component.
    if _BAD_ID.search(item_id) or item_id.startswith(".") or item_id == RESULTS_NAME:
        raise InputError(f"{at}: id {item_id!r} cannot name a folder (no slashes, no leading dot, "
                         f"not {RESULTS_NAME!r})")
    return item_id


def _seed(value, at: str) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError
            value = int(value)
        seed = int(value.strip()) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise InputError(f"{at}: seed must be a non-negative integer; got {value!r}") from None
    if seed < 0:
        raise InputError(f"{at}: seed must be a non-negative integer; got {value!r}")
    return seed


def _number(value, name: str, at: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise InputError(f"{at}: {name} must be a number; got {value!r}") from None
    if not math.isfinite(number):
        raise InputError(f"{at}: {name} must be finite; got {value!r}")
    return number


def _azimuths(value, at: str) -> tuple[float, ...]:
    """A list of numbers, or text like ``0,90,180,270`` / ``[0, 90]`` (CSV cells)."""
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,;\s]+", value.strip().strip("[]")) if p]
    elif hasattr(value, "__iter__"):
        parts = list(value)
    else:
        parts = [value]
    if not parts:
        raise InputError(f"{at}: azimuths is empty; got {value!r}")
    return tuple(_number(p, "azimuths", at) for p in parts)


# -- settings hash, previous results, completeness ----------------------------------------------


def settings_hash(settings: BatchSettings, item: BatchItem) -> str:
    """sha256 (16 hex digits) of everything that decides an item's views."""
    num_views = item.num_views or len(settings.azimuths or ()) or settings.views
    data = {name: getattr(settings, name) for name in HASHED_SETTINGS}
    data.update(image=item.source, seed=item.seed, prompt=item.prompt, elevation=item.elevation,
                azimuths=list(item.azimuths) if item.azimuths else None, views=num_views)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_results(path: str | os.PathLike) -> dict[str, dict]:
    """The last record per id of a ``results.jsonl``; a torn last line (a killed run) is ignored."""
    path = Path(path)
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                records[record["id"]] = record
    return records


def expected_files(num_views: int) -> list[str]:
    """The files ``MultiViewOutput.save()`` writes for ``num_views`` views."""
    return [f"view_{i:02d}.png" for i in range(num_views)] + ["grid.png", "cameras.json", "transforms.json"]


def output_complete(folder: Path, num_views: int) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in expected_files(num_views))


def _item_views(settings: BatchSettings, item: BatchItem) -> int:
    return item.num_views or len(settings.azimuths or ()) or settings.views


def _clean_stale(out: Path, ids: Iterable[str]) -> None:
    """Remove temporary folders a killed run left (``save()`` names them ``.<id>.<random>``)."""
    for item_id in ids:
        for tmp in out.glob(f".{glob_escape(item_id)}.*"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


# -- running items -----------------------------------------------------------------------------


def make_chunks(items: list[BatchItem], batch_size: int) -> list[list[BatchItem]]:
    """Group items, in manifest order, into ``generate`` calls of up to ``batch_size``.

    A call takes one prompt, one set of cameras and seeds ``s, s+1, …``, so a chunk only grows
    while those hold.
    """
    chunks: list[list[BatchItem]] = []
    for item in items:
        last = chunks[-1] if chunks else None
        if (last and len(last) < batch_size and item.seed == last[-1].seed + 1
                and _call_key(item) == _call_key(last[-1])):
            last.append(item)
        else:
            chunks.append([item])
    return chunks


def _call_key(item: BatchItem):
    return item.prompt, item.azimuths, item.elevation


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


def run_chunk(pipe, chunk: list[BatchItem], settings: BatchSettings, out: Path) -> Iterator[dict]:
    """Generate and save one chunk, yielding a result record per item as soon as it is saved.

    Photos are read first, so a bad file fails alone; the rest go through ``generate`` as one
    batch, and if that batch fails (NaN, out of memory…), item by item.
    """
    from .images import load_image

    loaded = []
    for item in chunk:
        t0 = time.perf_counter()
        try:
            loaded.append((item, load_image(item.image), time.perf_counter() - t0))
        except Exception as exc:
            yield _record(item, settings, "error", time.perf_counter() - t0, None, _error_text(item, exc))
    for run in _consecutive(loaded):
        outputs = None
        if len(run) > 1:
            t0 = time.perf_counter()
            try:
                outputs = _generate(pipe, run, settings)
                share = (time.perf_counter() - t0) / len(run)
            except Exception:
                outputs = None  # one item spoilt the batch: find out which, one at a time
        if outputs is not None:
            for (item, _, load_s), output in zip(run, outputs, strict=True):
                yield _save(item, output, settings, out, load_s + share)
            continue
        for entry in run:
            item, _, load_s = entry
            t0 = time.perf_counter()
            try:
                (output,) = _generate(pipe, [entry], settings)
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


def _generate(pipe, run: list, settings: BatchSettings) -> list:
    from .cameras import as_cameras

    first = run[0][0]
    cameras = as_cameras(list(first.azimuths), elevation=first.elevation) if first.azimuths else None
    return pipe.generate([image for _, image, _ in run], cameras=cameras, prompt=first.prompt,
                         negative_prompt=settings.negative_prompt, num_inference_steps=settings.steps,
                         guidance_scale=settings.guidance, elevation=first.elevation, seed=first.seed,
                         output_size=settings.size, progress=False)


def _save(item: BatchItem, output, settings: BatchSettings, out: Path, seconds: float) -> dict:
    folder = out / item.id
    t0 = time.perf_counter()
    try:
        output.save(folder, overwrite=True)  # atomic: a temporary folder renamed into place
    except Exception as exc:
        return _record(item, settings, "error", seconds + time.perf_counter() - t0, None, _error_text(item, exc))
    return _record(item, settings, "ok", seconds + time.perf_counter() - t0, folder, None)


def run_local(chunks: list[list[BatchItem]], settings: BatchSettings, out: Path) -> Iterator[dict]:
    """The local engine: one process, one Pipeline, a chunk per ``generate`` call.

    The model is loaded now, not on the first record, so an unknown model fails before
    anything is written.
    """
    pipe = settings.load_pipeline()
    return (record for chunk in chunks for record in run_chunk(pipe, chunk, settings, out))


# -- the whole run -----------------------------------------------------------------------------


def check_output(out: str | os.PathLike) -> Path:
    out = Path(os.path.expanduser(os.fspath(out)))
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder")
    return out


def run_batch(
    manifest: str | os.PathLike,
    out: str | os.PathLike,
    settings: BatchSettings,
    *,
    engine: str = "local",
    address: str | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    batch_size: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> BatchSummary:
    """Generate every pending item of ``manifest`` into ``out``; see the module docstring.

    ``engine="local"`` runs in this process; ``engine="ray"`` on a Ray cluster (``address``, or a
    local one) with ``workers`` actors of ``gpus_per_worker`` GPUs each. ``overwrite`` redoes
    finished items too. Usage errors raise an ``OxigafError``; failed items do not: they are
    counted in the summary and recorded in ``results.jsonl``.
    """
    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    for value, name in ((workers, "workers"), (batch_size, "batch_size")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1; got {value!r}")
    if isinstance(gpus_per_worker, bool) or not isinstance(gpus_per_worker, (int, float)) or not (
            math.isfinite(gpus_per_worker) and gpus_per_worker >= 0):
        raise ConfigError(f"gpus_per_worker must be a number >= 0; got {gpus_per_worker!r}")
    if engine == "local" and (address is not None or workers != 1 or gpus_per_worker):
        raise ConfigError("address, workers and gpus_per_worker need engine='ray' (CLI: --engine ray)")
    out = check_output(out).resolve()  # absolute: records name folders that workers elsewhere wrote
    items = read_manifest(manifest, settings)
    results_path = out / RESULTS_NAME
    previous = {} if overwrite else read_results(results_path)
    pending = [item for item in items if not _done(previous.get(item.id), item, settings, out)]
    summary = BatchSummary(total=len(items), ok=0, failed=0, skipped=len(items) - len(pending), results=results_path)
    if not pending:
        return summary
    chunks = make_chunks(pending, batch_size)
    if engine == "local":
        records = run_local(chunks, settings, out)
    else:
        from .engines.ray import run_ray

        records = run_ray(chunks, settings, out, address=address, workers=workers, gpus_per_worker=gpus_per_worker)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the output folder {out}: {exc}") from exc
    _clean_stale(out, (item.id for item in pending))
    _collect(records, results_path, summary, len(pending), progress)
    return summary


def _done(record: dict | None, item: BatchItem, settings: BatchSettings, out: Path) -> bool:
    return (record is not None and record.get("status") == "ok"
            and record.get("settings_hash") == settings_hash(settings, item)
            and output_complete(out / item.id, _item_views(settings, item)))


def _open_results(path: Path):
    try:
        fh = open(path, "a+b")
        fh.seek(0, os.SEEK_END)
        if fh.tell():
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")  # a killed run tore its last line: start on a fresh one
        return fh
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc}") from exc


def _collect(records: Iterable[dict], results_path: Path, summary: BatchSummary, pending: int,
             progress: bool) -> None:
    """Append each record to ``results.jsonl`` as it arrives (flushed to disk), and count it."""
    from tqdm.auto import tqdm

    fh = _open_results(results_path)
    bar = tqdm(total=pending, desc="batch", unit="item", disable=not progress, file=sys.stderr)
    try:
        for record in records:
            fh.write((json.dumps(record) + "\n").encode())
            fh.flush()
            os.fsync(fh.fileno())
            if record["status"] == "ok":
                summary.ok += 1
            else:
                summary.failed += 1
                summary.failures.append((record["id"], record["error"]))
            bar.update(1)
            bar.set_postfix(failed=summary.failed, refresh=False)
    finally:
        bar.close()
        fh.close()


def format_summary(summary: BatchSummary) -> str:
    done = f"{summary.ok} ok, {summary.failed} failed, {summary.skipped} already done (of {summary.total})"
    if not summary.failed:
        return f"batch: {done}; results in {summary.results}"
    ids = ", ".join(item_id for item_id, _ in summary.failures[:5]) + (", ..." if summary.failed > 5 else "")
    return f"batch: {done}; failed: {ids}; the errors are in {summary.results}"


__all__ = [
    "BatchItem",
    "BatchSettings",
    "BatchSummary",
    "format_summary",
    "make_chunks",
    "read_manifest",
    "read_results",
    "run_batch",
    "run_chunk",
    "run_local",
    "settings_hash",
]
