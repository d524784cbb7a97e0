"""Faster 3x3 convolutions for inference on the CPU: Winograd F(4x4, 3x3) in float32 (Lavin &
Gray, "Fast Algorithms for Convolutional Neural Networks", 2015) and, on small maps, one im2col
GEMM in float32 and bfloat16. ``FastConv2d`` (an ``nn.Conv2d`` with the same parameters) takes
the place of a model's ``nn.Conv2d`` layers after loading (``oxigaf_torch.fast.apply``).

Each 6x6 input tile ``d`` (stride 4) gives a 4x4 output tile ``Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A``:
36 multiplies per output tile and channel pair instead of 144. Summed over input channels,
the elementwise product becomes 36 independent GEMMs (tiles x C_in) @ (C_in x C_out), and
both tile transforms are one GEMM each with the Kronecker product of the small matrices.
Its relative L2 error against float64 is a few times the direct float32 convolution's; narrow
layers are slower this way, hence ``FastConv2d.applies``. The transformed kernel ``G g Gᵀ``
is 4x the kernel's size.

On small maps (the UNet's two deepest levels, its widest layers) oneDNN's direct convolution
runs far below the GEMM rate; ``conv3x3_gemm`` gathers the nine shifted copies of the map
(exact) and multiplies them by the kernel in one GEMM, which accumulates in float32 like the
direct convolution, with its error. docs/performance.md has the measurements behind the
thresholds below.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import buffers

# F(4x4, 3x3) with the interpolation points 0, ±1, ±2 and ∞ (Lavin & Gray, section 4.2)
_BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64)
_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64)
_AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64)
OUT, TILE = 4, 6  # output tile and input tile sides

# Where Winograd pays on the CPU: both sides at least this many channels, feature maps at least
# MIN_SIZE. Kernels are kept for maps of at least KEEP_SIZE; the smaller maps belong to the
# widest layers, whose kept kernels would cost the most memory, so there they are made per call.
MIN_CHANNELS = 320
# On channels-last maps the tile gathers read whole channel rows, and narrower layers pay too.
MIN_CHANNELS_LAST = 128
MIN_SIZE = 8
KEEP_SIZE = 16
# The GEMM path takes outputs of at most this side (float32 at 8x8 goes to Winograd first).
GEMM_MAX_SIZE = 8
GEMM_DTYPES = (torch.float32, torch.bfloat16)
# The most bytes of tile intermediates ``conv3x3`` holds at once (it goes a band of tile rows at a
# time): the ImageDream UNet's calls fit whole, the VAE's 512 px maps go in bands.
BAND_BYTES = 256 << 20


def transform_kernel(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(C_out, C_in, 3, 3) float32 -> the 36 transformed kernels, (36, C_in, C_out) (a transposed
    view of (36, C_out, C_in)), written into ``out`` (36·C_out·C_in elements) if given."""
    cout, cin = weight.shape[:2]
    kg = _transforms(weight.device)[0]
    if out is not None:
        out = out.view(TILE * TILE, cout * cin)
    taps = weight.detach().reshape(cout * cin, 9).t()  # a view of a standard-layout weight
    return torch.mm(kg, taps, out=out).view(TILE * TILE, cout, cin).transpose(1, 2)


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is laid out channels-last (and not also plain contiguous, as 1x1 maps are)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def conv3x3(x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, w, bias, padding=1)`` for (N, C_in, H, W) ``x`` with H and W multiples of 4,
    ``kernel`` = ``transform_kernel(w)``. The result has ``x``'s memory format (fastest:
    channels-last, where every tile gather reads whole channel rows).

    Tiles are independent, so they go through the transforms a band of tile rows at a time, each
    band's intermediates at most ``BAND_BYTES``: large maps (the VAE's at 512 px) then reuse one
    kept buffer instead of page-faulting in a fresh gigabyte per call."""
    n, cin, h, w = x.shape
    cout = kernel.shape[2]
    th, tw = h // OUT, w // OUT
    _, kb, ka = _transforms(x.device)
    channels_last = is_channels_last(x)
    padded_shape = (n, h + 2, w + 2, cin) if channels_last else (n, cin, h + 2, w + 2)
    (padded,) = buffers.scratch("padded", x.device, padded_shape)
    if channels_last:
        padded[:, 0].zero_(), padded[:, -1].zero_(), padded[:, :, 0].zero_(), padded[:, :, -1].zero_()
        padded[:, 1:-1, 1:-1].copy_(x.permute(0, 2, 3, 1))
        windows = padded.unfold(1, TILE, OUT).unfold(2, TILE, OUT)  # (N, th, tw, C, 6, 6), a view
        windows = windows.permute(4, 5, 0, 1, 2, 3)
        out = torch.empty((n, h, w, cout), device=x.device, dtype=x.dtype)
    else:
        padded[:, :, 0].zero_(), padded[:, :, -1].zero_(), padded[..., 0].zero_(), padded[..., -1].zero_()
        padded[:, :, 1:-1, 1:-1].copy_(x)
        windows = padded.unfold(2, TILE, OUT).unfold(3, TILE, OUT)  # (N, C, th, tw, 6, 6)
        windows = windows.permute(4, 5, 0, 2, 3, 1)
        out = torch.empty((n, cout, h, w), device=x.device, dtype=x.dtype)
    # bytes per tile row of the band's intermediates: d and v (36 x C_in), m (36 x C_out), y (16 x C_out)
    row_bytes = n * tw * (2 * TILE * TILE * cin + (TILE * TILE + OUT * OUT) * cout) * x.element_size()
    band = max(1, min(th, BAND_BYTES // row_bytes))
    for r0 in range(0, th, band):
        rows = min(band, th - r0)
        tiles = n * rows * tw
        d, v, m, y = buffers.scratch("tiles", x.device, (TILE, TILE, n, rows, tw, cin), (TILE * TILE, tiles, cin),
                                     (TILE * TILE, tiles, cout), (OUT, OUT, n, rows, tw, cout))
        d.copy_(windows[:, :, :, r0:r0 + rows])  # the one gather
        torch.mm(kb, d.view(TILE * TILE, -1), out=v.view(TILE * TILE, -1))
        torch.bmm(v, kernel, out=m)
        torch.mm(ka, m.view(TILE * TILE, -1), out=y.view(OUT * OUT, -1))
        lines = slice(OUT * r0, OUT * (r0 + rows))
        if channels_last:
            out[:, lines].view(n, rows, OUT, tw, OUT, cout).copy_(y.permute(2, 3, 0, 4, 1, 5))
        else:
            out[:, :, lines].view(n, cout, rows, OUT, tw, OUT).copy_(y.permute(2, 5, 3, 0, 4, 1))
    if channels_last:
        if bias is not None:
            out += bias
        return out.permute(0, 3, 1, 2)
    if bias is not None:
        out += bias[:, None, None]
    return out


def conv3x3_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=stride, padding=1)`` for a (N, C_in, H, W) ``x`` as one
    GEMM: (N·H'·W', 9·C_in) shifted copies of the map @ (9·C_in, C_out). The result has ``x``'s
    memory format; a channels-last ``weight`` is read as it lies, (C_out, 3, 3, C_in)."""
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    padded, cols = buffers.scratch("gemm", x.device, (n, h + 2, w + 2, cin), (n, ho, wo, 3, 3, cin), dtype=x.dtype)
    padded[:, 0].zero_(), padded[:, -1].zero_(), padded[:, :, 0].zero_(), padded[:, :, -1].zero_()
    padded[:, 1:-1, 1:-1].copy_(x.permute(0, 2, 3, 1))
    cols.copy_(padded.unfold(1, 3, stride).unfold(2, 3, stride).permute(0, 1, 2, 4, 5, 3))  # the one gather
    taps = weight.detach().permute(0, 2, 3, 1).reshape(cout, 9 * cin).t()
    rows = cols.view(n * ho * wo, 9 * cin)
    out = torch.mm(rows, taps) if bias is None else torch.addmm(bias, rows, taps)
    out = out.view(n, ho, wo, cout).permute(0, 3, 1, 2)
    return out if is_channels_last(x) else out.contiguous()


