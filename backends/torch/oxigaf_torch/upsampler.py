"""The sd-x2 latent upscaler's K-UNet (diffusers ``UNet2DConditionModel`` with K-blocks) in PyTorch, NCHW.

The module tree mirrors diffusers' names (``conv_in``, ``time_proj``, ``time_embedding``,
``down_blocks.i.resnets.j`` / ``.attentions.j``, ``up_blocks``, ``conv_out``), so the published
safetensors names are the parameter names and loading is strict. Widths come from
``oxigaf.upsampler.kunet_plan``, which encodes diffusers' rules for them.

Numerics follow diffusers: Fourier time features in float32, GroupNorm / LayerNorm in float32,
attention softmax in float32 (``common.attention``). The blur resamplers use the fixed separable
[1, 3, 3, 1]/8 kernel as depthwise convolutions after reflect padding.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from oxigaf.checkpoints import load_state
from oxigaf.config import UpsamplerUNetConfig, check_load_options
from oxigaf.errors import InputError
from oxigaf.upsampler import AttentionPlan, BlockPlan, KUNetPlan, ResnetPlan, kunet_plan

from . import common
from .common import LayerNorm32, ResnetSkeleton, attention, merge_heads, sinusoids, split_heads

_BLUR_1D = (1 / 8, 3 / 8, 3 / 8, 1 / 8)


def _activation(name: str | None) -> nn.Module | None:
    if name is None:
        return None
    return {"gelu": nn.GELU(), "silu": nn.SiLU(), "swish": nn.SiLU(), "relu": nn.ReLU()}[name]


def _blur_kernel(channels: int, gain: float, like: torch.Tensor) -> torch.Tensor:
    k = torch.tensor(_BLUR_1D, dtype=torch.float32, device=like.device) * gain
    return (k[:, None] * k[None, :]).expand(channels, 1, 4, 4).to(like.dtype)


def k_downsample(x: torch.Tensor) -> torch.Tensor:
    """``KDownsample2D``: reflect-pad 1, per-channel [1,3,3,1]/8 blur, stride 2 (H×W → H/2×W/2)."""
    x = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return F.conv2d(x, _blur_kernel(x.shape[1], 1.0, x), stride=2, groups=x.shape[1])


def k_upsample(x: torch.Tensor) -> torch.Tensor:
    """``KUpsample2D``: reflect-pad 1, per-channel transposed blur (kernel ×2), stride 2, padding 3."""
    x = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return F.conv_transpose2d(x, _blur_kernel(x.shape[1], 2.0, x), stride=2, padding=3, groups=x.shape[1])


# --------------------------------------------------------------------------- time


class GaussianFourierProjection(nn.Module):
    """Stored random frequencies W: features [cos, sin](2π·t·W) (``flip_sin_to_cos``), no log."""

    def __init__(self, size: int, flip_sin_to_cos: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)
        self.flip_sin_to_cos = flip_sin_to_cos

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return sinusoids(t.float()[:, None] * self.weight.float()[None, :] * 2 * math.pi, self.flip_sin_to_cos)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int, cond_dim: int | None, act: str, post_act: str | None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        # Bias-free projection of the timestep condition, added to the Fourier features.
        self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False) if cond_dim is not None else None
        self.act = _activation(act)
        self.linear_2 = nn.Linear(dim, dim)
        self.post_act = _activation(post_act)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is not None:
            if self.cond_proj is None:
                raise InputError("this UNet has no timestep condition (time_cond_proj_dim is null)")
            x = x + self.cond_proj(cond)
        x = self.linear_2(self.act(self.linear_1(x)))
        return self.post_act(x) if self.post_act is not None else x


# --------------------------------------------------------------------------- blocks


class AdaGroupNorm(nn.Module):
    """GroupNorm without affine parameters, then ·(1 + scale) + shift from a Linear of the embedding."""

    def __init__(self, emb_dim: int, channels: int, groups: int, eps: float):
        super().__init__()
        self.groups = groups
        self.eps = eps
        self.linear = nn.Linear(emb_dim, 2 * channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(emb)[:, :, None, None].chunk(2, dim=1)
        x = F.group_norm(x.float(), self.groups, eps=self.eps).to(x.dtype)
        return x * (1 + scale) + shift


class ResnetBlockCondNorm2D(ResnetSkeleton):
    """The resnet with AdaGroupNorms: ``resnet(x, emb)``."""

    def __init__(self, p: ResnetPlan, emb_dim: int, eps: float, act: str):
        super().__init__()
        self.norm1 = AdaGroupNorm(emb_dim, p.in_channels, p.groups, eps)
        self.conv1 = nn.Conv2d(p.in_channels, p.mid_channels, 3, padding=1)
        self.norm2 = AdaGroupNorm(emb_dim, p.mid_channels, p.groups_out, eps)
        self.conv2 = nn.Conv2d(p.mid_channels, p.out_channels, 3, padding=1)
        self.act = _activation(act)
        self.conv_shortcut = nn.Conv2d(p.in_channels, p.out_channels, 1, bias=False) if p.shortcut else None


class Attention(nn.Module):
    """diffusers ``Attention`` with biased q/k/v; cross-attention LayerNorms the context first."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm_cross = LayerNorm32(context_dim) if context_dim is not None else None
        kv_dim = dim if context_dim is None else context_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(kv_dim, inner)
        self.to_v = nn.Linear(kv_dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, mode: str, chunk_size: int) -> torch.Tensor:
        if context is None:
            context = x
        elif self.norm_cross is not None:
            context = self.norm_cross(context)
        q = split_heads(self.to_q(x), self.heads)
        k = split_heads(self.to_k(context), self.heads)
        v = split_heads(self.to_v(context), self.heads)
        return self.to_out[0](merge_heads(attention(q, k, v, mode, chunk_size=chunk_size)))


