"""Pieces every torch model shares: weight loading, inputs, attention, float32 norms, the
sinusoidal time features, the resnet skeleton and the nearest ×2 upsampler."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from oxigaf.checkpoints import check_state
from oxigaf.config import check_attention
from oxigaf.errors import InputError

from . import buffers, winograd
from .winograd import Conv2d

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else TORCH_DTYPES[dtype]


def load_weights(module: nn.Module, state: Mapping[str, np.ndarray], where: str,
                 dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu") -> nn.Module:
    """Strictly load numpy tensors into a module built on the meta device (or anywhere).

    Every parameter and persistent buffer must be in ``state`` with its shape, and nothing
    else may be (``check_state`` names every offender). Tensors are converted to ``dtype``.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_state(expected, {k: tuple(v.shape) for k, v in state.items()}, where)
    dt = torch_dtype(dtype)
    tensors = {}
    for name in expected:
        arr = np.asarray(state[name])
        if arr.dtype.kind == "f":
            t = torch.from_numpy(np.array(arr, dtype=np.float32 if dt != torch.float16 else np.float16))
            tensors[name] = t.to(device=device, dtype=dt)
        else:
            tensors[name] = torch.from_numpy(np.array(arr)).to(device)
    module.load_state_dict(tensors, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def load_model(build: Callable[[], nn.Module], state: Mapping[str, np.ndarray], where: str, *, dtype: str,
               device: str | torch.device, attention: str, chunk_size: int,
               winograd_conv: bool | None = None) -> nn.Module:
    """``build()`` on the meta device, ``state`` loaded into it strictly (``load_weights``), and
    its call-time defaults set: attention, and Winograd convolutions (``winograd.Conv2d``; None:
    on for float32 on the CPU, where they are faster), resolved into ``model.winograd_conv``."""
    with torch.device("meta"):
        model = build()
    load_weights(model, state, where, dtype=torch_dtype(dtype), device=device)
    model.attention = attention
    model.chunk_size = chunk_size
    if winograd_conv is None:
        winograd_conv = torch_dtype(dtype) == torch.float32 and torch.device(device).type == "cpu"
    model.winograd_conv = bool(winograd_conv)
    winograd.enable(model, model.winograd_conv)
    return model


def records_graph(model: nn.Module, *inputs) -> bool:
    """Whether a call of ``model`` on ``inputs`` must record autograd's graph: grad mode is on and
    a parameter or an input tensor requires a gradient. The models' forwards run under
    ``torch.no_grad`` otherwise, and so take their inference paths (in place, kept buffers,
    Winograd and GEMM convolutions) for callers that never asked for gradients but did not turn
    grad mode off either, the pipeline among them: loaded weights are frozen (``load_weights``)."""
    if not torch.is_grad_enabled():
        return False
    return (any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)
            or any(p.requires_grad for p in model.parameters()))


