"""Pieces every torch model shares: weight loading, inputs, attention, float32 norms, the
sinusoidal time features, the resnet skeleton and the nearest ×2 upsampler. Plain: the CPU
inference speed-ups are applied after loading, from ``oxigaf_torch.fast``."""

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
               device: str | torch.device, attention: str, chunk_size: int) -> nn.Module:
    """``build()`` on the meta device, ``state`` loaded into it strictly (``load_weights``), and
    its call-time defaults set (attention mode, chunk size)."""
    with torch.device("meta"):
        model = build()
    load_weights(model, state, where, dtype=torch_dtype(dtype), device=device)
    model.attention = attention
    model.chunk_size = chunk_size
    return model


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
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        xf = x.float()
        groups = xf.reshape(xf.shape[0], self.num_groups, -1)
        centred = (groups - groups.mean(dim=-1, keepdim=True)).reshape(xf.shape)
        return F.group_norm(centred, self.num_groups, w, b, self.eps).to(x.dtype)


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
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

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
