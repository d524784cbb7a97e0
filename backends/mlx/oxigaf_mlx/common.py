"""Pieces every MLX model shares: weight loading, inputs, attention, float32 norms, NCHW<->NHWC,
the sinusoidal time features, the resnet skeleton and the nearest ×2 upsampler."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from oxigaf.checkpoints import check_state
from oxigaf.config import check_attention
from oxigaf.errors import InputError

MLX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def mlx_dtype(dtype) -> mx.Dtype:
    return dtype if isinstance(dtype, mx.Dtype) else MLX_DTYPES[dtype]


def load_weights(module: nn.Module, state: Mapping[str, np.ndarray], where: str, dtype="float32") -> nn.Module:
    """Strictly load PyTorch-layout numpy tensors into an MLX module.

    Conv weights are transposed once, (O, I, kH, kW) -> (O, kH, kW, I). The check compares
    names and *PyTorch-layout* shapes, so errors read like the checkpoint.
    """
    params = dict(tree_flatten(module.parameters()))
    expected = {}
    for k, p in params.items():
        shape = tuple(p.shape)
        expected[k] = (shape[0], shape[3], shape[1], shape[2]) if len(shape) == 4 else shape
    check_state(expected, {k: tuple(v.shape) for k, v in state.items()}, where)
    dt = mlx_dtype(dtype)
    weights = []
    for name in params:
        arr = np.asarray(state[name])
        if arr.ndim == 4:
            arr = arr.transpose(0, 2, 3, 1)
        a = mx.array(np.ascontiguousarray(arr, dtype=np.float32) if arr.dtype.kind == "f" else np.array(arr))
        weights.append((name, a.astype(dt) if arr.dtype.kind == "f" else a))
    module.load_weights(weights, strict=True)
    mx.eval(module.parameters())
    module.eval()
    return module


def load_model(build: Callable[[], nn.Module], state: Mapping[str, np.ndarray], where: str, *, dtype: str,
               attention: str, chunk_size: int) -> nn.Module:
    """``build()``, ``state`` loaded into it strictly (``load_weights``), and its call-time
    attention defaults set."""
    model = build()
    load_weights(model, state, where, dtype=mlx_dtype(dtype))
    model.attention = attention
    model.chunk_size = chunk_size
    return model


def as_float_input(t, name: str, dtype: mx.Dtype) -> mx.array:
    """A model input ``name``: a floating-point mx.array (or numpy array), cast to the model's dtype."""
    if isinstance(t, np.ndarray):
        t = mx.array(t)
    if not isinstance(t, mx.array):
        raise InputError(f"{name} must be an mx.array; got {type(t).__name__}")
    if not mx.issubdtype(t.dtype, mx.floating):
        raise InputError(f"{name} must be a floating-point array; got {t.dtype}")
    return t.astype(dtype)


def per_item(t, n: int, name: str, float32: bool = False) -> mx.array:
    """One value per batch item, (n,): a scalar is repeated; ``float32`` casts (else the dtype stays)."""
    if not isinstance(t, mx.array):
        t = mx.array(np.asarray(t, dtype=np.float32) if float32 else np.asarray(t))
    if float32:
        t = t.astype(mx.float32)
    if t.ndim == 0:
        t = mx.broadcast_to(t, (n,))
    if tuple(t.shape) != (n,):
        raise InputError(f"{name} must be ({n},) or a scalar; got {tuple(t.shape)}")
    return t


def check_tokens(t: mx.array, n: int, dim: int, name: str) -> mx.array:
    """A (n, L, dim) token sequence (text context), else an ``InputError`` naming it."""
    if t.ndim != 3 or t.shape[0] != n or t.shape[2] != dim:
        raise InputError(f"{name} must be ({n}, L, {dim}); got {tuple(t.shape)}")
    return t


def sinusoids(args: mx.array, cos_first: bool = True) -> mx.array:
    """``[cos, sin](args)`` (or ``[sin, cos]``) along the last axis: the time features of both UNets."""
    parts = [mx.cos(args), mx.sin(args)] if cos_first else [mx.sin(args), mx.cos(args)]
    return mx.concatenate(parts, axis=-1)


def timestep_embedding(timesteps: mx.array, dim: int, max_period: float = 10000.0) -> mx.array:
    """``[cos, sin]`` of t·exp(−ln(max_period)·i/half), i < half, always in float32."""
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    emb = sinusoids(timesteps.astype(mx.float32)[:, None] * freqs[None])
    if dim % 2:
        emb = mx.concatenate([emb, mx.zeros_like(emb[:, :1])], axis=-1)
    return emb