class KAttentionBlock(nn.Module):
    """Residual self-attention (deepest blocks only) then residual cross-attention, each after an
    AdaGroupNorm; no feed-forward."""

    def __init__(self, p: AttentionPlan, emb_dim: int, context_dim: int):
        super().__init__()
        if p.self_attention:
            self.norm1 = AdaGroupNorm(emb_dim, p.dim, p.groups, 1e-5)
            self.attn1 = Attention(p.dim, p.heads, p.head_dim, None)
        else:
            self.norm1 = self.attn1 = None
        self.norm2 = AdaGroupNorm(emb_dim, p.dim, p.groups, 1e-5)
        self.attn2 = Attention(p.dim, p.heads, p.head_dim, context_dim)

    def _attend(self, attn: Attention, x: torch.Tensor, context, mode: str, chunk_size: int) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        out = attn(tokens, context, mode, chunk_size)
        return out.permute(0, 2, 1).reshape(b, -1, h, w)

    def forward(self, x, emb, context, mode: str, chunk_size: int) -> torch.Tensor:
        if self.attn1 is not None:
            x = self._attend(self.attn1, self.norm1(x, emb), None, mode, chunk_size) + x
        return self._attend(self.attn2, self.norm2(x, emb), context, mode, chunk_size) + x


class KDownsample2D(nn.Module):
    def forward(self, x):
        return k_downsample(x)


class KUpsample2D(nn.Module):
    def forward(self, x):
        return k_upsample(x)


