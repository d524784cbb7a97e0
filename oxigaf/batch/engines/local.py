"""The local engine: this process, one Pipeline, a chunk per ``generate`` call."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..chunk import run_chunk
from ..settings import BatchItem, BatchSettings


class LocalEngine:
    name = "local"

    def run(self, chunks: list[list[BatchItem]], settings: BatchSettings, out: Path) -> Iterator[dict]:
        """Loads the model now, not on the first record, so an unknown model fails before anything
        is written."""
        pipe = settings.load_pipeline()
        return (record for chunk in chunks for record in run_chunk(pipe, chunk, settings, out))
