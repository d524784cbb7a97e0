"""The multi-view UNet's inference speed-ups (``speed_up``), applied to a loaded model.

At inference (nothing needs a gradient, whatever the grad mode: ``records_graph``) the swapped
blocks take their in-place paths: GroupNorm + SiLU in one float32 buffer (``norms``), residual
adds, the image-prompt attention's add and GEGLU in place on fresh intermediates (GEGLU's
projection, the largest, in a kept buffer on the CPU: ``buffers``), half-precision LayerNorm
read directly. In float16 and bfloat16 the activations are channels-last (oneDNN's and cuDNN's
convolutions are fastest in it, and the transformers' token layout becomes a free view); in
float32 on the CPU the wide 3x3 convolutions run as Winograd F(4x4, 3x3), on channels-last
activations too, and on small maps (float32 and bfloat16) as one im2col GEMM (``winograd``).
"""

from __future__ import annotations

import math
import types
import warnings

import torch
from torch import nn

from ..common import GroupNorm32, LayerNorm32, attention, merge_heads
from ..unet import (
    GEGLU,
    BasicTransformerBlock3D,
    CrossAttention,
    MultiViewUNet,
    ResBlock,
    SpatialTransformer3D,
    UNetCache,
)
from . import buffers, swap, winograd
from .norms import FastGroupNorm, FastLayerNorm, group_norm_act, inference
from .winograd import FastConv2d


class FastCrossAttention(CrossAttention):
    """At inference the image-prompt attention is added in place."""

    def forward(self, x, context, call):
        if self.ip_dim == 0 or not inference():
            return super().forward(x, context, call)
        q, kv = self.queries_and_kv(x, context, call)
        scale = 1.0 / math.sqrt(self.dim_head)
        out = attention(q, kv[0], kv[1], call.mode, scale=scale, chunk_size=call.chunk_size)
        out_ip = attention(q, kv[2], kv[3], call.mode, scale=scale, chunk_size=call.chunk_size)
        return self.to_out(merge_heads(out.add_(out_ip, alpha=call.ip_weight)))


class FastGEGLU(GEGLU):
    """At inference the projection goes into a kept buffer on the CPU (the largest intermediate of
    a call, fresh otherwise each time) and the gate is applied in place."""

    def forward(self, x):
        if not inference():
            return super().forward(x)
        if buffers.keeps(x):
            # F.linear's own call on a contiguous x: the same numbers
            rows = x.numel() // x.shape[-1]
            out = buffers.scratch("geglu", x.device, (rows, self.proj.out_features), dtype=x.dtype)[0]
            y = torch.addmm(self.proj.bias, x.reshape(rows, -1), self.proj.weight.t(), out=out)
            y = y.view(*x.shape[:-1], -1)
        else:
            y = self.proj(x)
        # both halves are views of the projection; the next Linear reads the strided result
        # without a copy
        h, gate = y.chunk(2, dim=-1)
        return h.mul_(torch.ops.aten.gelu_(gate))


class FastTransformerBlock(BasicTransformerBlock3D):
    """At inference the residual adds write into the fresh attention and feed-forward outputs."""

    def forward(self, x, context, num_frames, call):
        if not inference():
            return super().forward(x, context, num_frames, call)
        bf, n, c = x.shape
        x = x.reshape(bf // num_frames, num_frames * n, c)
        x = self.attn1(self.norm1(x), None, call).add_(x)
        if not call.grouped:
            x = x.reshape(bf, n, c)
        x = self.attn2(self.norm2(x), context, call).add_(x)
        x = self.ff(self.norm3(x)).add_(x)
        return x.reshape(bf, n, c)


class FastSpatialTransformer(SpatialTransformer3D):
    """At inference: ``group_norm_act`` and an in-place residual add (channels-last maps)."""

    def forward(self, x, context, num_frames, call):
        if not inference():
            return super().forward(x, context, num_frames, call)
        b, c, h, w = x.shape
        # channels-last activations make both layout changes free views
        t = group_norm_act(self.norm, x, act=False, reuse=False).permute(0, 2, 3, 1).reshape(b, h * w, c)
        t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, context, num_frames, call)
        t = self.proj_out(t).reshape(b, h, w, c).permute(0, 3, 1, 2)
        if x.is_contiguous():
            return x + t  # x first: the sum keeps x's NCHW layout (t's would leak downstream)
        return t.add_(x)


class FastResBlock(ResBlock):
    """At inference: ``group_norm_act`` (the second in place on the fresh sum) and in-place adds."""

    def forward(self, x, emb, call=None):
        if not inference():
            return super().forward(x, emb, call)
        h = self.in_layers[2](group_norm_act(self.in_layers[0], x, act=True, reuse=False))
        h = h.add_(self.emb_layers(emb).to(h.dtype)[:, :, None, None])
        h = self.out_layers[3](group_norm_act(self.out_layers[0], h, act=True, reuse=True))
        return h.add_(self.skip_connection(x))