class KBlock(nn.Module):
    """One of ``KDownBlock2D`` / ``KCrossAttnDownBlock2D`` / ``KUpBlock2D`` / ``KCrossAttnUpBlock2D``:
    resnets, each followed by its attention block where the type has them, then the resampler."""

    def __init__(self, p: BlockPlan, plan: KUNetPlan, up: bool):
        super().__init__()
        self.plan = p
        self.resnets = nn.ModuleList(ResnetBlockCondNorm2D(r, plan.time_embed_dim, plan.eps, plan.act_fn)
                                     for r in p.resnets)
        if p.attentions:
            self.attentions = nn.ModuleList(KAttentionBlock(a, plan.time_embed_dim, plan.cross_attention_dim)
                                            for a in p.attentions)
        else:
            self.attentions = None
        self.up = up
        sampler = nn.ModuleList([KUpsample2D() if up else KDownsample2D()]) if p.resample else None
        if up:
            self.upsamplers = sampler
        else:
            self.downsamplers = sampler

    def forward(self, x, emb, context, mode: str, chunk_size: int):
        """(output, the skip connections this block emits: one per resnet, None where absent)."""
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            if self.attentions is not None:
                x = self.attentions[j](x, emb, context, mode, chunk_size)
            skips.append(x if self.plan.emits_skips else None)
        for sampler in (self.upsamplers if self.up else self.downsamplers) or ():
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
        self.down_blocks = nn.ModuleList(KBlock(b, p, up=False) for b in p.down)
        self.up_blocks = nn.ModuleList(KBlock(b, p, up=True) for b in p.up)
        self.conv_out = nn.Conv2d(p.conv_in_channels, p.out_channels, p.conv_out_kernel,
                               padding=(p.conv_out_kernel - 1) // 2)
        self.attention = "auto"
        self.chunk_size = 1024

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def _as(self, t, name: str) -> torch.Tensor:
        return common.as_float_input(t, name, self.dtype, self.device)

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, *,
                attention: str | None = None) -> torch.Tensor:
        """Model output (B, out_channels, H, W) in the dtype of ``sample``.

        - ``sample`` (B, in_channels, H, W), H and W multiples of 2^(number of downsamplers);
        - ``timestep`` a float or a (B,) / scalar tensor (the pipeline passes 0.25·ln σ);
        - ``encoder_hidden_states`` (B, L, cross_attention_dim);
        - ``timestep_cond`` (B, time_cond_proj_dim) or None.
        """
        out_dtype = sample.dtype if isinstance(sample, torch.Tensor) and sample.is_floating_point() else self.dtype
        p = self.kplan
        x = self._as(sample, "sample")
        cond = None if timestep_cond is None else self._as(timestep_cond, "timestep_cond")
        p.check_call(tuple(x.shape), None if cond is None else tuple(cond.shape))
        b = x.shape[0]
        t = common.per_item(timestep, b, "timestep", self.device, float32=True)
        context = self._as(encoder_hidden_states, "encoder_hidden_states")
        context = common.check_tokens(context, b, p.cross_attention_dim, "encoder_hidden_states")
        mode = common.resolve_attention(self.attention if attention is None else attention, self.device)

        emb = self.time_embedding(self.time_proj(t).to(self.dtype), cond)
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, emitted = block(x, emb, context, mode, self.chunk_size)
            skips += emitted
        for block in self.up_blocks:
            # As diffusers: each up block consumes as many skips as it has resnets and concatenates
            # only the last of them (none at all when that one is absent).
            taken = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            if taken[-1] is not None:
                x = torch.cat([x, taken[-1]], dim=1)
            x, _ = block(x, emb, context, mode, self.chunk_size)
        return self.conv_out(x).to(out_dtype)


def load_upsampler_unet(folder: str | os.PathLike, *, dtype: str = "float32", device: str | torch.device = "cpu",
                        attention: str = "auto", chunk_size: int = 1024, fast: bool | None = None,
                        **speed) -> UpsamplerUNet:
    """Build the K-UNet described by ``folder/config.json`` and load its weights strictly.
    ``fast`` (None: on unless ``OXIGAF_TORCH_FAST=0``): the inference speed-ups of
    ``oxigaf_torch.fast.models.speed_up_upsampler``, which takes the options in ``speed``."""
    from . import fast as speedups

    check_load_options(dtype, attention, chunk_size)
    config = UpsamplerUNetConfig.from_folder(folder)
    model = common.load_model(lambda: UpsamplerUNet(config), load_state(folder), str(folder), dtype=dtype,
                              device=device, attention=attention, chunk_size=chunk_size)
    return speedups.apply(model, fast, **speed)
