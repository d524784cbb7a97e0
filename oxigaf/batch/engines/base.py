"""The one interface every batch engine implements."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..settings import BatchItem, BatchSettings


@runtime_checkable
class Engine(Protocol):
    """Runs chunks of items (``run_batch`` decides the chunks) and yields one result record per item.

    ``run`` checks what would fail the whole batch (the model, the cluster) in the call itself,
    before it returns: such a problem raises an ``OxigafError`` before anything is written. The
    returned iterator does the work lazily; an item's own failure is an ``"error"`` record, never
    an exception. Each item is written to ``out/<id>/`` with ``run_chunk`` (``oxigaf.batch.chunk``),
    so every engine makes the same ``generate`` calls; records may arrive in any order.
    """

    name: str

    def run(self, chunks: list[list[BatchItem]], settings: BatchSettings, out: Path) -> Iterator[dict]: ...
