"""The float32 tables both schedulers build (β, ᾱ, timestep spacings) and the config checks they share.

diffusers builds these in float32 torch; the same float32 operations in numpy give the same
values to an ulp.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ..errors import ConfigError

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