class GroupNorm(nn.GroupNorm):
    """PyTorch-compatible GroupNorm (NHWC), with its statistics taken by rows.

    ``mx.fast.layer_norm`` under MLX's GroupNorm loses precision when a group's mean is large
    against its spread (5e-5 relative for mean 51, std 0.08, as in the reference UNet fixture),
    and its sums over a whole group drift on large maps (3.4e-4 relative at 128 channels x
    512x512, 1.1e-4 at 256 x 256x256, a VAE decoder's at 512 px). Here each group's mean is a sum
    over every row (W x group channels) and then over the rows, taken twice (the second of what the
    first left), and the variance is the same two-level mean of squared deviations: 1.8e-7 and
    1.4e-7 there.
    """

    def __call__(self, x):
        b, c = x.shape[0], x.shape[-1]
        rows = x.shape[1] if x.ndim == 4 else 1
        g = x.reshape(b, rows, -1, self.num_groups, c // self.num_groups)
        count = g.size // (b * self.num_groups)

        def group_mean(t):
            return t.sum(axis=(2, 4), keepdims=True).sum(axis=1, keepdims=True) / count

        d = g - group_mean(g)
        d = d - group_mean(d)  # what the rounded mean left: exact for a mean far above the spread
        var = group_mean(d * d)
        y = (d * mx.rsqrt(var + self.eps)).reshape(x.shape)
        return y * self.weight + self.bias if "weight" in self else y


def group_norm(num_groups: int, dims: int, eps: float, affine: bool = True) -> nn.GroupNorm:
    # pytorch_compatible=True: MLX's default grouping differs from PyTorch's (order-1 errors).
    return GroupNorm(num_groups, dims, eps=eps, affine=affine, pytorch_compatible=True)


def norm32(norm: nn.Module, x: mx.array) -> mx.array:
    """Apply a norm layer in float32 whatever the activation dtype (as the reference does)."""
    if x.dtype == mx.float32:
        return norm(x)
    return norm(x.astype(mx.float32)).astype(x.dtype)


def nchw_to_nhwc(x: mx.array) -> mx.array:
    return x.transpose(0, 2, 3, 1)


def nhwc_to_nchw(x: mx.array) -> mx.array:
    return x.transpose(0, 3, 1, 2)


class ResnetSkeleton(nn.Module):
    """``shortcut(x) + conv2(act(norm2(conv1(act(norm1(x, *cond))), *cond)))``: the resnet of the
    VAE and of the upsampler's K-UNet. Subclasses set ``norm1``, ``conv1``, ``norm2``, ``conv2``,
    ``conv_shortcut`` (only where there is one) and ``act``, named as their checkpoints name them;
    a norm without a condition runs in float32 (``norm32``)."""

    def _norm(self, norm: nn.Module, x: mx.array, cond: tuple) -> mx.array:
        return norm(x, *cond) if cond else norm32(norm, x)

    def __call__(self, x: mx.array, *cond: mx.array) -> mx.array:
        h = self.conv1(self.act(self._norm(self.norm1, x, cond)))
        h = self.conv2(self.act(self._norm(self.norm2, h, cond)))
        return (self.conv_shortcut(x) if "conv_shortcut" in self else x) + h


class Upsample(nn.Module):
    """Nearest ×2 (NHWC), then a 3×3 convolution (``conv``): the UNet's and the VAE decoder's upsampler."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x):
        n, h, w, c = x.shape
        # Every pixel repeated along both spatial axes.
        x = mx.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c)).reshape(n, 2 * h, 2 * w, c)
        return self.conv(x)


def split_heads(t: mx.array, heads: int) -> mx.array:
    """(B, N, heads·d) -> (B, heads, N, d)."""
    b, n, _ = t.shape
    return t.reshape(b, n, heads, -1).transpose(0, 2, 1, 3)


def merge_heads(t: mx.array) -> mx.array:
    """(B, heads, N, d) -> (B, N, heads·d)."""
    b, h, n, d = t.shape
    return t.transpose(0, 2, 1, 3).reshape(b, n, h * d)


def metal_available() -> bool:
    try:
        return mx.metal.is_available()
    except Exception:
        return False


def resolve_attention(mode: str) -> str:
    """``auto``: the fused kernel where it is fused (Metal); elsewhere MLX's SDPA materialises
    the scores, so chunked query blocks keep memory bounded."""
    check_attention(mode)
    if mode == "auto":
        return "sdpa" if (metal_available() and mx.default_device() == mx.gpu) else "chunked"
    return mode


def attention(q, k, v, mode: str = "sdpa", mask=None, scale: float | None = None, chunk_size: int = 1024):
    """softmax(q kᵀ·scale + mask) v over (B, heads, N, d) arrays; modes as in the torch backend."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if mode == "sdpa":
        if mask is not None:
            mask = mask.astype(q.dtype)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if mode == "naive":
        return _attend(q, k, v, mask, scale)
    if mode == "chunked":
        n = q.shape[-2]
        if n <= chunk_size:
            return _attend(q, k, v, mask, scale)
        outs = []
        for s in range(0, n, chunk_size):
            m = None if mask is None else mask[..., s:s + chunk_size, :] if mask.shape[-2] > 1 else mask
            o = _attend(q[..., s:s + chunk_size, :], k, v, m, scale)
            # Evaluate each block before building the next, or the lazy graph holds every
            # block's scores at once and memory is no longer bounded.
            mx.eval(o)
            outs.append(o)
        return mx.concatenate(outs, axis=-2)
    raise ValueError(f"unknown attention mode {mode!r}")


def _attend(q, k, v, mask, scale):
    scores = (q @ k.swapaxes(-1, -2)).astype(mx.float32) * scale
    if mask is not None:
        scores = scores + mask.astype(mx.float32)
    probs = mx.softmax(scores, axis=-1).astype(v.dtype)
    return probs @ v
