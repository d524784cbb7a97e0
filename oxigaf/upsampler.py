"""The 2× latent upsampler (stabilityai/sd-x2-latent-upscaler) and a weight-free bilinear fallback.

``LatentUpsampler`` runs diffusers' ``StableDiffusionLatentUpscalePipeline`` loop on any backend:
scaled SD latents (B, 4, h, w) in, scaled latents (B, 4, 2h, 2w) out. The model is a K-diffusion
UNet that predicts the denoised sample directly; the loop wraps it in Karras et al.'s
preconditioning and steps with Euler.

This module also holds the K-UNet's architecture plan (``kunet_plan``): diffusers derives every
block's channel counts from the config with a few non-obvious rules (which up block gets
self-attention, which resnet changes width, which skips exist), and both backends build their
module trees from this one plan so the rules live in one place.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoints import resolve_model
from .config import UpsamplerUNetConfig, check_positive_int
from .errors import ConfigError, InputError, ModelLoadError

# diffusers' K-blocks hard-code GroupNorm groups as channels // 32 (resnets and attention norms).
K_GROUP_SIZE = 32
# The pipeline's timestep condition starts with a 128-wide noise-level embedding (64 ones, 64 zeros:
# noise level 0) before the pooled text feature.
NOISE_LEVEL_EMBED = 128

DOWN_TYPES = ("KDownBlock2D", "KCrossAttnDownBlock2D")
UP_TYPES = ("KUpBlock2D", "KCrossAttnUpBlock2D")
ACTIVATIONS = ("gelu", "silu", "swish", "relu")

_HUB_FILES = [
    "model_index.json",
    "unet/*.json", "unet/*.safetensors",
    "text_encoder/*.json", "text_encoder/*.safetensors",
    "tokenizer/*", "scheduler/*",
]


# --------------------------------------------------------------------------- architecture plan


@dataclass(frozen=True)
class ResnetPlan:
    """``ResnetBlockCondNorm2D`` with AdaGroupNorm: in → conv1 → mid → conv2 → out."""

    in_channels: int
    mid_channels: int
    out_channels: int
    groups: int
    groups_out: int

    @property
    def shortcut(self) -> bool:
        return self.in_channels != self.out_channels


@dataclass(frozen=True)
class AttentionPlan:
    """``KAttentionBlock``: optional self-attention (attn1) then cross-attention (attn2)."""

    dim: int
    heads: int
    head_dim: int
    self_attention: bool

    @property
    def groups(self) -> int:
        return max(1, self.dim // K_GROUP_SIZE)


@dataclass(frozen=True)
class BlockPlan:
    type: str
    resnets: tuple[ResnetPlan, ...]
    attentions: tuple[AttentionPlan, ...]  # empty for KDownBlock2D / KUpBlock2D
    resample: bool  # KDownsample2D after a down block, KUpsample2D after an up block
    emits_skips: bool  # down blocks only: a cross-attention block without downsampler emits None


@dataclass(frozen=True)
class KUNetPlan:
    in_channels: int
    out_channels: int
    conv_in_channels: int
    conv_in_kernel: int
    conv_out_kernel: int
    fourier_size: int  # time_proj.weight length; features are 2× that
    time_embed_dim: int
    cond_dim: int | None
    cross_attention_dim: int
    act_fn: str
    post_act_fn: str | None
    eps: float
    flip_sin_to_cos: bool
    down: tuple[BlockPlan, ...]
    up: tuple[BlockPlan, ...]

    @property
    def downsamplings(self) -> int:
        return sum(b.resample for b in self.down)

    def check_call(self, sample: tuple, timestep_cond: tuple | None) -> None:
        """The shapes of a K-UNet call's ``sample`` (B, in_channels, H, W), H and W multiples of
        2^downsamplings and at least twice that, and ``timestep_cond`` (B, cond_dim) or None."""
        if len(sample) != 4 or sample[1] != self.in_channels:
            raise InputError(f"sample must be (B, {self.in_channels}, H, W); got {tuple(sample)}")
        b, _, h, w = sample
        factor = 1 << self.downsamplings
        if h % factor or w % factor or min(h, w) // factor < 2:
            raise InputError(f"sample height and width must be multiples of {factor} and at least {2 * factor}; "
                             f"got {h}x{w}")
        if timestep_cond is not None and tuple(timestep_cond) != (b, self.cond_dim):
            raise InputError(f"timestep_cond must be ({b}, {self.cond_dim}); got {tuple(timestep_cond)}")


def _groups(channels: int, where: str) -> int:
    if channels < K_GROUP_SIZE:
        raise ModelLoadError(f"{where}: K-UNet blocks need at least {K_GROUP_SIZE} channels; got {channels}")
    return channels // K_GROUP_SIZE


def kunet_plan(config: UpsamplerUNetConfig) -> KUNetPlan:
    """Every block's widths as diffusers' ``UNet2DConditionModel`` derives them for the K-blocks."""
    where = config.source or "upsampler config"
    c = config
    if c.time_embedding_type != "fourier":
        raise ModelLoadError(f"{where}: only time_embedding_type 'fourier' (K-UNet) is supported")
    if c.mid_block_type is not None:
        raise ModelLoadError(f"{where}: the K-UNet has no mid block; got mid_block_type {c.mid_block_type!r}")
    if c.norm_num_groups is not None:
        raise ModelLoadError(f"{where}: the K-UNet has no output GroupNorm; norm_num_groups must be null")
    for name in ("act_fn", "timestep_post_act"):
        value = getattr(c, name)
        if value is not None and value not in ACTIVATIONS:
            raise ModelLoadError(f"{where}: unsupported {name} {value!r}")
    ch = tuple(c.block_out_channels)
    n = len(ch)
    if not n or len(c.down_block_types) != n or len(c.up_block_types) != n:
        raise ModelLoadError(f"{where}: block_out_channels, down_block_types and up_block_types must have "
                             "the same non-zero length")
    for t in c.down_block_types:
        if t not in DOWN_TYPES:
            raise ModelLoadError(f"{where}: unsupported down block {t!r} (K-UNet: {', '.join(DOWN_TYPES)})")
    for t in c.up_block_types:
        if t not in UP_TYPES:
            raise ModelLoadError(f"{where}: unsupported up block {t!r} (K-UNet: {', '.join(UP_TYPES)})")
    for k in (c.conv_in_kernel, c.conv_out_kernel):
        if k % 2 == 0:
            raise ModelLoadError(f"{where}: conv kernels must be odd; got {k}")
    hd = c.attention_head_dim
    layers = c.layers_per_block
    temb = c.time_embedding_dim or 2 * ch[0]
    if temb % 2:
        raise ModelLoadError(f"{where}: the time embedding width must be even; got {temb}")

    def attn(dim: int, self_attention: bool) -> AttentionPlan:
        if dim % hd:
            raise ModelLoadError(f"{where}: attention width {dim} is not a multiple of attention_head_dim {hd}")
        return AttentionPlan(dim, dim // hd, hd, self_attention)

    down = []
    for i, t in enumerate(c.down_block_types):
        cin, cout = ch[max(i - 1, 0)], ch[i]
        resample = i != n - 1
        resnets = tuple(
            ResnetPlan(cin if j == 0 else cout, cout, cout, _groups(cin if j == 0 else cout, where),
                       _groups(cout, where))
            for j in range(layers)
        )
        if t == "KDownBlock2D":
            down.append(BlockPlan(t, resnets, (), resample, True))
        else:
            # Only the deepest block (no downsampler) adds self-attention.
            down.append(BlockPlan(t, resnets, tuple(attn(cout, not resample) for _ in range(layers)),
                                  resample, resample))

    rch = ch[::-1]
    up = []
    for i, t in enumerate(c.up_block_types):
        cout, cin = rch[i], rch[min(i + 1, n - 1)]
        resample = i != n - 1
        k_out = cin
        if t == "KUpBlock2D":
            k_in = 2 * cout
            resnets = tuple(
                ResnetPlan(k_in if j == 0 else cout, k_out if j == layers - 1 else cout,
                           k_out if j == layers - 1 else cout,
                           _groups(k_in if j == 0 else cout, where), _groups(cout, where))
                for j in range(layers)
            )
            up.append(BlockPlan(t, resnets, (), resample, False))
            continue
        # diffusers recognises the first (deepest) up block by in == out == time-embedding width: it
        # gets self-attention and no skip concatenation; a block that changes width does so in
        # its last resnet's conv2.
        first = cin == cout == temb
        middle = cin != cout
        k_in = cout if first else 2 * cout
        resnets = tuple(
            ResnetPlan(k_in if j == 0 else cout, cout, k_out if (middle and j == layers - 1) else cout,
                       _groups(k_in if j == 0 else cout, where), _groups(cout, where))
            for j in range(layers)
        )
        attentions = tuple(attn(k_out if j == layers - 1 else cout, first) for j in range(layers))
        up.append(BlockPlan(t, resnets, attentions, resample, False))

    return KUNetPlan(
        in_channels=c.in_channels, out_channels=c.out_channels, conv_in_channels=ch[0],
        conv_in_kernel=c.conv_in_kernel, conv_out_kernel=c.conv_out_kernel,
        fourier_size=temb // 2, time_embed_dim=temb, cond_dim=c.time_cond_proj_dim,
        cross_attention_dim=c.cross_attention_dim, act_fn=c.act_fn, post_act_fn=c.timestep_post_act,
        eps=c.norm_eps, flip_sin_to_cos=c.flip_sin_to_cos, down=tuple(down), up=tuple(up),
    )


# --------------------------------------------------------------------------- helpers


def nearest_upsample_2x(x: np.ndarray) -> np.ndarray:
    """Nearest-neighbour ×2 of an NCHW array (``F.interpolate(mode="nearest", scale_factor=2)``)."""
    return np.repeat(np.repeat(x, 2, axis=2), 2, axis=3)


def bilinear_upsample_2x(x: np.ndarray) -> np.ndarray:
    """Bilinear ×2 of an NCHW array, as ``F.interpolate(mode="bilinear", align_corners=False)``.

    At scale 2 every output pixel sits a quarter pixel from its two nearest inputs, so each axis
    is 3/4 of the near sample plus 1/4 of the far one, with the edge sample repeated.
    """
    x = np.asarray(x, dtype=np.float32)
    for axis in (2, 3):
        n = x.shape[axis]
        prev = np.take(x, np.maximum(np.arange(n) - 1, 0), axis=axis)
        nxt = np.take(x, np.minimum(np.arange(n) + 1, n - 1), axis=axis)
        even = np.float32(0.75) * x + np.float32(0.25) * prev
        odd = np.float32(0.75) * x + np.float32(0.25) * nxt
        x = np.stack([even, odd], axis=axis + 1)
        shape = list(even.shape)
        shape[axis] = 2 * n
        x = x.reshape(shape)
    return x


def _check_latents(latents, to_numpy: Callable | None = None) -> np.ndarray:
    if not isinstance(latents, np.ndarray):
        try:
            latents = to_numpy(latents) if to_numpy is not None else np.asarray(latents)
        except Exception as exc:  # whatever the array type, the message is the same
            raise InputError(f"latents must be an array of shape (B, C, h, w); got {type(latents).__name__}") from exc
    if latents.ndim != 4:
        raise InputError(f"latents must be (B, C, h, w); got shape {latents.shape}")
    if latents.dtype.kind != "f":
        raise InputError(f"latents must be floating point; got {latents.dtype}")
    if not np.isfinite(latents).all():
        raise InputError("latents contain NaN or infinity")
    return latents.astype(np.float32, copy=False)


def _prompts(value, batch: int, name: str) -> list[str]:
    if isinstance(value, str):
        return [value] * batch
    if isinstance(value, Sequence) and all(isinstance(p, str) for p in value):
        if len(value) == batch:
            return list(value)
        if len(value) == 1:
            return list(value) * batch
        raise InputError(f"{name} has {len(value)} entries for a batch of {batch} latents")
    raise InputError(f"{name} must be a string or a list of strings; got {type(value).__name__}")


# --------------------------------------------------------------------------- upsamplers


class BilinearUpsampler:
    """Weight-free ×2 bilinear upsampling of the latents: the fallback without upsampler weights.

    Takes the same arguments as ``LatentUpsampler`` (the diffusion ones are ignored) and returns
    float32 numpy (B, C, 2h, 2w).
    """

    def __call__(self, latents, prompt="", negative_prompt="", num_inference_steps: int = 20,
                 guidance_scale: float = 1.0, noise=None, seed=None, callback=None) -> np.ndarray:
        return bilinear_upsample_2x(_check_latents(latents))

    def __repr__(self):
        return "BilinearUpsampler()"


class LatentUpsampler:
    """stabilityai/sd-x2-latent-upscaler: ``up(latents) -> latents at twice the resolution``.

    Latents are scaled SD latents (as the VAE encoder's mean × scaling_factor, or as a diffusion
    loop leaves them), NCHW, float32 numpy or backend arrays; the result is float32 numpy.
    Build with ``LatentUpsampler.from_pretrained(folder_or_hub_id, backend=...)``.
    """

    def __init__(self, unet, text_encoder, tokenizer, scheduler, backend, unet_config: UpsamplerUNetConfig):
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.backend = backend
        self.config = unet_config
        self.plan = kunet_plan(unet_config)
        self._text_cache: dict[str, tuple] = {}
        self.source: Path | None = None  # the folder from_pretrained read (the run record names it)

    def __repr__(self):
        return f"LatentUpsampler(backend={self.backend!r})"

    @classmethod
    def from_pretrained(cls, folder_or_hub_id: str | os.PathLike, backend="auto", dtype: str = "float32",
                        device: str | None = None, attention: str = "auto") -> LatentUpsampler:
        """Load the upscaler's pipeline folder: ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``."""
        from .plugins import get_backend
        from .schedulers import EulerDiscreteScheduler
        from .tokenizers import CLIPTokenizer

        root = Path(resolve_model(folder_or_hub_id, allow_patterns=_HUB_FILES))
        for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
            if not (root / part).is_dir():
                raise ModelLoadError(f"{root} is not a latent-upscaler folder: {part}/ is missing")
        be = get_backend(backend, device=device, dtype=dtype)
        config = UpsamplerUNetConfig.from_folder(root / "unet")
        unet = be.load_upsampler_unet(root / "unet", dtype=dtype, attention=attention)
        text_encoder = be.load_text_encoder(root / "text_encoder", dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
        scheduler = EulerDiscreteScheduler.from_folder(root / "scheduler")
        upsampler = cls(unet, text_encoder, tokenizer, scheduler, be, config)
        upsampler.source = root
        return upsampler

    # -- text --------------------------------------------------------------------------------

    def _encode(self, text: str):
        """(hidden, pooled) of one prompt, batch 1, as backend arrays; computed once per string."""
        hit = self._text_cache.get(text)
        if hit is None:
            ids = np.asarray(self.tokenizer([text]))
            out = self.text_encoder(self.backend.asarray(ids))
            # The upscaler was trained on the last layer's output *before* CLIP's final LayerNorm.
            hit = (out["hidden_states"][-1], out["pooler_output"])
            self._text_cache[text] = hit
        return hit

    def _conditioning(self, prompts: list[str]):
        be = self.backend
        feats = [self._encode(p) for p in prompts]
        hidden = be.concat([f[0] for f in feats], axis=0)
        pooled = be.concat([f[1] for f in feats], axis=0)
        width = self.plan.cond_dim
        if width is not None and width != NOISE_LEVEL_EMBED + pooled.shape[-1]:
            raise ModelLoadError(
                f"upsampler UNet expects a {width}-wide timestep condition, but the text encoder's pooled "
                f"output is {pooled.shape[-1]} wide (+{NOISE_LEVEL_EMBED} noise-level features)"
            )
        level = np.concatenate([np.ones((len(prompts), 64), np.float32), np.zeros((len(prompts), 64), np.float32)],
                               axis=1)
        cond = be.concat([be.asarray(level), pooled], axis=1)
        return hidden, cond

    def clear_cache(self) -> None:
        """Forget the cached text features."""
        self._text_cache.clear()

    # -- sampling ----------------------------------------------------------------------------

    def __call__(self, latents, prompt="", negative_prompt="", num_inference_steps: int = 20,
                 guidance_scale: float = 1.0, noise=None, seed: int | None = None,
                 callback: Callable | None = None) -> np.ndarray:
        """Upsample scaled latents (B, C, h, w) to (B, C, 2h, 2w), float32 numpy.

        ``guidance_scale`` > 1 runs an unconditional (``negative_prompt``) pass beside the
        conditional one; at 1.0 one pass per step. ``noise`` is the initial (B, C, 2h, 2w) standard
        normal noise (default: ``np.random.default_rng(seed)``). ``callback(step, timestep,
        latents)`` gets numpy latents after every step.
        """
        be = self.backend
        lat = _check_latents(latents, be.to_numpy)
        check_positive_int(num_inference_steps, "num_inference_steps")
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) or \
                not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ConfigError(f"guidance_scale must be a finite number >= 0; got {guidance_scale!r}")
        b, c, h, w = lat.shape
        if 2 * c != self.plan.in_channels:
            raise InputError(f"this upsampler takes {self.plan.in_channels // 2}-channel latents; got {c}")
        factor = 1 << self.plan.downsamplings
        if (2 * h) % factor or (2 * w) % factor or min(2 * h, 2 * w) // factor < 2:
            raise InputError(
                f"latent height and width must be multiples of {max(factor // 2, 1)} and at least {factor}; "
                f"got {h}x{w}"
            )
        shape = (b, c, 2 * h, 2 * w)
        if noise is None:
            noise = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        else:
            noise = np.asarray(noise if isinstance(noise, np.ndarray) else be.to_numpy(noise), dtype=np.float32)
            if noise.shape != shape:
                raise InputError(f"noise must have shape {shape}; got {noise.shape}")

        # As the pipeline: guidance 0 means "no prompt", guidance <= 1 a single conditional pass.
        cfg = guidance_scale > 1.0
        prompts = [""] * b if guidance_scale == 0 else _prompts(prompt, b, "prompt")
        hidden, cond = self._conditioning(prompts)
        image = nearest_upsample_2x(lat)  # noise level 0: the pipeline's 1/sqrt(0²+1) scale is 1
        if cfg:
            neg_hidden, neg_cond = self._conditioning(_prompts(negative_prompt, b, "negative_prompt"))
            hidden = be.concat([neg_hidden, hidden], axis=0)
            cond = be.concat([neg_cond, cond], axis=0)
            image = np.concatenate([image, image], axis=0)
        image_cond = be.asarray(image, dtype="float32")

        sched = self.scheduler
        sched.set_timesteps(num_inference_steps)
        x = be.asarray(noise * np.float32(sched.init_noise_sigma), dtype="float32")
        for i, t in enumerate(np.asarray(sched.timesteps)):
            x_in = be.concat([x, x], axis=0) if cfg else x
            model_in = be.concat([sched.scale_model_input(x_in, i), image_cond], axis=1)
            out = self.unet(model_in, sched.model_timestep(i), hidden, timestep_cond=cond)
            # The last output channel is a variance the pipeline drops; the rest, in Karras et al.'s
            # preconditioning, gives the denoised sample x/(σ²+1) + σ/√(σ²+1)·F(x).
            denoised = x_in * sched.c_skip(i) + out[:, :-1] * sched.c_out(i)
            if cfg:
                uncond, text = denoised[:b], denoised[b:]
                denoised = uncond + (text - uncond) * float(guidance_scale)
            x = sched.step(denoised, i, x)
            be.synchronize(x)  # one evaluation per step keeps MLX's lazy graph to a single UNet pass
            if callback is not None:
                callback(i, float(t), be.to_numpy(x))
        return be.to_numpy(x).astype(np.float32, copy=False)
