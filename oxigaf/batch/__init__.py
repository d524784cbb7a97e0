"""Batch runs: a manifest of photos in, ``OUT/<id>/`` per item and ``OUT/results.jsonl`` out.

A manifest is a CSV, JSON Lines or Parquet table with at least ``id`` and ``image`` (a path,
relative to the manifest's folder) and optional per-row ``seed``, ``prompt``, ``azimuths`` and
``elevation``; or a folder of images (id = file stem). Each item is written with
``MultiViewOutput.save()`` (a temporary folder renamed into place, with the item's run record
``oxigaf.json``), then one line is appended to ``results.jsonl`` and flushed, so an interrupted
run loses no finished item.

Resume: an item is skipped when its last line in ``results.jsonl`` is ``ok``, its settings hash
matches and its folder is complete; everything else (failed, changed, missing) runs again.

Seeds: a row without ``seed`` gets ``config.seed + row index`` (0-based), so rows draw different
noise. Consecutive rows with consecutive seeds and the same prompt and cameras share one
``generate`` call (``--batch-size`` items per UNet call): item i of a batch is, by the
pipeline's contract, the run of that item alone with ``seed + i``. The grouping into calls is
decided once, before any engine runs, so both engines make exactly the same calls and write
the same views.

Layout: ``settings.py`` (``BatchSettings``, ``BatchItem``, ``settings_hash``), ``manifest.py``
(reading manifests), ``runner.py`` (``run_batch``: resume, chunks, ``results.jsonl``),
``chunk.py`` (one chunk's ``generate`` calls and saves), ``engines/`` (``local``, ``ray``
behind one ``Engine`` interface).
"""

from __future__ import annotations

from .chunk import expected_files, output_complete, run_chunk
from .engines import ENGINES, Engine, LocalEngine, RayEngine, make_engine
from .manifest import RESULTS_NAME, read_manifest
from .runner import BatchSummary, format_summary, make_chunks, read_results, run_batch
from .settings import BatchItem, BatchSettings, settings_hash

__all__ = [
    "ENGINES",
    "RESULTS_NAME",
    "BatchItem",
    "BatchSettings",
    "BatchSummary",
    "Engine",
    "LocalEngine",
    "RayEngine",
    "expected_files",
    "format_summary",
    "make_chunks",
    "make_engine",
    "output_complete",
    "read_manifest",
    "read_results",
    "run_batch",
    "run_chunk",
    "settings_hash",
]
