"""The multi-view UNet of MVDream / ImageDream (``MultiViewUNetModel``) in PyTorch, NCHW.

The module tree mirrors the published checkpoint's original LDM key names (``time_embed``,
``camera_embed``, ``image_embed``, ``input_blocks``, ``middle_block``, ``output_blocks``,
``out``), so the safetensors names are the parameter names and loading is strict.

Numerics follow the reference: the timestep embedding is computed in float32, GroupNorm and
LayerNorm run in float32, attention softmax runs in float32 (``common.attention``), and the
self-attention of every transformer joins the tokens of all F views of a batch item. Frames of
a group that carry the same text and image prompt (what the pipeline passes) share one
resampler pass and one set of cross-attention keys and values, their queries attending together.

This file is the network only. ``load_unet`` applies the CPU inference speed-ups of
``oxigaf_torch.fast`` after loading (``fast=False`` or ``OXIGAF_TORCH_FAST=0`` leaves them off).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from oxigaf import unet as checks
from oxigaf.checkpoints import load_state
from oxigaf.config import UNET_NORM_GROUPS, UNetConfig, check_load_options
from oxigaf.errors import InputError
from oxigaf.unet import RESAMPLER_DEPTH, RESAMPLER_DIM_HEAD, RESAMPLER_EMBEDDING_DIM, RESAMPLER_FF_MULT, RESAMPLER_HEADS

from . import common
from .common import GroupNorm32, LayerNorm32, Upsample, merge_heads, split_heads, timestep_embedding
from .common import attention as scaled_attention
from .resampler import Resampler


@dataclass(frozen=True)
class _Call:
    """Per-call settings handed down to every attention layer."""

    mode: str
    chunk_size: int
    ip_weight: float
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

    def queries_and_kv(self, x: torch.Tensor, context: torch.Tensor | None, call: _Call):
        """The queries, and the keys/values from the call's prepared cache or from ``context``."""
        kv = call.kv.get(self) if call.kv is not None else None
        if kv is None:
            kv = self.context_kv(x if context is None else context)
        return split_heads(self.to_q(x), self.heads), kv

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, call: _Call) -> torch.Tensor:
        q, kv = self.queries_and_kv(x, context, call)
        scale = 1.0 / math.sqrt(self.dim_head)
        out = scaled_attention(q, kv[0], kv[1], call.mode, scale=scale, chunk_size=call.chunk_size)
        if self.ip_dim > 0:
            out_ip = scaled_attention(q, kv[2], kv[3], call.mode, scale=scale, chunk_size=call.chunk_size)
            out = out + call.ip_weight * out_ip
        return self.to_out(merge_heads(out))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        # net.1 is the reference's Dropout slot
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Identity(), nn.Linear(inner, dim))

    def forward(self, x):
        return self.net(x)


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
        x = self.attn1(self.norm1(x), None, call) + x
        if not call.grouped:
            x = x.reshape(bf, n, c)
        # grouped: every frame of a group has the same context, so its queries may as well
        # attend to it together (softmax is per query)
        x = self.attn2(self.norm2(x), context, call) + x
        x = self.ff(self.norm3(x)) + x
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
        t = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, context, num_frames, call)
        t = self.proj_out(t).reshape(b, h, w, c).permute(0, 3, 1, 2)
        return x + t  # x first: the sum keeps x's layout


