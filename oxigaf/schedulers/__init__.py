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
``torch.clip`` and ``mx.clip`` share a signature); this package never imports torch or mlx.
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

Layout: ``tables.py`` (β/ᾱ tables, timestep spacings, config checks), ``base.py`` (array
helpers, construction), ``ddim.py``, ``euler.py``.
"""

from __future__ import annotations

from .ddim import DDIMConfig, DDIMScheduler
from .euler import EulerConfig, EulerDiscreteScheduler
from .tables import (
    BETA_SCHEDULES,
    DDIM_PREDICTION_TYPES,
    EULER_PREDICTION_TYPES,
    FINAL_SIGMAS_TYPES,
    INTERPOLATION_TYPES,
    TIMESTEP_SPACINGS,
)

__all__ = [
    "BETA_SCHEDULES",
    "DDIM_PREDICTION_TYPES",
    "DDIMConfig",
    "DDIMScheduler",
    "EULER_PREDICTION_TYPES",
    "EulerConfig",
    "EulerDiscreteScheduler",
    "FINAL_SIGMAS_TYPES",
    "INTERPOLATION_TYPES",
    "TIMESTEP_SPACINGS",
]
