"""The multi-view UNet of MVDream / ImageDream (``MultiViewUNetModel``) in PyTorch, NCHW.

The module tree mirrors the published checkpoint's original LDM key names (``time_embed``,
``camera_embed``, ``image_embed``, ``input_blocks``, ``middle_block``, ``output_blocks``,
``out``), so the safetensors names are the parameter names and loading is strict.

Numerics follow the reference: the timestep embedding is computed in float32, GroupNorm and
LayerNorm run in float32, attention softmax runs in float32 (``common.attention``), and the
self-attention of every transformer joins the tokens of all F views of a batch item.

Speed, at inference (when nothing needs a gradient, whatever the grad mode:
``common.records_graph``; otherwise the plain out-of-place path runs): frames of a group that
carry the same text and image prompt (what the pipeline passes) share one resampler pass and
one set of cross-attention keys and values, their queries attending together; GroupNorm + SiLU
is one float32 buffer and in-place SiLU, residual adds and GEGLU work in place on fresh
intermediates (GEGLU's projection, the largest, in a buffer kept between calls on the CPU:
``buffers``), LayerNorm reads half precision directly; in float16 and bfloat16 the activations
are channels-last (oneDNN's bfloat16 convolutions are about 2x faster in it, and the
transformers' token layout becomes a free view); in float32 on the CPU the wide 3x3
convolutions run as Winograd F(4x4, 3x3) (``winograd``), on channels-last activations too, and
on maps of 8x8 and less (float32 and bfloat16) as one im2col GEMM (``winograd.conv3x3_gemm``).
benchmarks/ measures it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from oxigaf.checkpoints import load_state
from oxigaf.config import UNET_NORM_GROUPS, UNetConfig, check_load_options
from oxigaf.errors import InputError

from . import buffers, common, winograd
from .common import GroupNorm32, LayerNorm32, Upsample, group_norm_act, merge_heads, split_heads, timestep_embedding
from .common import attention as scaled_attention
from .winograd import Conv2d

# The reference hard-codes the IP-Adapter-Plus resampler's geometry (only its query count,
# ``ip_dim``, and its width, ``context_dim``, come from the config).
RESAMPLER_DEPTH = 4
RESAMPLER_HEADS = 12
RESAMPLER_DIM_HEAD = 64
RESAMPLER_EMBEDDING_DIM = 1280  # CLIP ViT-H/14 hidden size
RESAMPLER_FF_MULT = 4


@dataclass(frozen=True)
class _Call:
    """Per-call settings handed down to every attention layer."""

    mode: str
    chunk_size: int
    ip_weight: float
    # no autograd: fresh intermediates may be overwritten in place
    fast: bool = False
    # the cross-attention context is (B, L, C), one per group of frames, not one per frame
    grouped: bool = False
    # prepared cross-attention keys/values per attn2 module (``UNetCache.kv``), or None
    kv: dict | None = None


@dataclass(frozen=True, eq=False)
class UNetCache:
    """The step-invariant part of a UNet call (``MultiViewUNet.prepare``): the context with its
    resampled image tokens, every cross-attention's keys and values, the camera embedding.

    Made once per generation, passed as ``unet(x, t, cache=cache, num_frames=F, ip_img=...)``.
    """

    batch: int  # B·F, the frames the cache was made for
    num_frames: int
    grouped: bool
    context: torch.Tensor
    camera_emb: torch.Tensor | None
    kv: dict


# --------------------------------------------------------------------------- fast norms


def norm_act(norm: GroupNorm32, x: torch.Tensor, act: bool, call: _Call | None, reuse: bool = False) -> torch.Tensor:
    if call is not None and call.fast:
        return group_norm_act(norm, x, act, reuse)
    y = norm(x)
    return F.silu(y) if act else y


def layer_norm(norm: LayerNorm32, x: torch.Tensor, call: _Call) -> torch.Tensor:
    """``LayerNorm32``; at inference a half-precision ``x`` goes straight to torch's mixed-type
    kernel (float32 statistics and float32 weights, output rounded once): no float32 copies."""
    # CPU only: CUDA's layer_norm refuses mixed input/weight dtypes (seen on an H200, torch 2.11).
    if call.fast and x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":
        w = norm.weight.float() if norm.weight is not None else None
        b = norm.bias.float() if norm.bias is not None else None
        return F.layer_norm(x, norm.normalized_shape, w, b, norm.eps)
    return norm(x)


def _add(out: torch.Tensor, other: torch.Tensor, call: _Call | None) -> torch.Tensor:
    """``out + other`` where ``out`` is a fresh intermediate: in place at inference."""
    return out.add_(other) if call is not None and call.fast else out + other


# --------------------------------------------------------------------------- attention


class CrossAttention(nn.Module):
    """Multi-head attention; with ``ip_dim`` the last ``ip_dim`` context tokens (the resampled
    image tokens) get their own keys/values and their own softmax, added with ``ip_weight``."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, ip_dim: int = 0):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.ip_dim = ip_dim
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        if ip_dim > 0:
            self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
            self.to_v_ip = nn.Linear(context_dim, inner, bias=False)
        # index 1 is the reference's Dropout (identity at inference, no weights)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Identity())

    def context_kv(self, context: torch.Tensor) -> tuple:
        """Keys and values of ``context`` (text, then image tokens when ``ip_dim`` > 0), split
        into heads: (k, v) or (k, v, k_ip, v_ip). They depend on nothing that changes per step."""
        if self.ip_dim > 0:
            # contiguous halves: a strided 3-D input makes Linear copy its weight per batch item
            context, context_ip = context[:, : -self.ip_dim].contiguous(), context[:, -self.ip_dim:].contiguous()
        kv = (split_heads(self.to_k(context), self.heads), split_heads(self.to_v(context), self.heads))
        if self.ip_dim > 0:
            kv += (split_heads(self.to_k_ip(context_ip), self.heads), split_heads(self.to_v_ip(context_ip), self.heads))
        return kv

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, call: _Call) -> torch.Tensor:
        kv = call.kv.get(self) if call.kv is not None else None
        if kv is None:
            kv = self.context_kv(x if context is None else context)
        scale = 1.0 / math.sqrt(self.dim_head)
        q = split_heads(self.to_q(x), self.heads)
        out = scaled_attention(q, kv[0], kv[1], call.mode, scale=scale, chunk_size=call.chunk_size)
        if self.ip_dim > 0:
            k_ip, v_ip = kv[2], kv[3]
            out_ip = scaled_attention(q, k_ip, v_ip, call.mode, scale=scale, chunk_size=call.chunk_size)
            out = out.add_(out_ip, alpha=call.ip_weight) if call.fast else out + call.ip_weight * out_ip
        return self.to_out(merge_heads(out))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x, fast: bool = False):
        if not fast:
            h, gate = self.proj(x).chunk(2, dim=-1)
            return h * F.gelu(gate)
        if buffers.keeps(x):
            # the projection is the largest intermediate of a call (105 MB a block at the first
            # level of the ImageDream UNet in float32): a kept buffer, not a fresh one each time
            # (F.linear's own call on a contiguous x: the same numbers)
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


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        # net.1 is the reference's Dropout slot
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim))

    def forward(self, x, fast: bool = False):
        return self.net[2](self.net[0](x, fast))


