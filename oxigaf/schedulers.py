"""Noise schedulers: DDIM for the multi-view UNet, Euler for the sd-x2 latent upscaler.

Both give the numbers of diffusers' ``DDIMScheduler`` and ``EulerDiscreteScheduler`` (0.42)
for the configuration keys listed on each class. diffusers builds its tables in float32
torch; we build them with the same float32 operations in numpy and keep float64 copies of
those float32 values, so the tables agree to an ulp and the per-step scalars (Python
floats) carry no further rounding.

Array types. ``step``, ``scale_model_input`` and ``add_noise`` combine the caller's arrays
with Python floats using operators only, so the same code runs on numpy arrays, torch
tensors and mlx arrays and returns the type it was given (a float32 array stays float32).
Clipping, the one elementwise operation operators cannot express, calls ``clip`` of the
library that made the array, looked up among the already-loaded modules (``np.clip``,
``torch.clip`` and ``mx.clip`` share a signature); this module never imports torch or mlx.
Two features need to move data between numpy and the caller's array type: dynamic
thresholding (a per-sample quantile, computed in numpy) and DDIM noise for ``eta > 0`` when
the caller does not pass ``noise`` but an ``rng`` (drawn with numpy). For arrays other than
numpy these take ``backend=`` (anything with ``asarray(np.ndarray)`` and ``to_numpy(array)``,
e.g. an oxigaf Backend).

Where diffusers' own answer is unusable we differ, on purpose and only there:

- ``timestep_spacing="trailing"``: diffusers' float ``arange`` sometimes yields one extra
  timestep, -1 (e.g. 61 of 1000 steps); we keep the first ``n``, which equal diffusers'.
- DDIM with ᾱ_t = 1 (β₀ = 0, e.g. ``beta_start=0``) at t = 0: diffusers' variance is 0/0 and
  the step returns NaN even for eta = 0. Here σ_t = 0 when 1 − ᾱ_t = 0 and the (zero-weight)
  noise direction is dropped, so the step returns x̂₀ — the limit of the formula.
- DDIM ``leading`` spacing whose ``steps_offset`` pushes a timestep past the table (1000 steps,
  offset 1): diffusers fails with an IndexError in ``step``; ``set_timesteps`` raises
  ``ConfigError`` naming steps_offset.
- DDIM epsilon prediction at a timestep with ᾱ_t = 0 (zero-terminal-SNR rescale, t = N−1) and
  neither clipping nor thresholding: diffusers returns inf/NaN; ``step`` raises
  ``NumericsError``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoints import read_json
from .errors import ConfigError, InputError, NumericsError

__all__ = ["DDIMConfig", "DDIMScheduler", "EulerConfig", "EulerDiscreteScheduler"]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
DDIM_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
EULER_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "original_sample")
INTERPOLATION_TYPES = ("linear", "log_linear")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


# --------------------------------------------------------------------------- float32 tables


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=float32)``: float32 step, filled from both ends.

    torch's vectorised CPU kernel rounds a few entries differently (by one ulp); the scalar
    formula is what it implements.
    """
    s, e = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([s], dtype=np.float32)
    step = np.float32((e - s) / np.float32(steps - 1))
    i = np.arange(steps)
    head = s + step * i.astype(np.float32)
    tail = e - step * (steps - 1 - i).astype(np.float32)
    return np.where(i < steps // 2, head, tail).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """``squaredcos_cap_v2``: βᵢ = min(1 − ᾱ(tᵢ₊₁)/ᾱ(tᵢ), 0.999) with ᾱ(t) = cos²((t + 0.008)/1.008 · π/2)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.array(betas, dtype=np.float32)


def _cumprod_f32(alphas: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod accumulates float32 in double and rounds each partial product.
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale √ᾱ so that ᾱ_{N−1} = 0 and ᾱ₀ is unchanged (arXiv:2305.08891, Alg. 1), in float32."""
    sqrt_ab = np.sqrt(_cumprod_f32(np.float32(1.0) - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * np.float32(first / (first - last))
    ab = sqrt_ab * sqrt_ab
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def _train_betas(cfg) -> np.ndarray:
    """The float32 β table diffusers builds for ``cfg``."""
    if cfg.trained_betas is not None:
        betas = np.array(cfg.trained_betas, dtype=np.float32)
    elif cfg.beta_schedule == "linear":
        betas = _linspace_f32(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps)
    elif cfg.beta_schedule == "scaled_linear":
        root = _linspace_f32(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps)
        betas = root * root
    else:
        betas = _cosine_betas(cfg.num_train_timesteps)
    if cfg.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def _alphas_cumprod(cfg) -> tuple[np.ndarray, np.ndarray]:
    """(β, ᾱ) as float32, after checking ᾱ stays positive (zero only at t = N−1 under zero-SNR rescale)."""
    betas = _train_betas(cfg)
    ac = _cumprod_f32(np.float32(1.0) - betas)
    inner = ac[:-1] if cfg.rescale_betas_zero_snr else ac
    if not np.all(inner > 0):
        raise ConfigError(
            f"the beta schedule drives alphas_cumprod to 0 at t={int(np.argmin(inner > 0))}; use smaller betas"
        )
    return betas, ac


def _spaced_timesteps(spacing: str, n_train: int, n: int, steps_offset: int, integer: bool) -> np.ndarray:
    """diffusers' ``set_timesteps`` spacings, descending; ``integer`` rounds ``linspace`` (DDIM does, Euler not)."""
    if spacing == "linspace":
        ts = np.linspace(0, n_train - 1, n)
        ts = ts.round() if integer else ts.astype(np.float32).astype(np.float64)
        return ts[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (n_train // n)).round()[::-1] + steps_offset
    # Float arange can overshoot by one element (then -1); the first n are diffusers' values.
    return np.round(np.arange(n_train, 0, -n_train / n))[:n] - 1


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


# --------------------------------------------------------------------------- configs


def _check_choice(value: Any, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_int(value: Any, name: str, lo: int) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}; got {value!r}")


def _check_float(value: Any, name: str) -> None:
    if not isinstance(value, int | float | np.floating) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number; got {value!r}")


def _check_bool(value: Any, name: str) -> None:
    if not isinstance(value, bool | np.bool_):
        raise ConfigError(f"{name} must be true or false; got {value!r}")


def _check_betas(cfg) -> None:
    """The β-table keys both schedulers share."""
    _check_int(cfg.num_train_timesteps, "num_train_timesteps", 1)
    _check_bool(cfg.rescale_betas_zero_snr, "rescale_betas_zero_snr")
    if cfg.rescale_betas_zero_snr and cfg.num_train_timesteps < 2:
        raise ConfigError("rescale_betas_zero_snr needs num_train_timesteps >= 2")
    if cfg.trained_betas is not None:
        betas = np.asarray(cfg.trained_betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) != cfg.num_train_timesteps:
            raise ConfigError(
                f"trained_betas must be a list of num_train_timesteps={cfg.num_train_timesteps} numbers; "
                f"got shape {betas.shape}"
            )
        if not np.all(np.isfinite(betas)) or np.any(betas < 0) or np.any(betas >= 1):
            raise ConfigError("trained_betas must all lie in [0, 1)")
        return
    _check_choice(cfg.beta_schedule, BETA_SCHEDULES, "beta_schedule")
    if cfg.beta_schedule == "squaredcos_cap_v2":
        return  # beta_start / beta_end are unused
    _check_float(cfg.beta_start, "beta_start")
    _check_float(cfg.beta_end, "beta_end")
    if cfg.beta_start < 0:
        raise ConfigError(f"beta_start must be >= 0; got {cfg.beta_start!r}")
    if cfg.beta_end < cfg.beta_start:
        raise ConfigError(f"beta_end ({cfg.beta_end!r}) must be >= beta_start ({cfg.beta_start!r})")
    if cfg.beta_end >= 1:
        raise ConfigError(f"beta_end must be < 1; got {cfg.beta_end!r}")


def _normalise(cfg) -> None:
    """In place on a frozen config: lists → tuples, JSON null for a flag → False (as diffusers reads it)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(f.default, bool) and value is None:
            object.__setattr__(cfg, f.name, False)
    tb = cfg.trained_betas
    if tb is not None and not isinstance(tb, tuple):
        try:
            arr = np.asarray(tb, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"trained_betas must be a list of numbers; got {tb!r}") from exc
        object.__setattr__(cfg, "trained_betas", tuple(arr.tolist()) if arr.ndim == 1 else arr)


@dataclass(frozen=True)
class DDIMConfig:
    """diffusers ``DDIMScheduler`` keys, with its defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        _normalise(self)
        _check_betas(self)
        for name in ("clip_sample", "set_alpha_to_one", "thresholding"):
            _check_bool(getattr(self, name), name)
        _check_float(self.clip_sample_range, "clip_sample_range")
        if self.clip_sample_range <= 0:
            raise ConfigError(f"clip_sample_range must be > 0; got {self.clip_sample_range!r}")
        _check_int(self.steps_offset, "steps_offset", 0)
        if self.steps_offset >= self.num_train_timesteps:
            raise ConfigError(f"steps_offset must be < num_train_timesteps; got {self.steps_offset!r}")
        _check_choice(self.prediction_type, DDIM_PREDICTION_TYPES, "prediction_type")
        _check_float(self.dynamic_thresholding_ratio, "dynamic_thresholding_ratio")
        if not 0 < self.dynamic_thresholding_ratio <= 1:
            raise ConfigError(f"dynamic_thresholding_ratio must lie in (0, 1]; got {self.dynamic_thresholding_ratio!r}")
        _check_float(self.sample_max_value, "sample_max_value")
        if self.sample_max_value <= 0:
            raise ConfigError(f"sample_max_value must be > 0; got {self.sample_max_value!r}")
        _check_choice(self.timestep_spacing, TIMESTEP_SPACINGS, "timestep_spacing")


@dataclass(frozen=True)
class EulerConfig:
    """diffusers ``EulerDiscreteScheduler`` keys, with its defaults. Only the deterministic sampler
    with the training-schedule sigmas is supported: Karras/exponential/beta sigmas and continuous
    timesteps are refused; ``sigma_min``/``sigma_max`` only matter to those and are ignored."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_spacing: str = "linspace"
    timestep_type: str = "discrete"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        _normalise(self)
        _check_betas(self)
        _check_choice(self.prediction_type, EULER_PREDICTION_TYPES, "prediction_type")
        _check_choice(self.interpolation_type, INTERPOLATION_TYPES, "interpolation_type")
        for name in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            _check_bool(getattr(self, name), name)
            if getattr(self, name):
                raise ConfigError(f"{name}=True is not supported by oxigaf's Euler scheduler")
        _check_choice(self.timestep_spacing, TIMESTEP_SPACINGS, "timestep_spacing")
        if self.timestep_type != "discrete":
            raise ConfigError(f"timestep_type must be 'discrete'; got {self.timestep_type!r}")
        _check_int(self.steps_offset, "steps_offset", 0)
        if self.steps_offset >= self.num_train_timesteps:
            raise ConfigError(f"steps_offset must be < num_train_timesteps; got {self.steps_offset!r}")
        _check_choice(self.final_sigmas_type, FINAL_SIGMAS_TYPES, "final_sigmas_type")


class _Scheduler:
    """Construction shared by both schedulers: kwargs, a config dict or a scheduler folder."""

    config_class: type = DDIMConfig

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


# --------------------------------------------------------------------------- DDIM


class DDIMScheduler(_Scheduler):
    """Denoising diffusion implicit models (Song et al. 2020), as diffusers' ``DDIMScheduler``.

    Tables: ``betas``, ``alphas_cumprod`` (float64 copies of diffusers' float32 values),
    ``final_alpha_cumprod`` (ᾱ used after the last timestep). After ``set_timesteps(n)``,
    ``timesteps`` is an int64 array of the n training timesteps visited, descending.
    """

    config_class = DDIMConfig
    init_noise_sigma = 1.0

    def _setup(self) -> None:
        betas, ac = _alphas_cumprod(self.config)
        self.betas = betas.astype(np.float64)
        self.alphas_cumprod = ac.astype(np.float64)
        self.final_alpha_cumprod = 1.0 if self.config.set_alpha_to_one else float(self.alphas_cumprod[0])
        self.timesteps = np.arange(self.config.num_train_timesteps, dtype=np.int64)[::-1].copy()

    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        n = self._check_steps(num_inference_steps)
        cfg = self.config
        ts = _spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n, cfg.steps_offset, True)
        ts = ts.astype(np.int64)
        if ts.max() > cfg.num_train_timesteps - 1:
            raise ConfigError(
                f"steps_offset={cfg.steps_offset} with {n} 'leading' steps gives timestep {int(ts.max())}, past the "
                f"last training timestep {cfg.num_train_timesteps - 1}: use fewer steps or steps_offset=0"
            )
        self.num_inference_steps = n
        self.timesteps = ts
        return ts

    def img2img_timesteps(self, num_inference_steps: int, strength: float) -> np.ndarray:
        """The tail of the ``num_inference_steps`` grid that SDEdit / img2img runs, as diffusers' img2img
        pipelines pick it: ``k = min(int(N·strength), N)``, ``timesteps[N − k:]``. Sets the grid."""
        ts = self.set_timesteps(num_inference_steps)
        n = self.num_inference_steps
        return ts[n - min(int(n * strength), n):]

    def previous_timestep(self, t: int) -> int:
        """The timestep a step from ``t`` lands on (negative: past the end, ᾱ = ``final_alpha_cumprod``)."""
        return int(t) - self.config.num_train_timesteps // self._require_timesteps()

    def _alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod

    def _check_t(self, t: Any) -> int:
        t = _timestep_index(t, "timestep")
        if not 0 <= t < self.config.num_train_timesteps:
            raise InputError(f"timestep must lie in [0, {self.config.num_train_timesteps - 1}]; got {t}")
        return t

    def scale_model_input(self, sample: Any, t: Any = None) -> Any:
        """DDIM feeds the model the sample itself (for a scheduler-agnostic loop)."""
        return sample

    def _threshold(self, x0: Any, backend: Any) -> Any:
        """Dynamic thresholding (Imagen): per sample s = quantile(|x̂₀|, ratio) clamped to [1, max];
        x̂₀ ← clip(x̂₀, ±s)/s."""
        cfg = self.config
        flat = np.abs(_to_numpy(x0, backend).astype(np.float32)).reshape(x0.shape[0], -1)
        s = np.quantile(flat, cfg.dynamic_thresholding_ratio, axis=1)
        s = np.minimum(np.maximum(s, 1.0), cfg.sample_max_value)  # torch.clamp(min=1, max=v) order
        out = x0 * 1
        for b, sb in enumerate(s.astype(np.float32).tolist()):
            out[b] = _clip(x0[b], -sb, sb) / sb
        return out

    def step(
        self,
        model_output: Any,
        t: Any,
        sample: Any,
        eta: float = 0.0,
        noise: Any = None,
        *,
        rng: np.random.Generator | None = None,
        backend: Any = None,
        return_x0: bool = False,
    ) -> Any:
        """One DDIM step from timestep ``t`` to ``previous_timestep(t)``; returns x_{t−Δ} (and x̂₀ with
        ``return_x0``), of the type of ``sample``.

        ``eta`` in [0, 1] scales the noise of the step (0: deterministic DDIM). For eta > 0 pass
        ``noise`` (a standard-normal array like ``sample``) or ``rng`` (numpy Generator; float32
        noise is drawn with it, converted with ``backend`` unless ``sample`` is numpy).
        """
        n = self._require_timesteps()
        if isinstance(eta, bool) or not isinstance(eta, int | float | np.floating) or not 0.0 <= eta <= 1.0:
            raise InputError(f"eta must be a number in [0, 1]; got {eta!r}")
        cfg = self.config
        t = self._check_t(t)
        prev_t = t - cfg.num_train_timesteps // n
        a_t, a_prev = self._alpha(t), self._alpha(prev_t)
        b_t = 1.0 - a_t

        if cfg.prediction_type == "epsilon":
            if a_t == 0.0 and not (cfg.thresholding or cfg.clip_sample):
                raise NumericsError(
                    f"epsilon prediction cannot recover x0 at t={t}: alphas_cumprod[t] is 0 (zero terminal SNR); "
                    "use v_prediction, clip_sample, or a spacing that avoids the last training timestep"
                )
            x0 = (sample - math.sqrt(b_t) * model_output) / math.sqrt(a_t)
            eps = model_output
        elif cfg.prediction_type == "sample":
            x0 = model_output
            # At ᾱ_t = 1 the noise is undefined, and its weight below is 0.
            eps = (sample - math.sqrt(a_t) * x0) / math.sqrt(b_t) if b_t > 0.0 else None
        else:  # v_prediction
            x0 = math.sqrt(a_t) * sample - math.sqrt(b_t) * model_output
            eps = math.sqrt(a_t) * model_output + math.sqrt(b_t) * sample

        if cfg.thresholding:
            x0 = self._threshold(x0, backend)
        elif cfg.clip_sample:
            x0 = _clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)

        # σ_t² = (1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev); defined as 0 where 1−ᾱ_t = 0 (diffusers: 0/0).
        variance = (1.0 - a_prev) / b_t * (1.0 - a_t / a_prev) if b_t > 0.0 else 0.0
        std = eta * math.sqrt(max(variance, 0.0))
        dir_weight = math.sqrt(max(1.0 - a_prev - std * std, 0.0))

        prev = math.sqrt(a_prev) * x0
        if dir_weight > 0.0:
            prev = prev + dir_weight * eps
        if eta > 0:
            if noise is None:
                if rng is None:
                    raise InputError("eta > 0 needs noise= (an array like sample) or rng= (a numpy Generator)")
                noise = _from_numpy(rng.standard_normal(tuple(sample.shape), dtype=np.float32), sample, backend)
            prev = prev + std * noise
        return (prev, x0) if return_x0 else prev

    def linear_weights(self, t: Any) -> tuple[float, float] | None:
        """``(w_sample, w_output)`` with ``step(o, t, s) == w_sample·s + w_output·o`` for the
        deterministic step (eta 0), or None where the step is not linear (thresholding, clipping).

        The same step in two multiply-adds: what a compiled loop (``DiffusionConfig.compile``)
        fuses with the guidance into one kernel. Equal to ``step`` up to float rounding.
        """
        cfg = self.config
        if cfg.thresholding or cfg.clip_sample:
            return None
        n = self._require_timesteps()
        t = self._check_t(t)
        a_t, a_prev = self._alpha(t), self._alpha(t - cfg.num_train_timesteps // n)
        b_t = 1.0 - a_t
        # x0 = p·s + q·o and eps = r·s + u·o per prediction type; prev = √ᾱ_prev·x0 + √(1−ᾱ_prev)·eps
        if cfg.prediction_type == "epsilon":
            if a_t == 0.0:
                return None  # step() names the problem
            p, q, r, u = 1.0 / math.sqrt(a_t), -math.sqrt(b_t / a_t), 0.0, 1.0
        elif cfg.prediction_type == "sample":
            p, q = 0.0, 1.0
            r, u = (1.0 / math.sqrt(b_t), -math.sqrt(a_t / b_t)) if b_t > 0.0 else (0.0, 0.0)
        else:  # v_prediction
            p, q, r, u = math.sqrt(a_t), -math.sqrt(b_t), math.sqrt(b_t), math.sqrt(a_t)
        x0_weight, eps_weight = math.sqrt(a_prev), math.sqrt(max(1.0 - a_prev, 0.0))
        return x0_weight * p + eps_weight * r, x0_weight * q + eps_weight * u

    def predicted_noise(self, model_output: Any, t: Any, sample: Any) -> Any:
        """The noise ε that ``model_output`` implies at timestep ``t`` under the configured prediction type."""
        t = self._check_t(t)
        a_t = float(self.alphas_cumprod[t])
        kind = self.config.prediction_type
        if kind == "epsilon":
            return model_output
        if kind == "v_prediction":
            return math.sqrt(a_t) * model_output + math.sqrt(1.0 - a_t) * sample
        if a_t >= 1.0:
            raise NumericsError(f"the noise is undefined at t={t} for sample prediction (alphas_cumprod[t] = 1)")
        return (sample - math.sqrt(a_t) * model_output) / math.sqrt(1.0 - a_t)

    def add_noise(self, original_samples: Any, noise: Any, t: Any) -> Any:
        """Forward diffusion to timestep ``t`` (one integer for the whole batch): √ᾱ_t·x₀ + √(1−ᾱ_t)·ε."""
        t = self._check_t(t)
        a_t = float(self.alphas_cumprod[t])
        return math.sqrt(a_t) * original_samples + math.sqrt(1.0 - a_t) * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps


# --------------------------------------------------------------------------- Euler


class EulerDiscreteScheduler(_Scheduler):
    """Euler sampler over Karras-style sigmas σ = √((1−ᾱ)/ᾱ), as diffusers' ``EulerDiscreteScheduler``
    (deterministic: s_churn = 0).

    After ``set_timesteps(n)``: ``timesteps`` (n float64 values of diffusers' float32 timesteps)
    and ``sigmas`` (float64, one per step plus the final one(s)). Step ``i`` goes from
    ``sigmas[i]`` to ``sigmas[i + 1]``. With ``interpolation_type="log_linear"`` diffusers builds
    n+1 log-spaced sigmas from σ_max down to σ_min and appends 0, so the n steps end at σ_min and
    the final 0 is never reached; with ``"linear"`` (diffusers' default, used when a config file
    has no ``interpolation_type``) the sigmas follow the timesteps and the last step ends at 0.
    The step keeps the sample's dtype (diffusers upcasts to float32 inside): step float32 latents.

    Methods take a step index (a Python/numpy integer) or one of ``timesteps`` (a float); the
    index is what the loop knows, so pass ``i`` from ``enumerate(timesteps)``.
    """

    config_class = EulerConfig

    def _setup(self) -> None:
        cfg = self.config
        betas, ac = _alphas_cumprod(cfg)
        if cfg.rescale_betas_zero_snr:
            ac = ac.copy()
            ac[-1] = np.float32(2.0**-24)  # diffusers: keeps σ_max finite
        self.betas = betas.astype(np.float64)
        self.alphas_cumprod = ac.astype(np.float64)
        self._train_sigmas = np.sqrt((np.float32(1.0) - ac) / ac).astype(np.float32)  # ascending in t
        n_train = cfg.num_train_timesteps
        self.timesteps = np.linspace(0, n_train - 1, n_train)[::-1].astype(np.float32).astype(np.float64)
        self.sigmas = np.concatenate([self._train_sigmas[::-1], [0.0]]).astype(np.float64)

    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        n = self._check_steps(num_inference_steps)
        cfg = self.config
        ts = _spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n, cfg.steps_offset, False)
        ts = ts.astype(np.float32)
        train = self._train_sigmas
        if cfg.interpolation_type == "linear":
            sig = np.interp(ts, np.arange(len(train)), train)
        else:
            log_sig = np.log(train)
            sig = np.exp(_linspace_f32(log_sig[-1], log_sig[0], n + 1))
        last = float(train[0]) if cfg.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sig, [last]]).astype(np.float32).astype(np.float64)
        self.timesteps = ts.astype(np.float64)
        self.num_inference_steps = n
        return self.timesteps

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial latents: σ_max, or √(σ_max² + 1) for ``leading`` spacing."""
        s = float(np.float32(self.sigmas.max()))
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return s
        return float(np.float32(math.sqrt(s * s + 1.0)))

    def index(self, i_or_t: Any) -> int:
        """Step index from an integer index, or from a float timestep found in ``timesteps``."""
        if isinstance(i_or_t, bool):
            raise InputError(f"step index must be an integer or a timestep; got {i_or_t!r}")
        n_steps = len(self.timesteps)
        if isinstance(i_or_t, int | np.integer):
            i = int(i_or_t)
        else:
            try:
                t = float(i_or_t)
            except (TypeError, ValueError) as exc:
                raise InputError(f"step index must be an integer or a timestep; got {i_or_t!r}") from exc
            hits = np.flatnonzero(self.timesteps == np.float64(np.float32(t)))
            if len(hits) == 0:
                raise InputError(f"timestep {t!r} is not one of this scheduler's timesteps")
            i = int(hits[1] if len(hits) > 1 else hits[0])  # diffusers picks the second of duplicates
        if not 0 <= i < n_steps:
            raise InputError(f"step index must lie in [0, {n_steps - 1}]; got {i}")
        return i

    def sigma(self, i_or_t: Any) -> float:
        return float(self.sigmas[self.index(i_or_t)])

    def model_timestep(self, i_or_t: Any) -> float:
        """The noise-level input of a Karras-preconditioned model (the latent upscaler): ¼·ln σ."""
        return 0.25 * math.log(self.sigma(i_or_t))

    def c_skip(self, i_or_t: Any) -> float:
        """Weight of the noisy sample in the upscaler's denoised estimate: 1/(σ²+1)."""
        s = self.sigma(i_or_t)
        return 1.0 / (s * s + 1.0)

    def c_out(self, i_or_t: Any) -> float:
        """Weight of the model output in the upscaler's denoised estimate: σ/√(σ²+1)."""
        s = self.sigma(i_or_t)
        return s / math.sqrt(s * s + 1.0)

    def scale_model_input(self, sample: Any, i_or_t: Any) -> Any:
        """The model input at step ``i``: sample/√(σᵢ²+1)."""
        s = self.sigma(i_or_t)
        return sample / math.sqrt(s * s + 1.0)

    def step(self, model_output: Any, i_or_t: Any, sample: Any, *, return_x0: bool = False) -> Any:
        """One Euler step from σᵢ to σᵢ₊₁: x + (x − x̂₀)/σᵢ·(σᵢ₊₁ − σᵢ), of the type of ``sample``."""
        self._require_timesteps()
        i = self.index(i_or_t)
        s, s_next = float(self.sigmas[i]), float(self.sigmas[i + 1])
        pt = self.config.prediction_type
        if pt in ("sample", "original_sample"):
            x0 = model_output
        elif pt == "epsilon":
            x0 = sample - s * model_output
        else:  # v_prediction
            x0 = model_output * (-s / math.sqrt(s * s + 1.0)) + sample / (s * s + 1.0)
        prev = sample + (sample - x0) / s * (s_next - s)
        return (prev, x0) if return_x0 else prev

    def add_noise(self, original_samples: Any, noise: Any, i_or_t: Any) -> Any:
        """x₀ + σᵢ·ε (one step for the whole batch)."""
        return original_samples + self.sigma(i_or_t) * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps
