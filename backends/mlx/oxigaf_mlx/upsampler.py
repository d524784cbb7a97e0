"""The sd-x2 latent upscaler's K-UNet (diffusers ``UNet2DConditionModel`` with K-blocks) in MLX.

NCHW at the interface, NHWC inside. The module tree mirrors diffusers' names (``conv_in``,
``time_proj``, ``time_embedding``, ``down_blocks.i.resnets.j`` / ``.attentions.j``, ``up_blocks``,
``conv_out``), so the published safetensors names are the parameter names and loading is strict.
Widths come from ``oxigaf.upsampler.kunet_plan``, which encodes diffusers' rules for them.

Numerics follow diffusers: Fourier time features in float32, GroupNorm / LayerNorm in float32,
attention softmax in float32 (``common.attention``). The blur resamplers apply the fixed
[1, 3, 3, 1]/8 kernel separably (rows, then columns) after reflect padding; the transposed blur
of ``KUpsample2D`` is written in its two output phases.
"""

from __future__ import annotations

import math
import os

import mlx.core as mx
import mlx.nn as nn

from oxigaf.checkpoints import load_state
from oxigaf.config import UpsamplerUNetConfig, check_load_options
from oxigaf.errors import InputError
from oxigaf.upsampler import AttentionPlan, BlockPlan, KUNetPlan, ResnetPlan, kunet_plan

from . import common
from .common import ResnetSkeleton, attention, group_norm, merge_heads, norm32, sinusoids, split_heads

_ACTIVATIONS = {"gelu": nn.gelu, "silu": nn.silu, "swish": nn.silu, "relu": nn.relu}


def _activation(name: str | None):
    return None if name is None else _ACTIVATIONS[name]


def _slice(x: mx.array, axis: int, start: int, stop: int, step: int = 1) -> mx.array:
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, stop, step)
    return x[tuple(index)]


def _reflect_pad1(x: mx.array, axis: int) -> mx.array:
    pads = [(0, 0)] * x.ndim
    pads[axis] = (1, 1)
    return mx.pad(x, pads, mode="reflect")


def k_downsample(x: mx.array) -> mx.array:
    """``KDownsample2D`` on NHWC: reflect-pad 1, [1,3,3,1]/8 blur, stride 2, along H then W."""
    for axis in (1, 2):
        n = x.shape[axis]
        p = _reflect_pad1(x, axis)
        x = (_slice(p, axis, 0, n, 2) * (1 / 8) + _slice(p, axis, 1, n + 1, 2) * (3 / 8)
             + _slice(p, axis, 2, n + 2, 2) * (3 / 8) + _slice(p, axis, 3, n + 3, 2) * (1 / 8))
    return x


def k_upsample(x: mx.array) -> mx.array:
    """``KUpsample2D`` on NHWC: reflect-pad 1, then the stride-2 transposed blur with kernel
    [1,3,3,1]/4 and padding 3, whose even outputs are ¼·x[m−1] + ¾·x[m] and odd outputs
    ¾·x[m] + ¼·x[m+1] (indices into the padded input shifted by one)."""
    for axis in (1, 2):
        n = x.shape[axis]
        p = _reflect_pad1(x, axis)
        centre = _slice(p, axis, 1, n + 1)
        even = _slice(p, axis, 0, n) * 0.25 + centre * 0.75
        odd = centre * 0.75 + _slice(p, axis, 2, n + 2) * 0.25
        shape = list(x.shape)
        shape[axis] = 2 * n
        x = mx.stack([even, odd], axis=axis + 1).reshape(shape)
    return x


# --------------------------------------------------------------------------- time


class GaussianFourierProjection(nn.Module):
    """Stored random frequencies W: features [cos, sin](2π·t·W) (``flip_sin_to_cos``), no log."""

    def __init__(self, size: int, flip_sin_to_cos: bool):
        super().__init__()
        self.weight = mx.zeros((size,))
        self.flip_sin_to_cos = flip_sin_to_cos

    def __call__(self, t: mx.array) -> mx.array:
        proj = t.astype(mx.float32)[:, None] * self.weight.astype(mx.float32)[None, :] * 2 * math.pi
        return sinusoids(proj, self.flip_sin_to_cos)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int, cond_dim: int | None, act: str, post_act: str | None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        if cond_dim is not None:
            # Bias-free projection of the timestep condition, added to the Fourier features.
            self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False)
        self.has_cond = cond_dim is not None
        self.act = _activation(act)
        self.linear_2 = nn.Linear(dim, dim)
        self.post_act = _activation(post_act)

    def __call__(self, x: mx.array, cond: mx.array | None) -> mx.array:
        if cond is not None:
            if not self.has_cond:
                raise InputError("this UNet has no timestep condition (time_cond_proj_dim is null)")
            x = x + self.cond_proj(cond)
        x = self.linear_2(self.act(self.linear_1(x)))
        return self.post_act(x) if self.post_act is not None else x


# --------------------------------------------------------------------------- blocks


class AdaGroupNorm(nn.Module):
    """GroupNorm without affine parameters, then ·(1 + scale) + shift from a Linear of the embedding."""

    def __init__(self, emb_dim: int, channels: int, groups: int, eps: float):
        super().__init__()
        self.norm = group_norm(groups, channels, eps, affine=False)
        self.linear = nn.Linear(emb_dim, 2 * channels)

    def __call__(self, x: mx.array, emb: mx.array) -> mx.array:
        scale, shift = mx.split(self.linear(emb)[:, None, None, :], 2, axis=-1)
        return norm32(self.norm, x) * (1 + scale) + shift


class ResnetBlockCondNorm2D(ResnetSkeleton):
    """The resnet with AdaGroupNorms: ``resnet(x, emb)``."""

    def __init__(self, p: ResnetPlan, emb_dim: int, eps: float, act: str):
        super().__init__()
        self.norm1 = AdaGroupNorm(emb_dim, p.in_channels, p.groups, eps)
        self.conv1 = nn.Conv2d(p.in_channels, p.mid_channels, 3, padding=1)
        self.norm2 = AdaGroupNorm(emb_dim, p.mid_channels, p.groups_out, eps)
        self.conv2 = nn.Conv2d(p.mid_channels, p.out_channels, 3, padding=1)
        self.act = _activation(act)
        if p.shortcut:
            self.conv_shortcut = nn.Conv2d(p.in_channels, p.out_channels, 1, bias=False)


class Attention(nn.Module):
    """diffusers ``Attention`` with biased q/k/v; cross-attention LayerNorms the context first."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.cross = context_dim is not None
        if self.cross:
            self.norm_cross = nn.LayerNorm(context_dim, eps=1e-5)
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(kv_dim, inner)
        self.to_v = nn.Linear(kv_dim, inner)
        self.to_out = [nn.Linear(inner, dim)]

    def __call__(self, x: mx.array, context: mx.array | None, mode: str, chunk_size: int) -> mx.array:
        if context is None:
            context = x
        elif self.cross:
            context = norm32(self.norm_cross, context)
        q = split_heads(self.to_q(x), self.heads)
        k = split_heads(self.to_k(context), self.heads)
        v = split_heads(self.to_v(context), self.heads)
        return self.to_out[0](merge_heads(attention(q, k, v, mode, chunk_size=chunk_size)))


class KAttentionBlock(nn.Module):
    """Residual self-attention (deepest blocks only) then residual cross-attention, each after an
    AdaGroupNorm; no feed-forward."""

    def __init__(self, p: AttentionPlan, emb_dim: int, context_dim: int):
        super().__init__()
        self.self_attention = p.self_attention
        if p.self_attention:
            self.norm1 = AdaGroupNorm(emb_dim, p.dim, p.groups, 1e-5)
            self.attn1 = Attention(p.dim, p.heads, p.head_dim, None)
        self.norm2 = AdaGroupNorm(emb_dim, p.dim, p.groups, 1e-5)
        self.attn2 = Attention(p.dim, p.heads, p.head_dim, context_dim)

    @staticmethod
    def _attend(attn: Attention, x: mx.array, context, mode: str, chunk_size: int) -> mx.array:
        b, h, w, c = x.shape
        # NHWC flattened row-major is PyTorch's (B, H·W, C) token order.
        return attn(x.reshape(b, h * w, c), context, mode, chunk_size).reshape(b, h, w, -1)

    def __call__(self, x, emb, context, mode: str, chunk_size: int) -> mx.array:
        if self.self_attention:
            x = self._attend(self.attn1, self.norm1(x, emb), None, mode, chunk_size) + x
        return self._attend(self.attn2, self.norm2(x, emb), context, mode, chunk_size) + x


class KDownsample2D(nn.Module):
    def __call__(self, x):
        return k_downsample(x)


class KUpsample2D(nn.Module):
    def __call__(self, x):
        return k_upsample(x)


class KBlock(nn.Module):
    """One of ``KDownBlock2D`` / ``KCrossAttnDownBlock2D`` / ``KUpBlock2D`` / ``KCrossAttnUpBlock2D``:
    resnets, each followed by its attention block where the type has them, then the resampler."""

    def __init__(self, p: BlockPlan, plan: KUNetPlan, up: bool):
        super().__init__()
        self.emits_skips = p.emits_skips
        self.resnets = [ResnetBlockCondNorm2D(r, plan.time_embed_dim, plan.eps, plan.act_fn) for r in p.resnets]
        if p.attentions:
            self.attentions = [KAttentionBlock(a, plan.time_embed_dim, plan.cross_attention_dim)
                               for a in p.attentions]
        self.has_attention = bool(p.attentions)
        # Named as diffusers names them (they hold no weights).
        self.samplers_name = "upsamplers" if up else "downsamplers"
        setattr(self, self.samplers_name, [KUpsample2D() if up else KDownsample2D()] if p.resample else [])

    def __call__(self, x, emb, context, mode: str, chunk_size: int):
        """(output, the skip connections this block emits: one per resnet, None where absent)."""
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            if self.has_attention:
                x = self.attentions[j](x, emb, context, mode, chunk_size)
            skips.append(x if self.emits_skips else None)
        for sampler in getattr(self, self.samplers_name):
            x = sampler(x)
        return x, skips


# --------------------------------------------------------------------------- model


class UpsamplerUNet(nn.Module):
    """``unet(sample, timestep, encoder_hidden_states, timestep_cond=None) -> out`` (NCHW)."""

    def __init__(self, config: UpsamplerUNetConfig):
        super().__init__()
        p = kunet_plan(config)
        self.config = config
        self.kplan = p
        self.conv_in = nn.Conv2d(p.in_channels, p.conv_in_channels, p.conv_in_kernel,
                                 padding=(p.conv_in_kernel - 1) // 2)
        self.time_proj = GaussianFourierProjection(p.fourier_size, p.flip_sin_to_cos)
        self.time_embedding = TimestepEmbedding(p.time_embed_dim, p.time_embed_dim, p.cond_dim, p.act_fn,
                                                p.post_act_fn)
        self.down_blocks = [KBlock(b, p, up=False) for b in p.down]
        self.up_blocks = [KBlock(b, p, up=True) for b in p.up]
        self.conv_out = nn.Conv2d(p.conv_in_channels, p.out_channels, p.conv_out_kernel,
                                  padding=(p.conv_out_kernel - 1) // 2)
        self.attention = "auto"
        self.chunk_size = 1024

    @property
    def dtype(self) -> mx.Dtype:
        return self.conv_in.weight.dtype

    def _as(self, t, name: str) -> mx.array:
        return common.as_float_input(t, name, self.dtype)

    def __call__(self, sample, timestep, encoder_hidden_states, timestep_cond=None, *,
                 attention: str | None = None) -> mx.array:
        """Model output (B, out_channels, H, W), NCHW, in the dtype of ``sample``.

        - ``sample`` (B, in_channels, H, W), H and W multiples of 2^(number of downsamplers);
        - ``timestep`` a float or a (B,) / scalar array (the pipeline passes 0.25·ln σ);
        - ``encoder_hidden_states`` (B, L, cross_attention_dim);
        - ``timestep_cond`` (B, time_cond_proj_dim) or None.
        """
        p = self.kplan
        out_dtype = sample.dtype if isinstance(sample, mx.array) and mx.issubdtype(sample.dtype, mx.floating) \
            else self.dtype
        x = self._as(sample, "sample")
        cond = None if timestep_cond is None else self._as(timestep_cond, "timestep_cond")
        p.check_call(tuple(x.shape), None if cond is None else tuple(cond.shape))
        b = x.shape[0]
        t = common.per_item(timestep, b, "timestep", float32=True)
        context = self._as(encoder_hidden_states, "encoder_hidden_states")
        context = common.check_tokens(context, b, p.cross_attention_dim, "encoder_hidden_states")
        mode = common.resolve_attention(self.attention if attention is None else attention)

        emb = self.time_embedding(self.time_proj(t).astype(self.dtype), cond)
        x = self.conv_in(common.nchw_to_nhwc(x))
        skips = [x]
        for block in self.down_blocks:
            x, emitted = block(x, emb, context, mode, self.chunk_size)
            skips += emitted
        for block in self.up_blocks:
            # As diffusers: each up block consumes as many skips as it has resnets and concatenates
            # only the last of them (none at all when that one is absent).
            n = len(block.resnets)
            taken, skips = skips[-n:], skips[:-n]
            if taken[-1] is not None:
                x = mx.concatenate([x, taken[-1]], axis=-1)
            x, _ = block(x, emb, context, mode, self.chunk_size)
        return common.nhwc_to_nchw(self.conv_out(x)).astype(out_dtype)


def load_upsampler_unet(folder: str | os.PathLike, *, dtype: str = "float32", attention: str = "auto",
                        chunk_size: int = 1024) -> UpsamplerUNet:
    """Build the K-UNet described by ``folder/config.json`` and load its weights strictly."""
    check_load_options(dtype, attention, chunk_size)
    config = UpsamplerUNetConfig.from_folder(folder)
    return common.load_model(lambda: UpsamplerUNet(config), load_state(folder), str(folder), dtype=dtype,
                             attention=attention, chunk_size=chunk_size)
