"""The whole batch run: which items are pending (resume), how they group into ``generate``
calls (chunks), and ``results.jsonl``, one line per finished item, flushed as it arrives."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, InputError
from .chunk import output_complete
from .engines import ENGINES, Engine, make_engine
from .manifest import RESULTS_NAME, read_manifest
from .settings import BatchItem, BatchSettings, item_views, settings_hash


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


def _clean_stale(out: Path, ids: Iterable[str]) -> None:
    """Remove temporary folders a killed run left (``save()`` names them ``.<id>.<random>``)."""
    for item_id in ids:
        for tmp in out.glob(f".{glob_escape(item_id)}.*"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


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
    engine: str | Engine = "local",
    address: str | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    batch_size: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> BatchSummary:
    """Generate every pending item of ``manifest`` into ``out`` (see ``oxigaf.batch``).

    ``engine="local"`` runs in this process; ``engine="ray"`` on a Ray cluster (``address``, or a
    local one) with ``workers`` actors of ``gpus_per_worker`` GPUs each; an ``Engine`` object runs
    as it was built. ``overwrite`` redoes
    finished items too. Usage errors raise an ``OxigafError``; failed items do not: they are
    counted in the summary and recorded in ``results.jsonl``.
    """
    if isinstance(engine, str):
        engine = make_engine(engine, address=address, workers=workers, gpus_per_worker=gpus_per_worker)
    elif not isinstance(engine, Engine):
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)} or an Engine; got {engine!r}")
    elif (address, workers, gpus_per_worker) != (None, 1, 0.0):
        raise ConfigError("address, workers and gpus_per_worker configure a named engine, not an Engine object")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    out = check_output(out).resolve()  # absolute: records name folders that workers elsewhere wrote
    items = read_manifest(manifest, settings)
    results_path = out / RESULTS_NAME
    previous = {} if overwrite else read_results(results_path)
    pending = [item for item in items if not _done(previous.get(item.id), item, settings, out)]
    summary = BatchSummary(total=len(items), ok=0, failed=0, skipped=len(items) - len(pending), results=results_path)
    if not pending:
        return summary
    chunks = make_chunks(pending, batch_size)
    records = engine.run(chunks, settings, out)
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
            and output_complete(out / item.id, item_views(settings, item)))


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