class BasicTransformerBlock3D(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, ip_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, ip_dim=ip_dim)
        self.norm1 = LayerNorm32(dim)
        self.norm2 = LayerNorm32(dim)
        self.norm3 = LayerNorm32(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, num_frames: int, call: _Call) -> torch.Tensor:
        bf, n, c = x.shape
        # Views are fastest in the batch, so (b·f, l, c) -> (b, f·l, c) is a plain reshape:
        # the self-attention then sees every view's tokens (the cross-view attention).
        x = x.reshape(bf // num_frames, num_frames * n, c)
        x = _add(self.attn1(layer_norm(self.norm1, x, call), None, call), x, call)
        if not call.grouped:
            x = x.reshape(bf, n, c)
        # grouped: every frame of a group has the same context, so its queries may as well
        # attend to it together (softmax is per query)
        x = _add(self.attn2(layer_norm(self.norm2, x, call), context, call), x, call)
        x = _add(self.ff(layer_norm(self.norm3, x, call), call.fast), x, call)
        return x.reshape(bf, n, c)


class SpatialTransformer3D(nn.Module):
    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int, depth: int, ip_dim: int):
        super().__init__()
        inner = heads * dim_head
        self.norm = GroupNorm32(UNET_NORM_GROUPS, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock3D(inner, heads, dim_head, context_dim, ip_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor, num_frames: int, call: _Call) -> torch.Tensor:
        b, c, h, w = x.shape
        # channels-last activations make both layout changes free views
        t = norm_act(self.norm, x, False, call).permute(0, 2, 3, 1).reshape(b, h * w, c)
        t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, context, num_frames, call)
        t = self.proj_out(t).reshape(b, h, w, c).permute(0, 3, 1, 2)
        if x.is_contiguous():
            return x + t  # x first: the sum keeps x's NCHW layout (t's would leak downstream)
        return t.add_(x) if call.fast else t + x