_TRANSFORMS: dict = {}


def _transforms(device: torch.device) -> tuple[torch.Tensor, ...]:
    """G ⊗ G (36, 9), Bᵀ ⊗ Bᵀ (36, 36) and Aᵀ ⊗ Aᵀ (16, 36) in float32 on ``device`` (the last two
    exactly: their entries are integers). vec(G g Gᵀ) = (G ⊗ G) vec(g), and so on."""
    if device not in _TRANSFORMS:
        _TRANSFORMS[device] = tuple(torch.from_numpy(np.kron(m, m).astype(np.float32)).to(device)
                                    for m in (_G, _BT, _AT))
    return _TRANSFORMS[device]


class FastConv2d(nn.Conv2d):
    """``nn.Conv2d`` (the same parameters, so the same checkpoint keys) that runs its inference
    calls as Winograd F(4x4, 3x3) where that is faster (``applies``) and ``winograd`` is set (the
    loaders set it for float32 models on the CPU). On feature maps of at least ``KEEP_SIZE`` its
    transformed kernel is kept, made again whenever the weight has been replaced or written to;
    on smaller ones, whose layers are the widest, it is made per call into a reused buffer.
    Otherwise, on small maps (``gemm_applies``), the call is one im2col GEMM, whatever
    ``winograd`` says: numerically it is the direct convolution, only faster.

    With ``winograd`` set, an inference call also puts the weight in the layout its path reads
    (``_match_layout``): the standard one for a kernel made per call, channels-last for oneDNN's
    direct convolution of channels-last maps, which otherwise reorders a standard-layout weight
    on every call. A layer keeps one path at a given input size, so this happens once."""

    winograd = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.winograd and self.applies(x):
            keep = min(x.shape[-2:]) >= KEEP_SIZE
            if not keep:
                self._match_layout(torch.contiguous_format)
            return conv3x3(x, self._kernel(keep), self.bias)
        if self.gemm_applies(x):
            self._match_layout(torch.channels_last)  # the GEMM reads its taps as they lie
            return conv3x3_gemm(x, self.weight, self.bias, self.stride[0])
        if self.winograd and x.ndim == 4 and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            channels_last = is_channels_last(x)
            self._match_layout(torch.channels_last if channels_last else torch.contiguous_format)
        return super().forward(x)

    def applies(self, x: torch.Tensor) -> bool:
        """Whether this call runs as Winograd F(4x4, 3x3) (with ``winograd`` set)."""
        h, w = x.shape[-2:]
        channels = MIN_CHANNELS_LAST if x.ndim == 4 and is_channels_last(x) else MIN_CHANNELS
        return (self._wide_3x3_inference(x, channels) and self.stride == (1, 1) and x.dtype == torch.float32
                and min(h, w) >= MIN_SIZE and h % OUT == 0 and w % OUT == 0)

    def gemm_applies(self, x: torch.Tensor) -> bool:
        """Whether this call runs as one im2col GEMM (``conv3x3_gemm``)."""
        h, w = x.shape[-2:]
        s = self.stride[0]
        return (self._wide_3x3_inference(x, MIN_CHANNELS) and self.stride in ((1, 1), (2, 2)) and x.dtype in GEMM_DTYPES
                and max((h - 1) // s + 1, (w - 1) // s + 1) <= GEMM_MAX_SIZE)

    def _wide_3x3_inference(self, x: torch.Tensor, min_channels: int) -> bool:
        return (self.kernel_size == (3, 3) and self.padding == (1, 1) and self.dilation == (1, 1)
                and self.groups == 1 and self.padding_mode == "zeros" and x.ndim == 4
                and x.dtype == self.weight.dtype and x.device.type == "cpu"
                and min(self.in_channels, self.out_channels) >= min_channels
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling())

    def _match_layout(self, layout: torch.memory_format) -> None:
        w = self.weight
        if not w.is_contiguous(memory_format=layout):
            # a normal tensor even inside torch.inference_mode, so the weight can still train
            with torch.inference_mode(False):
                w.data = w.data.contiguous(memory_format=layout)

    def _kernel(self, keep: bool) -> torch.Tensor:
        w = self.weight
        if not keep:
            size = TILE * TILE * self.out_channels * self.in_channels
            return transform_kernel(w, buffers.scratch("kernel", w.device, (size,))[0])
        key = (w.data_ptr(), w._version, w.device)
        if getattr(self, "_winograd_key", None) != key:
            self._winograd_kernel, self._winograd_key = transform_kernel(w.contiguous()), key
        return self._winograd_kernel


def wide_layers(model: nn.Module, min_channels: int | None = None) -> list[FastConv2d]:
    """The ``FastConv2d`` layers of ``model`` wide enough for Winograd (``MIN_CHANNELS``, or
    ``min_channels``: ``MIN_CHANNELS_LAST`` for a model run channels-last)."""
    least = MIN_CHANNELS if min_channels is None else min_channels
    return [m for m in model.modules() if isinstance(m, FastConv2d) and min(m.in_channels, m.out_channels) >= least]


def enable(model: nn.Module, on: bool) -> nn.Module:
    """Set ``winograd`` on every ``FastConv2d`` of ``model``."""
    for module in model.modules():
        if isinstance(module, FastConv2d):
            module.winograd = on
    return model
