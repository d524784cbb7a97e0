"""DDIM (Song et al. 2020), as diffusers' ``DDIMScheduler``: the sampler of the multi-view UNet."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError, NumericsError
from .base import _clip, _from_numpy, _Scheduler, _timestep_index, _to_numpy
from .tables import (
    DDIM_PREDICTION_TYPES,
    TIMESTEP_SPACINGS,
    _alphas_cumprod,
    _check_betas,
    _check_bool,
    _check_choice,
    _check_float,
    _check_int,
    _normalise,
    _spaced_timesteps,
)


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