# --------------------------------------------------------------------------- convolutional parts


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            GroupNorm32(UNET_NORM_GROUPS, channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # out_layers.2 is the reference's Dropout slot
        self.out_layers = nn.Sequential(
            GroupNorm32(UNET_NORM_GROUPS, out_channels), nn.SiLU(), nn.Identity(),
            Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, call: _Call | None = None) -> torch.Tensor:
        h = self.in_layers[2](norm_act(self.in_layers[0], x, True, call))
        h = _add(h, self.emb_layers(emb).to(h.dtype)[:, :, None, None], call)
        h = self.out_layers[3](norm_act(self.out_layers[0], h, True, call, reuse=True))
        return _add(h, self.skip_connection(x), call)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class CondSequential(nn.Sequential):
    """A numbered stage: each child gets what it needs (emb for ResBlocks, context for transformers)."""

    def forward(self, x, emb, context, num_frames: int, call: _Call):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, call)
            elif isinstance(layer, SpatialTransformer3D):
                x = layer(x, context, num_frames, call)
            else:
                x = layer(x)
        return x


# --------------------------------------------------------------------------- image-prompt resampler


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        inner = dim_head * heads
        self.heads = heads
        self.dim_head = dim_head
        self.norm1 = LayerNorm32(dim)
        self.norm2 = LayerNorm32(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        q = split_heads(self.to_q(latents), self.heads)
        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)
        k, v = split_heads(k, self.heads), split_heads(v, self.heads)
        # q and k are each scaled by dim_head^-1/4 before the product, as the reference does to
        # keep float16 scores in range; the softmax itself runs in float32 (naive path). The
        # matrix is tiny (queries × (257 + queries)), so no other attention mode is worth it.
        s = self.dim_head ** -0.25
        out = scaled_attention(q * s, k * s, v, "naive", scale=1.0)
        return self.to_out(merge_heads(out))


