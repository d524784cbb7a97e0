"""Classifier-free guidance and the one CFG + DDIM loop of ``generate`` and ``refine``.

Per step the UNet sees the latents twice when guidance is on (the unconditional rows, then
the conditional ones: ``oxigaf.layout``), ``ε = ε_u + g·(ε_c − ε_u)``, and the scheduler takes
one DDIM step on all rows of every item.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import NumericsError


def progress_bar(iterable, desc: str, enabled: bool, total: int | None = None):
    """A tqdm bar on a terminal; the bare iterable otherwise."""
    if not (enabled and sys.stderr.isatty()):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def guide(eps, n: int, guidance):
    """Classifier-free guidance: ``eps`` holds the unconditional rows, then the conditional ones
    (2n in all); with n rows guidance is off (1.0) and ``eps`` is the answer."""
    if eps.shape[0] == n:
        return eps
    return eps[:n] + guidance * (eps[n:] - eps[:n])


def guided_ddim_update(eps, x, guidance, w_sample, w_output):
    """``guide`` then a deterministic DDIM step (``DDIMScheduler.linear_weights``): all arrays,
    so that a backend can compile it once for every step of a loop."""
    return w_sample * x + w_output * guide(eps, x.shape[0], guidance)


@dataclass
class Denoiser:
    """The UNet's guided prediction and the DDIM loop for one call's conditioning.

    ``inputs``: the UNet's conditioning arguments (``layout.unet_inputs``, or their prepared
    cache); ``map_latents``: conditioning maps (normal latents) concatenated after the latent's
    channels, in both guidance branches (the UNet puts the clean reference latent into the
    reference slot's first channels, so that slot's input is [reference latent | the photo's
    map]); ``ip_weight`` the image prompt's weight; ``attention`` the call's attention mode
    (None: the model's).
    """

    unet: Callable
    backend: Any
    scheduler: Any
    inputs: dict
    guidance: float
    ip_weight: float
    map_latents: Any = None
    attention: str | None = None

    def eps(self, x, t: int, *, raw: bool = False):
        """The model's guided output at timestep ``t`` for latents x (items·frames, 4, h, w);
        ``raw``: as it is, both branches stacked (unconditional first) when guidance is on."""
        b = self.backend
        n = x.shape[0]
        model_in = x if self.map_latents is None else b.concat([x, self.map_latents], axis=1)
        if self.guidance > 1.0:  # at 1.0 the unconditional pass is skipped
            model_in = b.concat([model_in, model_in])
        ts = b.asarray(np.full(model_in.shape[0], float(t), np.float32))
        out = self.unet(model_in, ts, attention=self.attention, ip_weight=self.ip_weight, **self.inputs)
        return out if raw else guide(out, n, self.guidance)

    def loop(self, x: np.ndarray, timesteps, *, eta: float, seed: int, compile: bool, dtype: str,
             callback: Callable | None = None, progress: bool = True) -> np.ndarray:
        """Latents (items·frames, 4, h, w) through ``timesteps``, float32 numpy out.

        ``scheduler.set_timesteps`` must have been called for the grid that ``timesteps`` (a
        tail of it, for refinement) comes from. ``eta`` > 0 draws each step's noise from
        ``default_rng([seed, 1])``. ``compile``: guidance and a deterministic DDIM step run as
        one function compiled by the backend (its weights are inputs, so one graph serves every
        step).
        """
        b, sched = self.backend, self.scheduler
        x = b.asarray(x)
        rng = np.random.default_rng([seed, 1]) if eta > 0 else None
        total = len(timesteps)
        fused = b.compile_function(guided_ddim_update) if compile and eta == 0 else None
        for i, t in enumerate(progress_bar(timesteps, "denoising", progress, total)):
            weights = sched.linear_weights(int(t)) if fused is not None else None
            if weights is not None:
                eps = self.eps(x, int(t), raw=True)
                x = fused(eps, x, *(b.asarray(np.float32(v)) for v in (self.guidance, *weights)))
            else:
                eps = self.eps(x, int(t))
                step_noise = None if rng is None else b.asarray(rng.standard_normal(tuple(x.shape), dtype=np.float32))
                x = sched.step(eps, int(t), x, eta=eta, noise=step_noise)
            if not b.isfinite(x):
                raise NumericsError(
                    f"NaN or Inf in the latents at denoising step {i + 1}/{total} (timestep {int(t)}) with dtype "
                    f"{dtype}: float16 overflow is the usual cause; use dtype='float32' or 'bfloat16'"
                )
            if callback is not None:
                callback(i, int(t), x)
        b.synchronize(x)
        return b.to_numpy(x).astype(np.float32)


__all__ = ["Denoiser", "guide", "guided_ddim_update", "progress_bar"]
