"""The Euler sampler, as diffusers' ``EulerDiscreteScheduler``: the sampler of the sd-x2 latent upscaler."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError
from .base import _Scheduler
from .tables import (
    EULER_PREDICTION_TYPES,
    FINAL_SIGMAS_TYPES,
    INTERPOLATION_TYPES,
    TIMESTEP_SPACINGS,
    _alphas_cumprod,
    _check_betas,
    _check_bool,
    _check_choice,
    _check_int,
    _linspace_f32,
    _normalise,
    _spaced_timesteps,
)


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