class FastOut(nn.Sequential):
    """The UNet's output layers (norm, SiLU, convolution); at inference the norm works in place."""

    def forward(self, x):
        if not inference():
            return super().forward(x)
        return self[2](group_norm_act(self[0], x, act=True, reuse=True))


class FastMultiViewUNet(MultiViewUNet):
    """The UNet's calls without autograd's graph when nothing needs one (``records_graph``), their
    activations channels-last (``channels_last``), the blocks compiled (``compile``)."""

    channels_last = False
    winograd_conv = False
    compiled_blocks = None
    _freezing = False
    _frozen_versions = None

    def forward(self, x, timesteps, context=None, camera=None, num_frames: int = 1, ip=None, ip_img=None, **kw):
        from . import records_graph

        cache = kw.get("cache")
        cached = (cache.context, cache.camera_emb) if isinstance(cache, UNetCache) else ()
        with torch.set_grad_enabled(records_graph(self, x, context, camera, ip, ip_img, *cached)):
            return super().forward(x, timesteps, context, camera, num_frames, ip, ip_img, **kw)

    def blocks(self, x, emb, context, num_frames, call):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.compiled_blocks is None or torch.is_grad_enabled() or self._weights_changed_since_frozen():
            return super().blocks(x, emb, context, num_frames, call).contiguous()
        return self.compiled_blocks(x, emb, context, num_frames, call).contiguous()

    def compile(self, mode: str | None = None) -> FastMultiViewUNet:
        """Run the blocks of inference calls through ``torch.compile`` (shapes static; recompiled
        when they change). ``mode`` None: "reduce-overhead" (CUDA graphs) on CUDA; on the CPU
        inductor's freezing, which folds the weights into the graph as constants, prepacked for
        oneDNN's convolutions and MKL's GEMMs. Frozen weights are those of the first compiled
        call: if they change later, the model warns and runs eager from then on. Calls with
        autograd on stay eager. Returns the model."""
        if mode is None and self.device.type == "cuda":
            mode = "reduce-overhead"
        kw = {"options": {"freezing": True}} if mode is None and self.device.type == "cpu" else {"mode": mode}
        plain = types.MethodType(MultiViewUNet.blocks, self)
        self.compiled_blocks = torch.compile(plain, dynamic=False, fullgraph=True, **kw)
        self._freezing, self._frozen_versions = "options" in kw, None
        return self

    def _weights_changed_since_frozen(self) -> bool:
        """Whether a weight was replaced or written in place since a CPU graph froze them."""
        if not self._freezing:
            return False
        versions = tuple((p.data_ptr(), p._version) for p in self.parameters())
        if self._frozen_versions is None:
            self._frozen_versions = versions  # this call freezes them
            return False
        if versions == self._frozen_versions:
            return False
        warnings.warn("the UNet's weights changed after its compiled graph froze them: it runs eager from "
                      "now on; load the model again with compile=True for a graph of the new weights",
                      stacklevel=4)
        self.compiled_blocks = None
        return True


BLOCKS = {CrossAttention: FastCrossAttention, GEGLU: FastGEGLU, BasicTransformerBlock3D: FastTransformerBlock,
          SpatialTransformer3D: FastSpatialTransformer, ResBlock: FastResBlock, GroupNorm32: FastGroupNorm,
          nn.Conv2d: FastConv2d}


def speed_up(model: MultiViewUNet, on: bool = True, *, winograd_conv: bool | None = None,
             channels_last: bool | None = None, compile: bool = False) -> MultiViewUNet:
    """The loaded ``model`` with its inference speed-ups (``on``), and compiled (``compile``).

    ``winograd_conv``: the wide 3x3 convolutions of inference calls as Winograd F(4x4, 3x3)
    (None: on for float32 on the CPU). ``channels_last``: the activation layout inside the model
    (the interface stays NCHW either way); None: channels-last in float16 and bfloat16, and with
    Winograd convolutions in a model wide enough for them (their tile gathers read whole channel
    rows in it); NCHW otherwise (float32 on CUDA, with ``winograd_conv=False``, or a narrow model
    such as the demo's). ``compile``: ``torch.compile`` of the blocks (with the direct
    convolutions, ``FastMultiViewUNet.compile``), also with the speed-ups off."""
    if not (on or compile):
        return model
    model.__class__ = FastMultiViewUNet
    if on:
        swap(model, BLOCKS)
        for block in model.modules():
            if isinstance(block, BasicTransformerBlock3D):
                swap(block, {LayerNorm32: FastLayerNorm})
        model.out.__class__ = FastOut
        if winograd_conv is None:
            winograd_conv = model.dtype == torch.float32 and model.device.type == "cpu"
        model.winograd_conv = bool(winograd_conv)
        winograd.enable(model, model.winograd_conv)
        if channels_last is None:
            channels_last = model.dtype != torch.float32 or (model.winograd_conv and bool(winograd.wide_layers(model)))
        model.channels_last = bool(channels_last)
        if model.channels_last:
            model.to(memory_format=torch.channels_last)
    return model.compile() if compile else model