def as_float_input(t, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A model input ``name``: a floating-point torch tensor, moved to the model's device and dtype."""
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a torch tensor; got {type(t).__name__}")
    if not t.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor; got {t.dtype}")
    return t.to(device=device, dtype=dtype)


def per_item(t, n: int, name: str, device: torch.device, float32: bool = False) -> torch.Tensor:
    """One value per batch item, (n,): a scalar is repeated; ``float32`` casts (else the dtype stays)."""
    dtype = torch.float32 if float32 else None
    t = t if isinstance(t, torch.Tensor) else torch.tensor(t, dtype=dtype)
    t = t.to(device=device, dtype=dtype)
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise InputError(f"{name} must be ({n},) or a scalar; got {tuple(t.shape)}")
    return t


def check_tokens(t: torch.Tensor, n: int, dim: int, name: str) -> torch.Tensor:
    """A (n, L, dim) token sequence (text context), else an ``InputError`` naming it."""
    if t.ndim != 3 or t.shape[0] != n or t.shape[2] != dim:
        raise InputError(f"{name} must be ({n}, L, {dim}); got {tuple(t.shape)}")
    return t


def sinusoids(args: torch.Tensor, cos_first: bool = True) -> torch.Tensor:
    """``[cos, sin](args)`` (or ``[sin, cos]``) along the last axis: the time features of both UNets."""
    parts = [torch.cos(args), torch.sin(args)] if cos_first else [torch.sin(args), torch.cos(args)]
    return torch.cat(parts, dim=-1)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``[cos, sin]`` of t·exp(−ln(max_period)·i/half), i < half, always in float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    emb = sinusoids(timesteps.float()[:, None] * freqs[None])
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the activation dtype (as the reference does).

    Each group is centred before ``F.group_norm``: torch's CPU kernel takes the variance as
    E[x²] − E[x]², which cancels catastrophically when a group's mean is large against its
    spread (mean 51, std 0.08 in the reference UNet fixture: 0.3 % off after one norm, 3e-5
    at the UNet's output). Centred, the kernel's variance is exact to float32 rounding.
    """

    def forward(self, x):
        if x.ndim == 4 and winograd.is_channels_last(x) and not torch.is_grad_enabled():
            # the same centring, the layout kept (under autograd the copy below, whose gradient
            # torch knows, and an NCHW result)
            return group_norm_act(self, x, act=False, reuse=False)
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        xf = x.float()
        groups = xf.reshape(xf.shape[0], self.num_groups, -1)
        centred = (groups - groups.mean(dim=-1, keepdim=True)).reshape(xf.shape)
        return F.group_norm(centred, self.num_groups, w, b, self.eps).to(x.dtype)


def _channel_group_mean(t: torch.Tensor, sdim: int, groups: int) -> torch.Tensor:
    """Per-group mean of a (B, C, S) or (B, S, C) tensor (``sdim`` the spatial axis), as (B, C)
    float32 with each channel holding its group's mean. For a half-precision ``t`` the
    per-channel means are a GEMM with a row of 1/S (0.15-0.5x ``mean``'s time on the CPU, which
    copies all of ``t`` to float32 first; means, not sums, which would overflow float16),
    rounded to ``t``'s dtype: as a centring offset (below) that does as well as the exact mean."""
    if t.dtype == torch.float32:
        per_channel = t.mean(sdim, dtype=torch.float32)
    else:
        size = t.shape[sdim]
        weights = torch.full((t.shape[0], 1, size), 1.0 / size, dtype=t.dtype, device=t.device)
        means = torch.bmm(weights, t) if sdim == 1 else torch.bmm(t, weights.transpose(1, 2))
        per_channel = means.flatten(1).float()
    b, c = per_channel.shape
    return per_channel.view(b, groups, c // groups).mean(-1, keepdim=True).expand(b, groups, c // groups).reshape(b, c)


def group_norm_act(norm: GroupNorm32, x: torch.Tensor, act: bool, reuse: bool) -> torch.Tensor:
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
    squares over a row of W first, then over the H rows (7e-8 against float64, as fast as the
    kernel here), then one multiply-add per channel."""
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


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class ResnetSkeleton(nn.Module):
    """``shortcut(x) + conv2(act(norm2(conv1(act(norm1(x, *cond))), *cond)))``: the resnet of the
    VAE and of the upsampler's K-UNet. Subclasses set ``norm1``, ``conv1``, ``norm2``, ``conv2``,
    ``conv_shortcut`` (a module or None) and ``act``, named as their checkpoints name them."""

    def forward(self, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x, *cond)))
        h = self.conv2(self.act(self.norm2(h, *cond)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Upsample(nn.Module):
    """Nearest ×2, then a 3×3 convolution (``conv``): the UNet's and the VAE decoder's upsampler."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads·d) -> (B, heads, N, d)."""
    b, n, _ = t.shape
    return t.reshape(b, n, heads, -1).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads·d)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def resolve_attention(mode: str, device: torch.device | str) -> str:
    """``auto`` is the fused kernel: torch has one on every device (flash / memory-efficient on
    CUDA, a flash kernel on CPU), so it never builds the whole score matrix."""
    check_attention(mode)
    return "sdpa" if mode == "auto" else mode


def attention(q, k, v, mode: str = "sdpa", mask=None, scale: float | None = None, chunk_size: int = 1024):
    """softmax(q kᵀ·scale + mask) v over (B, heads, N, d) tensors.

    - ``sdpa``: ``F.scaled_dot_product_attention`` (fused where torch has a kernel);
    - ``chunked``: query blocks of ``chunk_size``: peak memory O(B·heads·chunk·N);
    - ``naive``: the whole score matrix, softmax in float32 (the baseline).
    ``mask`` is additive and broadcastable to (B, heads, Nq, Nk).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if mode == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if mode == "naive":
        return _attend(q, k, v, mask, scale)
    if mode == "chunked":
        n = q.shape[-2]
        if n <= chunk_size:
            return _attend(q, k, v, mask, scale)
        out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        # one float32 score buffer for every block: a fresh one per block costs its page faults
        # (on a CPU) or allocator traffic again each time
        scratch = None
        if q.dtype == torch.float32:
            lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
            scratch = torch.empty(math.prod(lead) * chunk_size * k.shape[-2], dtype=torch.float32, device=q.device)
        for s in range(0, n, chunk_size):
            m = None if mask is None else mask[..., s:s + chunk_size, :] if mask.shape[-2] > 1 else mask
            out[..., s:s + chunk_size, :] = _attend(q[..., s:s + chunk_size, :], k, v, m, scale, scratch=scratch)
        return out
    raise ValueError(f"unknown attention mode {mode!r}")


def _attend(q, k, v, mask, scale, scratch=None):
    if scratch is not None:  # float32 q: the product goes straight into the caller's buffer
        shape = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]) + (q.shape[-2], k.shape[-2])
        scores = torch.matmul(q, k.transpose(-1, -2), out=scratch[:math.prod(shape)].view(shape))
    else:
        scores = torch.matmul(q, k.transpose(-1, -2))
    scores = scores.float().mul_(scale)
    if mask is not None:
        scores = scores.add_(mask.float())
    probs = _softmax_(scores).to(v.dtype)
    return torch.matmul(probs, v)


# Above this size the score matrix is normalised in place, a block of rows at a time, so the
# whole matrix exists once, not twice (5 frames at 64x64 latents: 2 x 16.8 GB otherwise).
_SOFTMAX_IN_PLACE_BYTES = 64 << 20
# Blocks of contiguous rows this large run as fast as one softmax over the whole matrix here.
_SOFTMAX_BLOCK_BYTES = 16 << 20


def _softmax_(scores: torch.Tensor) -> torch.Tensor:
    """Row softmax of a fresh score matrix; in place when it is large (the same numbers)."""
    size = scores.numel() * scores.element_size()
    if size <= _SOFTMAX_IN_PLACE_BYTES or not scores.is_contiguous():
        return torch.softmax(scores, dim=-1)
    rows = scores.view(-1, scores.shape[-1])
    step = max(1, _SOFTMAX_BLOCK_BYTES // (rows.shape[1] * rows.element_size()))
    for s in range(0, rows.shape[0], step):
        block = rows[s:s + step]
        block.copy_(torch.softmax(block, dim=-1))
    return scores
