"""Batch engines behind one interface (``Engine``): ``local`` (this process) and ``ray`` (Ray Data,
imported only inside ``ray.py`` when that engine runs)."""

from __future__ import annotations

import math

from ...errors import ConfigError
from .base import Engine
from .local import LocalEngine
from .ray import RayEngine

ENGINES = ("local", "ray")


def make_engine(name: str, *, address: str | None = None, workers: int = 1, gpus_per_worker: float = 0.0) -> Engine:
    """The engine called ``name``, its options checked (a ``ConfigError`` names a bad one)."""
    if name not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}; got {name!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an integer >= 1; got {workers!r}")
    if isinstance(gpus_per_worker, bool) or not isinstance(gpus_per_worker, (int, float)) or not (
            math.isfinite(gpus_per_worker) and gpus_per_worker >= 0):
        raise ConfigError(f"gpus_per_worker must be a number >= 0; got {gpus_per_worker!r}")
    if name == "local":
        if address is not None or workers != 1 or gpus_per_worker:
            raise ConfigError("address, workers and gpus_per_worker need engine='ray' (CLI: --engine ray)")
        return LocalEngine()
    return RayEngine(address=address, workers=workers, gpus_per_worker=float(gpus_per_worker))


__all__ = ["ENGINES", "Engine", "LocalEngine", "RayEngine", "make_engine"]