class Resampler(nn.Module):
    """IP-Adapter-Plus Perceiver resampler: CLIP hidden states -> ``num_queries`` context tokens."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, num_queries: int, embedding_dim: int,
                 output_dim: int, ff_mult: int):
        super().__init__()
        self.latents = nn.Parameter(torch.empty(1, num_queries, dim))
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = LayerNorm32(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(dim, dim_head, heads),
                nn.Sequential(LayerNorm32(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                              nn.Linear(dim * ff_mult, dim, bias=False)),
            ])
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


# --------------------------------------------------------------------------- the UNet


class MultiViewUNet(nn.Module):
    """``MultiViewUNetModel``: ``unet(x, timesteps, context, camera, num_frames, ip, ip_img) -> eps``."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        c = config
        self.config = c
        c.check_geometry()
        self.model_channels = c.model_channels
        self.in_channels = c.in_channels
        self.context_dim = c.context_dim
        self.camera_dim = c.camera_dim
        self.ip_dim = c.ip_dim
        # call-time defaults; load_unet sets them, a call may override attention and ip_weight
        self.attention = "sdpa"
        self.chunk_size = 1024
        self.ip_weight = c.ip_weight
        # activation layout; load_unet converts the convolution weights to match
        self.channels_last = False
        # set by compile(): the compiled blocks of inference calls, and the weights' versions
        # when a CPU graph froze them (None until its first call)
        self.compiled_body = None
        self._freezing, self._frozen_versions = False, None

        emb_dim = c.model_channels * 4
        if c.ip_dim > 0:
            self.image_embed = Resampler(
                dim=c.context_dim, depth=RESAMPLER_DEPTH, dim_head=RESAMPLER_DIM_HEAD, heads=RESAMPLER_HEADS,
                num_queries=c.ip_dim, embedding_dim=RESAMPLER_EMBEDDING_DIM, output_dim=c.context_dim,
                ff_mult=RESAMPLER_FF_MULT,
            )
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if c.camera_dim is not None:
            self.camera_embed = nn.Sequential(nn.Linear(c.camera_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def transformer(ch: int) -> SpatialTransformer3D:
            heads, dim_head = c.heads_for(ch)
            return SpatialTransformer3D(ch, heads, dim_head, c.context_dim, c.transformer_depth, c.ip_dim)

        ch = c.model_channels
        self.input_blocks = nn.ModuleList([CondSequential(Conv2d(c.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * c.model_channels)]
                ch = mult * c.model_channels
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(CondSequential(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(CondSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = CondSequential(ResBlock(ch, emb_dim), transformer(ch), ResBlock(ch, emb_dim))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, c.model_channels * mult)]
                ch = c.model_channels * mult
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(CondSequential(*layers))

        self.out = nn.Sequential(
            GroupNorm32(UNET_NORM_GROUPS, ch), nn.SiLU(), Conv2d(c.model_channels, c.out_channels, 3, padding=1)
        )

    # -- helpers ---------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.time_embed[0].weight.device

    def _as(self, t, name: str) -> torch.Tensor:
        return common.as_float_input(t, name, self.dtype, self.device)

    # -- forward ---------------------------------------------------------------------------

    def forward(self, x, timesteps, context=None, camera=None, num_frames: int = 1, ip=None, ip_img=None, *,
                attention: str | None = None, ip_weight: float | None = None,
                cache: UNetCache | None = None) -> torch.Tensor:
        """Noise prediction for every frame, NCHW, in the dtype of ``x``.

        - ``x`` (B·F, C_in, h, w), views fastest (index b·F + f); never modified.
        - ``timesteps`` (B·F,) or a scalar, integer or float.
        - ``context`` (B·F, L, context_dim) text tokens.
        - ``camera`` (B·F, camera_dim) or None (no camera embedding, as in the reference).
        - ``ip`` (B·F, T, 1280) CLIP penultimate hidden states (ImageDream only, required there):
          resampled here into ``ip_dim`` tokens appended after the text tokens.
        - ``ip_img`` (B, c, h, w) clean reference latents: they replace frame F−1 of each group in
          the model input (a copy). With c < C_in (extra conditioning channels concatenated by the
          caller) only the first c channels of that frame are replaced. None: no replacement.
        - ``attention`` overrides the model's attention mode for this call, ``ip_weight`` the
          weight of the image-prompt attention (config default 1.0).
        - ``cache``: ``prepare(context, camera, num_frames, ip)``'s result, in place of
          ``context``, ``camera`` and ``ip`` (the same numbers, without recomputing them).

        Autograd's graph is recorded only when something needs a gradient (``common.records_graph``).
        """
        cached = (cache.context, cache.camera_emb) if isinstance(cache, UNetCache) else ()
        with torch.set_grad_enabled(common.records_graph(self, x, context, camera, ip, ip_img, *cached)):
            return self._predict(x, timesteps, context, camera, num_frames, ip, ip_img, attention, ip_weight, cache)

    def _predict(self, x, timesteps, context, camera, num_frames: int, ip, ip_img, attention: str | None,
                 ip_weight: float | None, cache: UNetCache | None) -> torch.Tensor:
        out_dtype = x.dtype if isinstance(x, torch.Tensor) and x.is_floating_point() else self.dtype
        x = self._as(x, "x")
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise InputError(f"x must be (B·F, {self.in_channels}, h, w); got {tuple(x.shape)}")
        n, _, h, w = x.shape
        if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1 or n % num_frames:
            raise InputError(f"num_frames must be a positive integer dividing the batch {n}; got {num_frames!r}")
        depth = len(self.config.channel_mult) - 1
        if h % (1 << depth) or w % (1 << depth):
            raise InputError(f"latent height and width must be multiples of {1 << depth}; got {h}x{w}")
        mode = common.resolve_attention(self.attention if attention is None else attention, self.device)
        fast = not torch.is_grad_enabled()
        timesteps = common.per_item(timesteps, n, "timesteps", self.device)

        if cache is None:
            cache = self._prepare(context, camera, num_frames, ip, n, with_kv=False)
        elif context is not None or camera is not None or ip is not None:
            raise InputError("pass either cache= or context/camera/ip, not both")
        elif not isinstance(cache, UNetCache) or (cache.batch, cache.num_frames) != (n, num_frames):
            got = (getattr(cache, "batch", None), getattr(cache, "num_frames", None))
            raise InputError(f"cache was prepared for (batch, num_frames) {got}; this call has {(n, num_frames)}")

        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.dtype))
        if cache.camera_emb is not None:
            emb = emb + cache.camera_emb
        if ip_img is not None:
            if self.ip_dim == 0:
                raise InputError("this UNet has no image-prompt path (ip_dim 0); pass ip=None and ip_img=None")
            x = self._place_reference(x, self._as(ip_img, "ip_img"), num_frames)
        call = _Call(mode, self.chunk_size, float(self.ip_weight if ip_weight is None else ip_weight), fast,
                     cache.grouped, cache.kv or None)
        context = cache.context
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        if self.compiled_body is None or torch.is_grad_enabled() or self._weights_changed_since_frozen():
            return self._body(x, emb, context, num_frames, call).to(out_dtype).contiguous()
        # the compiler fuses on its own; the in-place fast path's pointer checks would break its graph
        call = dataclasses.replace(call, fast=False)
        return self.compiled_body(x, emb, context, num_frames, call).to(out_dtype).contiguous()

    def _body(self, x, emb, context, num_frames: int, call: _Call) -> torch.Tensor:
        """The blocks: the part of a call that ``compile`` hands to ``torch.compile``."""
        hs = []
        hcur = x
        for block in self.input_blocks:
            hcur = block(hcur, emb, context, num_frames, call)
            hs.append(hcur)
        hcur = self.middle_block(hcur, emb, context, num_frames, call)
        for block in self.output_blocks:
            hcur = block(torch.cat([hcur, hs.pop()], dim=1), emb, context, num_frames, call)
        return self.out[2](norm_act(self.out[0], hcur, True, call, reuse=True))

    def compile(self, mode: str | None = None) -> MultiViewUNet:
        """Run the blocks of inference calls through ``torch.compile`` (shapes static; recompiled
        when they change). ``mode`` None: "reduce-overhead" (CUDA graphs) on CUDA; on the CPU
        inductor's freezing, which folds the weights into the graph as constants, prepacked for
        oneDNN's convolutions and MKL's GEMMs (measured on 2 cores: 0.92x the diffusers stand-in
        at the demo shape, against 1.03x eager; at the real shape 1.13x, against 0.96x eager,
        and 0.89-1.01x eager in one process, where plain inductor was 1.00-1.07x). Frozen weights are those of the first
        compiled call: if they change later, the model warns and runs eager from then on. Calls
        with autograd on stay eager. Returns the model."""
        if mode is None and self.device.type == "cuda":
            mode = "reduce-overhead"
        kw = {"options": {"freezing": True}} if mode is None and self.device.type == "cpu" else {"mode": mode}
        self.compiled_body = torch.compile(self._body, dynamic=False, fullgraph=True, **kw)
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
                      stacklevel=3)
        self.compiled_body = None
        return True

    def prepare(self, context, camera=None, num_frames: int = 1, ip=None) -> UNetCache:
        """The step-invariant work of a call with these conditioning inputs (same shapes and rules
        as ``forward``), done once: pass the result as ``cache=`` to every step of a generation.
        Under autograd the cached tensors keep their graph; caching is only ever opt-in."""
        if not isinstance(context, torch.Tensor) or context.ndim < 1:
            raise InputError(f"context must be a (B·F, L, {self.context_dim}) tensor; got {type(context).__name__}")
        n = context.shape[0]
        if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1 or n % num_frames:
            raise InputError(f"num_frames must be a positive integer dividing the batch {n}; got {num_frames!r}")
        return self._prepare(context, camera, num_frames, ip, n, with_kv=True)

    def _prepare(self, context, camera, num_frames: int, ip, n: int, with_kv: bool) -> UNetCache:
        context = common.check_tokens(self._as(context, "context"), n, self.context_dim, "context")
        camera_emb = None
        if camera is not None:
            if self.camera_dim is None:
                raise InputError("this UNet has no camera embedding; pass camera=None")
            camera = self._as(camera, "camera")
            if camera.shape != (n, self.camera_dim):
                raise InputError(f"camera must be ({n}, {self.camera_dim}); got {tuple(camera.shape)}")
            camera_emb = self.camera_embed(camera)

        # A group's frames usually share their prompt (the pipeline repeats it per frame): then
        # the resampler runs once per group, and cross-attention keys/values are made once.
        grouped = num_frames > 1 and _same_in_groups(context, num_frames)
        if grouped:
            context = context[::num_frames].contiguous()
        if self.ip_dim > 0:
            if ip is None:
                raise InputError("ImageDream UNet needs ip (CLIP hidden states, (B·F, 257, 1280))")
            ip = self._as(ip, "ip")
            if ip.ndim != 3 or ip.shape[0] != n or ip.shape[2] != RESAMPLER_EMBEDDING_DIM:
                raise InputError(f"ip must be ({n}, T, {RESAMPLER_EMBEDDING_DIM}); got {tuple(ip.shape)}")
            if num_frames > 1 and _same_in_groups(ip, num_frames):
                tokens = self.image_embed(ip[::num_frames])
                if not grouped:
                    tokens = tokens.repeat_interleave(num_frames, dim=0)
            else:
                tokens = self.image_embed(ip)
                if grouped:  # per-frame image prompts after all: back to per-frame context
                    context, grouped = context.repeat_interleave(num_frames, dim=0), False
            context = torch.cat([context, tokens], dim=1)
        elif ip is not None:
            raise InputError("this UNet has no image-prompt path (ip_dim 0); pass ip=None and ip_img=None")
        kv = {}
        if with_kv:
            for module in self.modules():
                if isinstance(module, BasicTransformerBlock3D):
                    kv[module.attn2] = module.attn2.context_kv(context)
        return UNetCache(n, num_frames, grouped, context, camera_emb, kv)

    def _place_reference(self, x: torch.Tensor, ref: torch.Tensor, num_frames: int) -> torch.Tensor:
        """x with frame F−1 of every group replaced by the reference latent (out of place)."""
        n, c, h, w = x.shape
        batch = n // num_frames
        if ref.ndim != 4 or ref.shape[0] != batch or ref.shape[2:] != (h, w) or ref.shape[1] > c:
            raise InputError(f"ip_img must be ({batch}, <= {c}, {h}, {w}); got {tuple(ref.shape)}")
        groups = x.reshape(batch, num_frames, c, h, w)
        last = groups[:, -1]
        if ref.shape[1] < c:
            ref = torch.cat([ref, last[:, ref.shape[1]:]], dim=1)
        return torch.cat([groups[:, :-1], ref[:, None]], dim=1).reshape(n, c, h, w)


def _same_in_groups(t: torch.Tensor, num_frames: int) -> bool:
    """Whether every frame of each group of ``num_frames`` holds the same values as its first."""
    g = t.reshape(t.shape[0] // num_frames, num_frames, -1)
    return torch.equal(g[:, 1:], g[:, :1].expand(-1, num_frames - 1, -1))


def load_unet(folder: str | os.PathLike, *, dtype: str = "float32", device: str | torch.device = "cpu",
              attention: str = "auto", chunk_size: int = 1024, channels_last: bool | None = None,
              compile: bool = False, winograd_conv: bool | None = None) -> MultiViewUNet:
    """Build the UNet described by ``folder/config.json`` and load its weights strictly.

    ``dtype`` is the compute dtype (float32, float16 or bfloat16; files may hold any of them);
    ``attention`` the default mode (auto | sdpa | chunked | naive), ``chunk_size`` the query
    block of the chunked mode; ``channels_last`` the activation layout inside the model (the
    interface stays NCHW either way). ``winograd_conv``: the wide 3x3 convolutions of inference
    calls as Winograd F(4x4, 3x3) (``winograd.Conv2d``; 0.3-0.6x oneDNN's time per layer, 3e-6
    relative error); by default on for float32 on the CPU. Activations are channels-last by
    default in float16 and bfloat16, where oneDNN's and cuDNN's convolutions are fastest in it
    (about 2x on an AMX CPU), and with Winograd convolutions in a model wide enough for them
    (their tile gathers read whole channel rows in it); NCHW otherwise (float32 on CUDA, with
    ``winograd_conv=False``, or a narrow model such as the demo's).
    ``compile``: ``model.compile()`` (torch.compile of the inference step; the compiled graph
    has the direct convolutions).
    """
    check_load_options(dtype, attention, chunk_size)
    config = UNetConfig.from_folder(folder)
    model = common.load_model(lambda: MultiViewUNet(config), load_state(folder), str(folder), dtype=dtype,
                              device=device, attention=attention, chunk_size=chunk_size, winograd_conv=winograd_conv)
    if channels_last is None:
        channels_last = dtype != "float32" or (model.winograd_conv and bool(winograd.wide_layers(model)))
    model.channels_last = bool(channels_last)
    if model.channels_last:
        model.to(memory_format=torch.channels_last)
    return model.compile() if compile else model
