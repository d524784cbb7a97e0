"""ImageDream's training objective, built in numpy so every backend sees the same numbers.

Per sample: ``views`` target frames and the reference slot, in inference's frame layout
(``oxigaf.layout``: frame F−1, F = views + 1 for ImageDream; F = views for a text-only MVDream
UNet). The targets are noised to a timestep t drawn uniformly from the training timesteps (the
same t for every frame of a sample) with ``layout.add_noise``; the reference slot's model input
is replaced by the clean reference latent inside the UNet (its noisy input here is zeros and
never matters); its camera is all zeros. The loss is the mean
squared error between the UNet's output on the target frames and the target: the noise
(``epsilon``), the velocity ``√ᾱ·ε − √(1−ᾱ)·x₀`` (``v_prediction``) or ``x₀`` (``sample``),
per the scheduler config.

Conditioning dropout for classifier-free guidance, each with its own probability per sample:
the image condition (zero CLIP states and zero reference latent, exactly the unconditional
branch of inference) and the text condition (the empty prompt's states, the inference
default negative prompt). With normal maps (an 8-channel UNet) every frame's input is
``[latent | normal latent]`` and the reference slot's ``[reference latent | its normal latent]``;
dropping the image zeroes only the reference latent part, as inference does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import layout
from ..errors import ConfigError


@dataclass
class Batch:
    """One UNet call and its target (numpy, NCHW, float32; views fastest, reference slot last)."""

    x: np.ndarray  # (B·F, C_in, h, w) noisy inputs
    timesteps: np.ndarray  # (B·F,) float32
    context: np.ndarray  # (B·F, L, D) text states
    camera: np.ndarray  # (B·F, 16)
    ip: np.ndarray | None  # (B·F, T, 1280) CLIP penultimate states (zeros where dropped)
    ip_img: np.ndarray | None  # (B, C, h, w) clean reference input (its latent part zero where dropped)
    target: np.ndarray  # (B, views, C_out, h, w)
    num_frames: int
    views: int

    @property
    def batch_size(self) -> int:
        return self.target.shape[0]


def prediction_target(prediction_type: str, x0, noise, alpha_bar):
    """What the UNet should output for clean ``x0`` noised with ``noise`` at ᾱ (broadcastable arrays)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return np.sqrt(alpha_bar) * noise - np.sqrt(1.0 - alpha_bar) * x0
    if prediction_type == "sample":
        return x0
    raise ConfigError(f"cannot train for prediction_type {prediction_type!r}: use epsilon, v_prediction or sample")


def batch_loss(pred: np.ndarray, batch: Batch) -> float:
    """The objective in numpy (float64): MSE of the target frames' prediction. ``pred`` (B·F, C, h, w)."""
    b, f = batch.batch_size, batch.num_frames
    p = np.asarray(pred, np.float64).reshape((b, f) + pred.shape[1:])[:, : batch.views]
    return float(np.mean((p - batch.target) ** 2))


@dataclass
class SampleDraw:
    """Everything random about one sample (drawn by the trainer's Generator, in this order)."""

    subject: int
    reference: int
    targets: list[int]
    timestep: int
    noise: np.ndarray  # (views, C, h, w)
    drop_image: bool
    drop_text: bool


def draw_sample(rng: np.random.Generator, dataset, num_train_timesteps: int, latent_shape: tuple[int, ...],
                image_dropout: float, text_dropout: float, reference: int | None = None) -> SampleDraw:
    s, ref, targets = dataset.sample(rng, reference)
    t = int(rng.integers(num_train_timesteps))
    noise = rng.standard_normal((dataset.views,) + tuple(latent_shape), dtype=np.float32)
    drops = rng.random(2)
    return SampleDraw(s, ref, targets, t, noise, bool(drops[0] < image_dropout), bool(drops[1] < text_dropout))


def build_batch(draws: list[SampleDraw], dataset, alphas_cumprod: np.ndarray, prediction_type: str,
                text_states: dict[str, np.ndarray], *, image_conditioned: bool, normals: bool) -> Batch:
    """Assemble the UNet call for ``draws`` in inference's frame layout (``oxigaf.layout``).
    ``text_states`` maps each prompt (and "") to (L, D) states."""
    views = dataset.views
    frames = layout.num_frames(views, image_conditioned)
    xs, ts, ctx, cams, ips, refs, targets = [], [], [], [], [], [], []
    for d in draws:
        lat = dataset.latents[d.subject]
        x0 = lat[d.targets].astype(np.float32)
        a = np.float32(alphas_cumprod[d.timestep])
        noisy = layout.with_reference_slot(layout.add_noise(x0, d.noise, a), frames)
        targets.append(np.asarray(prediction_target(prediction_type, x0, d.noise, a), np.float32))
        cams.append(layout.camera_rows(dataset.cameras(d.subject, d.reference, d.targets), frames))
        if normals:
            nl = dataset.normal_latents[d.subject]
            nidx = d.targets + ([d.reference] if image_conditioned else [])
            noisy = np.concatenate([noisy, nl[nidx].astype(np.float32)], axis=1)
        xs.append(noisy)
        ts.append(np.full(frames, d.timestep, np.float32))
        prompt = "" if d.drop_text else dataset.subjects[d.subject].prompt
        ctx.append(np.broadcast_to(text_states[prompt], (frames,) + text_states[prompt].shape))
        if image_conditioned:
            # image dropout is inference's unconditional branch: zero CLIP states, zero reference latent
            states = dataset.clip_states[d.subject][d.reference].astype(np.float32)
            ref = lat[d.reference].astype(np.float32)
            if d.drop_image:
                states, ref = layout.unconditional(states), layout.unconditional(ref)
            ips.append(np.broadcast_to(states, (frames,) + states.shape))
            if normals:
                ref = np.concatenate([ref, dataset.normal_latents[d.subject][d.reference].astype(np.float32)])
            refs.append(ref)
    return Batch(
        x=np.ascontiguousarray(np.concatenate(xs)),
        timesteps=np.concatenate(ts),
        context=np.ascontiguousarray(np.concatenate(ctx), dtype=np.float32),
        camera=np.concatenate(cams).astype(np.float32),
        ip=np.ascontiguousarray(np.concatenate(ips), dtype=np.float32) if image_conditioned else None,
        ip_img=np.stack(refs) if image_conditioned else None,
        target=np.stack(targets),
        num_frames=frames,
        views=views,
    )
