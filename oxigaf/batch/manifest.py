"""Reading a manifest into ``BatchItem``s: a CSV, JSON Lines or Parquet table with at least ``id``
and ``image`` (a path, relative to the manifest's folder) and optional per-row ``seed``,
``prompt``, ``azimuths`` and ``elevation``; or a folder of images (id = file stem)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

from ..errors import InputError
from .settings import BatchItem, BatchSettings

RESULTS_NAME = "results.jsonl"
TABLE_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
REQUIRED_COLUMNS = ("id", "image")


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
    seed = settings.config.seed + index if _missing(row.get("seed")) else _seed(row["seed"], at)
    prompt = settings.prompt if _missing(row.get("prompt")) else row["prompt"]
    if not isinstance(prompt, str):
        raise InputError(f"{at}: prompt must be text; got {prompt!r}")
    azimuths = settings.azimuths if _missing(row.get("azimuths")) else _azimuths(row["azimuths"], at)
    elevation = (settings.config.elevation if _missing(row.get("elevation"))
                 else _number(row["elevation"], "elevation", at))
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
