"""What both schedulers share: array helpers that work on numpy, torch and mlx arrays alike,
and construction from keyword options, a config dict or a scheduler folder."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoints import read_json
from ..errors import ConfigError, InputError

# --------------------------------------------------------------------------- array helpers


def _array_module(x: Any):
    """The library that made ``x`` (numpy, torch or mlx.core), taken from the loaded modules."""
    if isinstance(x, np.ndarray | np.generic):
        return np
    name = type(x).__module__
    for mod in (sys.modules.get(name), sys.modules.get(name.split(".")[0])):
        if mod is not None and hasattr(mod, "clip"):
            return mod
    raise InputError(f"cannot clip an array of type {type(x).__name__}: expected numpy, torch or mlx")


def _clip(x: Any, lo: float, hi: float) -> Any:
    return _array_module(x).clip(x, lo, hi)


def _to_numpy(x: Any, backend: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if backend is not None:
        return np.asarray(backend.to_numpy(x))
    try:  # CPU torch tensors (``.numpy()``) and mlx arrays (buffer protocol) read without a backend
        to_numpy = getattr(x, "numpy", None)
        return np.asarray(to_numpy() if callable(to_numpy) else x)
    except Exception as exc:
        raise InputError(
            f"cannot read a {type(x).__name__} into numpy here: pass backend= (with to_numpy)"
        ) from exc


def _from_numpy(a: np.ndarray, like: Any, backend: Any) -> Any:
    if isinstance(like, np.ndarray):
        return a.astype(like.dtype, copy=False)
    if backend is None:
        raise InputError(
            f"this scheduler feature needs backend= (with asarray/to_numpy) for {type(like).__name__} arrays"
        )
    return backend.asarray(a)


def _timestep_index(t: Any, what: str) -> int:
    """An integer timestep from an int, numpy integer or 0-d integer array/tensor."""
    if isinstance(t, bool):
        raise InputError(f"{what} must be an integer; got {t!r}")
    try:
        value = float(t)
        idx = int(t)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be an integer; got {t!r}") from exc
    if value != idx:
        raise InputError(f"{what} must be an integer; got {t!r}")
    return idx


class _Scheduler:
    """Construction shared by both schedulers: kwargs, a config dict or a scheduler folder."""

    config_class: type  # set by each scheduler

    def __init__(self, config=None, **kwargs):
        if config is not None and kwargs:
            raise ConfigError("pass either a config object or keyword options, not both")
        if config is None:
            names = {f.name for f in dataclasses.fields(self.config_class)}
            unknown = sorted(set(kwargs) - names)
            if unknown:
                raise ConfigError(f"unknown {type(self).__name__} option(s): {', '.join(unknown)}")
            config = self.config_class(**kwargs)
        elif not isinstance(config, self.config_class):
            raise ConfigError(f"config must be a {self.config_class.__name__}; got {type(config).__name__}")
        self.config = config
        self.num_inference_steps: int | None = None
        self._setup()

    def _setup(self) -> None:
        raise NotImplementedError

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @classmethod
    def from_config(cls, config: dict):
        """Build from a diffusers config dict; unknown keys and keys starting with ``_`` are ignored,
        missing keys take diffusers' defaults."""
        if not isinstance(config, dict):
            raise ConfigError(f"a scheduler config must be a dict; got {type(config).__name__}")
        names = {f.name for f in dataclasses.fields(cls.config_class)}
        return cls(**{k: v for k, v in config.items() if k in names and not k.startswith("_")})

    @classmethod
    def from_folder(cls, folder: str | os.PathLike):
        """Read ``scheduler_config.json`` from a scheduler folder (or a model root holding ``scheduler/``,
        or the JSON file itself)."""
        path = Path(folder)
        if path.is_dir():
            if not (path / "scheduler_config.json").is_file() and (path / "scheduler").is_dir():
                path = path / "scheduler"
            path = path / "scheduler_config.json"
        data = read_json(path, "scheduler_config.json")
        try:
            return cls.from_config(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def _check_steps(self, n: Any) -> int:
        n_train = self.config.num_train_timesteps
        if not isinstance(n, int | np.integer) or isinstance(n, bool) or not 1 <= n <= n_train:
            raise ConfigError(f"num_inference_steps must be an integer in [1, {n_train}]; got {n!r}")
        return int(n)

    def _require_timesteps(self) -> int:
        if self.num_inference_steps is None:
            raise ConfigError(f"call {type(self).__name__}.set_timesteps(n) before stepping")
        return self.num_inference_steps