# --------------------------------------------------------------------------- convolutional parts


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(
            GroupNorm32(UNET_NORM_GROUPS, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # out_layers.2 is the reference's Dropout slot
        self.out_layers = nn.Sequential(
            GroupNorm32(UNET_NORM_GROUPS, out_channels), nn.SiLU(), nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, call: _Call | None = None) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        h = self.out_layers(h)
        return h + self.skip_connection(x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

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
        self.input_blocks = nn.ModuleList([CondSequential(nn.Conv2d(c.in_channels, ch, 3, padding=1))])
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
            GroupNorm32(UNET_NORM_GROUPS, ch), nn.SiLU(), nn.Conv2d(c.model_channels, c.out_channels, 3, padding=1)
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
        """
        out_dtype = x.dtype if isinstance(x, torch.Tensor) and x.is_floating_point() else self.dtype
        x = self._as(x, "x")
        checks.check_latents(tuple(x.shape), self.in_channels, len(self.config.channel_mult))
        n = x.shape[0]
        checks.check_frames(num_frames, n)
        mode = common.resolve_attention(self.attention if attention is None else attention, self.device)
        timesteps = common.per_item(timesteps, n, "timesteps", self.device)

        if cache is None:
            cache = self._prepare(context, camera, num_frames, ip, n, with_kv=False)
        else:
            made_for = (cache.batch, cache.num_frames) if isinstance(cache, UNetCache) else (None, None)
            checks.check_cache(made_for, (n, num_frames), context is not None or camera is not None or ip is not None)

        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(self.dtype))
        if cache.camera_emb is not None:
            emb = emb + cache.camera_emb
        if ip_img is not None:
            ip_img = self._as(ip_img, "ip_img")
            checks.check_reference(tuple(ip_img.shape), tuple(x.shape), num_frames, self.ip_dim)
            x = self._place_reference(x, ip_img, num_frames)
        call = _Call(mode, self.chunk_size, float(self.ip_weight if ip_weight is None else ip_weight),
                     cache.grouped, cache.kv or None)
        return self.blocks(x, emb, cache.context, num_frames, call).to(out_dtype)

    def blocks(self, x, emb, context, num_frames: int, call: _Call) -> torch.Tensor:
        """The input, middle and output blocks and the output layers."""
        hs = []
        hcur = x
        for block in self.input_blocks:
            hcur = block(hcur, emb, context, num_frames, call)
            hs.append(hcur)
        hcur = self.middle_block(hcur, emb, context, num_frames, call)
        for block in self.output_blocks:
            hcur = block(torch.cat([hcur, hs.pop()], dim=1), emb, context, num_frames, call)
        return self.out(hcur)

    def prepare(self, context, camera=None, num_frames: int = 1, ip=None) -> UNetCache:
        """The step-invariant work of a call with these conditioning inputs (same shapes and rules
        as ``forward``), done once: pass the result as ``cache=`` to every step of a generation.
        Under autograd the cached tensors keep their graph; caching is only ever opt-in."""
        if not isinstance(context, torch.Tensor) or context.ndim < 1:
            raise InputError(f"context must be a (B·F, L, {self.context_dim}) tensor; got {type(context).__name__}")
        n = context.shape[0]
        checks.check_frames(num_frames, n)
        return self._prepare(context, camera, num_frames, ip, n, with_kv=True)

    def _prepare(self, context, camera, num_frames: int, ip, n: int, with_kv: bool) -> UNetCache:
        context = common.check_tokens(self._as(context, "context"), n, self.context_dim, "context")
        camera_emb = None
        if camera is not None:
            camera = self._as(camera, "camera")
            checks.check_camera(tuple(camera.shape), n, self.camera_dim)
            camera_emb = self.camera_embed(camera)

        # A group's frames usually share their prompt (the pipeline repeats it per frame): then
        # the resampler runs once per group, and cross-attention keys/values are made once.
        grouped = num_frames > 1 and _same_in_groups(context, num_frames)
        if grouped:
            context = context[::num_frames].contiguous()
        ip = None if ip is None else self._as(ip, "ip")
        checks.check_image_prompt(None if ip is None else tuple(ip.shape), n, self.ip_dim)
        if self.ip_dim > 0:
            if num_frames > 1 and _same_in_groups(ip, num_frames):
                tokens = self.image_embed(ip[::num_frames])
                if not grouped:
                    tokens = tokens.repeat_interleave(num_frames, dim=0)
            else:
                tokens = self.image_embed(ip)
                if grouped:  # per-frame image prompts after all: back to per-frame context
                    context, grouped = context.repeat_interleave(num_frames, dim=0), False
            context = torch.cat([context, tokens], dim=1)
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
              attention: str = "auto", chunk_size: int = 1024, fast: bool | None = None, **speed) -> MultiViewUNet:
    """Build the UNet described by ``folder/config.json`` and load its weights strictly.

    ``dtype`` is the compute dtype (float32, float16 or bfloat16; files may hold any of them);
    ``attention`` the default mode (auto | sdpa | chunked | naive), ``chunk_size`` the query
    block of the chunked mode. ``fast`` (None: on unless ``OXIGAF_TORCH_FAST=0``): the inference
    speed-ups of ``oxigaf_torch.fast.unet.speed_up``, which takes the options in ``speed``
    (``compile=True`` among them).
    """
    from . import fast as speedups

    check_load_options(dtype, attention, chunk_size)
    config = UNetConfig.from_folder(folder)
    model = common.load_model(lambda: MultiViewUNet(config), load_state(folder), str(folder), dtype=dtype,
                              device=device, attention=attention, chunk_size=chunk_size)
    return speedups.apply(model, fast, **speed)
