"""GroupNorm and LayerNorm for inference: ``common.GroupNorm32``'s and ``LayerNorm32``'s numbers
with fewer passes and buffers (``group_norm_act``: the norm and its SiLU in one float32 buffer;
half-precision LayerNorm straight through torch's mixed-type kernel). ``FastGroupNorm`` and
``FastLayerNorm`` take the place of the plain modules after loading (``oxigaf_torch.fast``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..common import GroupNorm32, LayerNorm32
from . import buffers
from .winograd import is_channels_last


def inference() -> bool:
    """Whether this call may take the in-place inference paths: autograd off and no graph being
    compiled (the compiler fuses on its own, and its traces would not survive pointer checks)."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


class FastGroupNorm(GroupNorm32):
    """``GroupNorm32`` that keeps a channels-last map's layout at inference (``group_norm_act``)."""

    def forward(self, x):
        if x.ndim == 4 and is_channels_last(x) and not torch.is_grad_enabled():
            return group_norm_act(self, x, act=False, reuse=False)
        return super().forward(x)


class FastLayerNorm(LayerNorm32):
    """``LayerNorm32``; at inference on the CPU a half-precision ``x`` goes straight to torch's
    mixed-type kernel (float32 statistics and float32 weights, output rounded once): no float32
    copies. (CUDA's kernel refuses mixed input and weight dtypes.)"""

    def forward(self, x):
        if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu" and inference():
            w = self.weight.float() if self.weight is not None else None
            b = self.bias.float() if self.bias is not None else None
            return F.layer_norm(x, self.normalized_shape, w, b, self.eps)
        return super().forward(x)


def norm_act(norm: nn.GroupNorm, x: torch.Tensor, act: bool, reuse: bool = False) -> torch.Tensor:
    """``silu(norm(x))`` (or ``norm(x)``): ``group_norm_act`` at inference, else the module."""
    if inference():
        return group_norm_act(norm, x, act, reuse)
    y = norm(x)
    return F.silu(y) if act else y


def _channel_group_mean(t: torch.Tensor, sdim: int, groups: int) -> torch.Tensor:
    """Per-group mean of a (B, C, S) or (B, S, C) tensor (``sdim`` the spatial axis), as (B, C)
    float32 with each channel holding its group's mean. For a half-precision ``t`` the
    per-channel means are a GEMM with a row of 1/S (faster than ``mean``, which copies all of
    ``t`` to float32 first; means, not sums, which would overflow float16), rounded to ``t``'s
    dtype: as a centring offset (below) that does as well as the exact mean."""
    if t.dtype == torch.float32:
        per_channel = t.mean(sdim, dtype=torch.float32)
    else:
        size = t.shape[sdim]
        weights = torch.full((t.shape[0], 1, size), 1.0 / size, dtype=t.dtype, device=t.device)
        means = torch.bmm(weights, t) if sdim == 1 else torch.bmm(t, weights.transpose(1, 2))
        per_channel = means.flatten(1).float()
    b, c = per_channel.shape
    return per_channel.view(b, groups, c // groups).mean(-1, keepdim=True).expand(b, groups, c // groups).reshape(b, c)


def group_norm_act(norm: nn.GroupNorm, x: torch.Tensor, act: bool, reuse: bool) -> torch.Tensor:
    """``silu(norm(x))`` (or ``norm(x)``) for inference, with ``GroupNorm32``'s numerics: each
    group is centred in float32 first, then ``F.group_norm`` (float32 weights) normalises it, or
    on channels-last maps of ``LARGE_MAP`` positions and more ``_normalise_by_rows``.

    Fewer passes and buffers than the module: the group means come from per-channel means (a
    contiguous reduction in either layout, read straight from a half-precision ``x``), the
    centring writes the float32 buffer that the norm reads (``reuse``: ``x`` is a float32
    intermediate nobody else reads, so it is centred in place; a half-precision ``x`` is
    centred into a kept buffer on the CPU), SiLU runs in place in float32 before the one cast
    back (the module casts, then the reference applies SiLU). The centring offset need not be
    exact: it is there to keep the kernel's E[x²] − E[x]² from cancelling, and the kernel then
    takes the exact mean of what is left.
    """
    b, c, h, w = x.shape
    g = norm.num_groups
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if channels_last:
        t, sdim = x.permute(0, 2, 3, 1).reshape(b, h * w, c), 1
    else:
        t, sdim = x.reshape(b, c, h * w), 2
    mean = _channel_group_mean(t, sdim, g).unsqueeze(sdim)
    if reuse and t.dtype == torch.float32 and t.data_ptr() == x.data_ptr():
        centred = t.sub_(mean)
    elif t.dtype != torch.float32 and buffers.keeps(t):
        centred = torch.sub(t, mean, out=buffers.scratch("centred", t.device, t.shape)[0])
    else:
        centred = torch.sub(t, mean)  # a half-precision t promotes to float32 here
    w32 = norm.weight.float() if norm.weight is not None else None
    b32 = norm.bias.float() if norm.bias is not None else None
    if channels_last and h * w >= LARGE_MAP and not torch.is_grad_enabled():
        y = _normalise_by_rows(centred.view(b, h, w, c), g, w32, b32, norm.eps).permute(0, 3, 1, 2)
    else:
        centred = centred.view(b, h, w, c).permute(0, 3, 1, 2) if channels_last else centred.view(b, c, h, w)
        y = F.group_norm(centred, g, w32, b32, norm.eps)
    if act:
        F.silu(y, inplace=True)
    return y.to(x.dtype)


# From this many positions on, torch's channels-last GroupNorm kernel sums each channel in one
# run and its statistics drift (relative error against float64: 3e-6 for 128 channels at 512x512,
# 1e-6 for 256 at 256x256; NCHW 6e-8), so ``group_norm_act`` takes them by rows instead.
LARGE_MAP = 256 * 256


def _normalise_by_rows(centred: torch.Tensor, groups: int, weight, bias, eps: float) -> torch.Tensor:
    """GroupNorm of a centred (B, H, W, C) float32 map, in place: each channel's sum and sum of
    squares over a row of W first, then over the H rows (as accurate as NCHW's kernel, see
    ``LARGE_MAP``), then one multiply-add per channel."""
    b, h, w, c = centred.shape
    per_group = (b, groups, c // groups)
    s1 = centred.sum(2).sum(1)
    s2 = torch.linalg.vector_norm(centred, dim=2).square_().sum(1)
    count = h * w * (c // groups)
    m1 = s1.view(per_group).sum(-1, keepdim=True) / count
    m2 = s2.view(per_group).sum(-1, keepdim=True) / count
    scale = (m2 - m1.square() + eps).rsqrt().expand(per_group).reshape(b, 1, 1, c)
    if weight is not None:
        scale = scale * weight
    shift = -m1.expand(per_group).reshape(b, 1, 1, c) * scale
    if bias is not None:
        shift = shift + bias
    return centred.mul_(scale).add_(shift)
