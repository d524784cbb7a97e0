"""Pieces every MLX model shares: weight loading, attention, float32 norms, NCHW<->NHWC."""

from __future__ import annotations

import math
from collections.abc import Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from oxigaf.checkpoints import check_state
from oxigaf.config import check_attention

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


class GroupNorm(nn.GroupNorm):
    """PyTorch-compatible GroupNorm (NHWC) that centres each group first.

    ``mx.fast.layer_norm`` under MLX's GroupNorm loses precision when a group's mean is large
    against its spread (5e-5 relative for mean 51, std 0.08, as in the reference UNet
    fixture); subtracting the group mean first makes it exact to float32 rounding.
    """

    def __call__(self, x):
        b, c = x.shape[0], x.shape[-1]
        g = x.reshape(b, -1, self.num_groups, c // self.num_groups)
        g = g - g.mean(axis=(1, 3), keepdims=True)
        return super().__call__(g.reshape(x.shape))


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
