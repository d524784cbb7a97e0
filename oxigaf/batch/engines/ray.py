"""The Ray Data engine of ``oxigaf batch`` (the only module that imports ray, and only when it runs).

The driver has already read and checked the manifest and decided which items are pending and
how they group into ``generate`` calls (``oxigaf.batch.runner.make_chunks``); the chunks become a Ray
Dataset, one row per call, and ``map_batches`` sends them to a pool of actors
(``ActorPoolStrategy(size=workers)``), each holding one loaded ``Pipeline``. Workers write
``OUT/<id>/`` themselves (OUT must be shared storage on a cluster) and return one result
record per item; the driver streams them into ``results.jsonl`` as they arrive.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from ...errors import ConfigError, ModelLoadError
from ..chunk import run_chunk
from ..settings import BatchItem, BatchSettings

# Cores the actors leave free: Ray Data's own read/split tasks need a CPU, or the job stalls.
RESERVED_CPUS = 1.0
MIN_CPUS_PER_WORKER = 0.05


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ConfigError("--engine ray needs Ray Data: pip install 'oxigaf[ray]'") from exc
    return ray


class BatchWorker:
    """A Ray actor: one Pipeline, loaded once, run on chunk after chunk."""

    def __init__(self, settings: dict, out: str):
        self.settings = BatchSettings.from_dict(settings)
        self.out = Path(out)
        self.error = None
        try:
            self.pipe = self.settings.load_pipeline()
        except Exception as exc:  # reported to the driver, which stops with a usage error
            self.error = f"{type(exc).__name__}: {exc}"

    def __call__(self, batch: dict) -> dict:
        records = []
        for text in batch["chunk"]:
            chunk = [BatchItem.from_dict(d) for d in json.loads(str(text))]
            if self.error is not None:
                records += [{"fatal": self.error, "id": item.id} for item in chunk]
                continue
            records += list(run_chunk(self.pipe, chunk, self.settings, self.out))
        return {"record": [json.dumps(r) for r in records]}


def cpus_per_worker(cluster_cpus: float, workers: int) -> float:
    """Fractional CPUs per actor so that ``workers`` actors still leave Ray Data a core."""
    free = cluster_cpus - RESERVED_CPUS if cluster_cpus > RESERVED_CPUS else cluster_cpus / 2
    return round(max(MIN_CPUS_PER_WORKER, min(1.0, free / workers)), 3)


class RayEngine:
    """Ray Data ``map_batches`` over the chunks, with a pool of ``workers`` actors of
    ``gpus_per_worker`` GPUs each, on the cluster at ``address`` (None: start a local one)."""

    name = "ray"

    def __init__(self, *, address: str | None = None, workers: int = 1, gpus_per_worker: float = 0.0):
        self.address, self.workers, self.gpus_per_worker = address, workers, gpus_per_worker

    def run(self, chunks: list[list[BatchItem]], settings: BatchSettings, out: Path) -> Iterator[dict]:
        """Checks ray and the model now (usage errors before anything is written); runs lazily."""
        ray = _import_ray()
        from ...checkpoints import resolve_model

        # The workers load the model; the driver only checks it exists, so a wrong name is a
        # usage error here rather than one error row per item.
        model = resolve_model(settings.model)
        if not (model / "model_index.json").is_file():
            raise ModelLoadError(f"model folder {model} has no model_index.json (expected a diffusers pipeline folder)")
        return _records(ray, chunks, settings, out, self.address, self.workers, self.gpus_per_worker)


def _records(ray, chunks, settings, out, address, workers, gpus_per_worker) -> Iterator[dict]:
    started = not ray.is_initialized()
    if started:
        try:
            # Joining a cluster takes the address alone (its resources are the cluster's); a new
            # local one needs no dashboard.
            kwargs = {"address": address} if address else {"include_dashboard": False}
            ray.init(logging_level="WARNING", **kwargs)
        except Exception as exc:  # ConnectionError, RuntimeError, ValueError...: the address is unusable
            raise ConfigError(f"cannot start or join a Ray cluster at {address or '(local)'}: {exc}") from exc
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver shows one bar over items
        ctx.print_on_execution_start = False
        cpus = cpus_per_worker(float(ray.cluster_resources().get("CPU", 1.0)), workers)
        rows = [{"chunk": json.dumps([item.to_dict() for item in chunk])} for chunk in chunks]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        results = ds.map_batches(
            BatchWorker,
            fn_constructor_kwargs={"settings": settings.to_dict(), "out": str(Path(out).resolve())},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=cpus,
            num_gpus=gpus_per_worker or None,
        )
        for row in results.iter_rows():
            record = json.loads(row["record"])
            if "fatal" in record:
                raise ModelLoadError(f"a Ray worker could not load the model {settings.model}: {record['fatal']}")
            yield record
    finally:
        if started:
            ray.shutdown()
