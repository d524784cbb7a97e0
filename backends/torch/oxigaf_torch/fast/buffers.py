"""Buffers kept between inference calls, for the largest fixed-shape intermediates on the CPU.

torch's CPU allocator hands blocks above glibc's mmap threshold (at most 32 MB) back to the
system when they are freed, so an intermediate that large is page-faulted in again on every
call. In a UNet call at the ImageDream shape that is no small cost (a fresh 105 MB float32
GEGLU projection page-faults in longer than its GEMM takes: docs/performance.md).
``winograd`` (its tiles and per-call kernels, the GEMM convolutions' gathered maps), ``unet``
(GEGLU's projection) and ``norms`` (half-precision GroupNorm's centred float32 copy) write such
intermediates into buffers kept here, one per use, device, dtype and thread, grown to the
largest call's need.
"""

from __future__ import annotations

import math
import threading

import torch

_KEPT: dict = {}
# A need above this gets a fresh buffer of its own, not kept (a large VAE decode: there its
# faults matter less than holding the memory).
KEEP_BYTES = 512 << 20


def scratch(use: str, device: torch.device, *shapes: tuple, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Consecutive views of one buffer, one view per shape, for ``use`` on ``device`` in the
    calling thread. The views are only valid until the next call with the same ``use``: what is
    written to them must be consumed (or copied) before then."""
    key = (use, device, dtype, threading.get_ident())
    sizes = [math.prod(s) for s in shapes]
    buf = _KEPT.get(key)
    if sum(sizes) * dtype.itemsize > KEEP_BYTES:
        buf = torch.empty(sum(sizes), device=device, dtype=dtype)
    elif buf is None or buf.numel() < sum(sizes):
        _KEPT.pop(key, None)
        buf = _KEPT[key] = torch.empty(sum(sizes), device=device, dtype=dtype)
    views, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        views.append(buf[start:start + size].view(shape))
        start += size
    return views


def keeps(x: torch.Tensor) -> bool:
    """Whether an inference intermediate like ``x`` goes into a kept buffer: on the CPU (CUDA's
    caching allocator already reuses its blocks), outside a compiled graph (which plans its own
    buffers)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def release() -> None:
    """Free every kept buffer (for the ImageDream UNet at 32x32 latents in float32: 233 MB of
    Winograd tiles, 472 MB for its largest kernel made per call, 105 MB of GEGLU projection; in
    bfloat16, 35 MB of gathered maps for the GEMM convolutions)."""
    _KEPT.clear()
