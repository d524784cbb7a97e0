"""The multi-view UNet of MVDream / ImageDream (``MultiViewUNetModel``) in MLX.

The module tree mirrors the published checkpoint's original LDM key names (``time_embed``,
``camera_embed``, ``image_embed``, ``input_blocks``, ``middle_block``, ``output_blocks``,
``out``): numbered children are plain Python lists, and parameter-free slots (SiLU, dropout,
GELU) hold placeholder modules so the indices match. Loading is therefore strict by name.

Arrays are NCHW at the call interface and NHWC inside. Numerics follow the reference: the
timestep embedding is computed in float32, GroupNorm and LayerNorm run in float32, attention
softmax runs in float32 (``common.attention``), and the self-attention of every transformer
joins the tokens of all F views of a batch item (the cross-view attention).

Everything stays lazy: one ``mx.eval`` by the caller per denoising step evaluates the whole
graph (only the chunked attention mode evaluates its query blocks as it goes, to bound memory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from oxigaf import unet as checks
from oxigaf.checkpoints import load_state
from oxigaf.config import UNET_NORM_GROUPS, UNetConfig, check_load_options
from oxigaf.errors import InputError
from oxigaf.unet import RESAMPLER_DEPTH, RESAMPLER_DIM_HEAD, RESAMPLER_EMBEDDING_DIM, RESAMPLER_FF_MULT, RESAMPLER_HEADS

from . import common
from .common import Upsample, attention, group_norm, merge_heads, norm32, split_heads, timestep_embedding
from .resampler import Resampler


@dataclass(frozen=True)
class _Call:
    """Per-call settings handed down to every attention layer (so a call never mutates the model)."""

    mode: str
    chunk_size: int
    ip_weight: float
    # prepared cross-attention keys/values by id() of their attn2 module (``UNetCache.kv``), or None
    kv: dict | None = None


@dataclass(frozen=True, eq=False)
class UNetCache:
    """The step-invariant part of a UNet call (``MultiViewUNet.prepare``): the context with its
    resampled image tokens, every cross-attention's keys and values, the camera embedding.

    Made once per generation, passed as ``unet(x, t, cache=cache, num_frames=F, ip_img=...)``.
    """

    batch: int  # B·F, the frames the cache was made for
    num_frames: int
    context: mx.array
    camera_emb: mx.array | None
    kv: dict


# --------------------------------------------------------------------------- attention


class CrossAttention(nn.Module):
    """Multi-head attention; with ``ip_dim`` > 0 the last ``ip_dim`` context tokens are image
    tokens with their own keys/values, attended separately and added with ``ip_weight``."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, ip_dim: int = 0):
        super().__init__()
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.ip_dim = ip_dim
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        if ip_dim > 0:
            self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
            self.to_v_ip = nn.Linear(context_dim, inner, bias=False)
        self.to_out = [nn.Linear(inner, query_dim), nn.Dropout(0.0)]

    def context_kv(self, context: mx.array) -> tuple:
        """Keys and values of ``context`` (text, then image tokens when ``ip_dim`` > 0), split
        into heads: (k, v) or (k, v, k_ip, v_ip). They depend on nothing that changes per step."""
        if self.ip_dim > 0:
            image = context[:, -self.ip_dim:]
            context = context[:, : context.shape[1] - self.ip_dim]
        kv = (split_heads(self.to_k(context), self.heads), split_heads(self.to_v(context), self.heads))
        if self.ip_dim > 0:
            kv += (split_heads(self.to_k_ip(image), self.heads), split_heads(self.to_v_ip(image), self.heads))
        return kv

    def __call__(self, x: mx.array, context: mx.array | None, call: _Call) -> mx.array:
        kv = call.kv.get(id(self)) if call.kv is not None else None
        if kv is None:
            kv = self.context_kv(x if context is None else context)
        q = split_heads(self.to_q(x), self.heads)
        out = attention(q, kv[0], kv[1], call.mode, chunk_size=call.chunk_size)
        if self.ip_dim > 0:
            k_ip, v_ip = kv[2], kv[3]
            out = out + call.ip_weight * attention(q, k_ip, v_ip, call.mode, chunk_size=call.chunk_size)
        return self.to_out[0](merge_heads(out))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def __call__(self, x):
        h, gate = mx.split(self.proj(x), 2, axis=-1)
        return h * nn.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = [GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim)]

    def __call__(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock3D(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, ip_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, ip_dim=ip_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def __call__(self, x: mx.array, context: mx.array, num_frames: int, call: _Call) -> mx.array:
        n, length, c = x.shape
        # (b·f, l, c) -> (b, f·l, c): self-attention over the tokens of all views together.
        x = x.reshape(n // num_frames, num_frames * length, c)
        x = self.attn1(norm32(self.norm1, x), None, call) + x
        x = x.reshape(n, length, c)
        x = self.attn2(norm32(self.norm2, x), context, call) + x
        return self.ff(norm32(self.norm3, x)) + x


class SpatialTransformer3D(nn.Module):
    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int, depth: int, ip_dim: int):
        super().__init__()
        inner = heads * dim_head
        self.norm = group_norm(UNET_NORM_GROUPS, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = [
            BasicTransformerBlock3D(inner, heads, dim_head, context_dim, ip_dim) for _ in range(depth)
        ]
        self.proj_out = nn.Linear(inner, channels)

    def __call__(self, x: mx.array, context: mx.array, num_frames: int, call: _Call) -> mx.array:
        n, h, w, c = x.shape
        # NHWC flattened to (n, h·w, c) is PyTorch's "b c h w -> b (h w) c" token order.
        t = self.proj_in(norm32(self.norm, x).reshape(n, h * w, c))
        for block in self.transformer_blocks:
            t = block(t, context, num_frames, call)
        return self.proj_out(t).reshape(n, h, w, -1) + x


# --------------------------------------------------------------------------- convolutional blocks


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = [group_norm(UNET_NORM_GROUPS, channels, eps=1e-5), nn.SiLU(),
                          nn.Conv2d(channels, out_channels, 3, padding=1)]
        self.emb_layers = [nn.SiLU(), nn.Linear(emb_channels, out_channels)]
        self.out_layers = [group_norm(UNET_NORM_GROUPS, out_channels, eps=1e-5), nn.SiLU(), nn.Dropout(0.0),
                           nn.Conv2d(out_channels, out_channels, 3, padding=1)]
        if out_channels != channels:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def __call__(self, x: mx.array, emb: mx.array) -> mx.array:
        h = self.in_layers[2](nn.silu(norm32(self.in_layers[0], x)))
        h = h + self.emb_layers[1](nn.silu(emb))[:, None, None, :]
        h = self.out_layers[3](nn.silu(norm32(self.out_layers[0], h)))
        skip = self.skip_connection(x) if "skip_connection" in self else x
        return skip + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def __call__(self, x):
        return self.op(x)


def _run_block(layers: list, h: mx.array, emb: mx.array, context: mx.array, num_frames: int, call: _Call):
    """One numbered block of the LDM UNet (its ``CondSequential``): each layer gets what it takes."""
    for layer in layers:
        if isinstance(layer, ResBlock):
            h = layer(h, emb)
        elif isinstance(layer, SpatialTransformer3D):
            h = layer(h, context, num_frames, call)
        else:
            h = layer(h)
    return h


# --------------------------------------------------------------------------- the UNet


class MultiViewUNet(nn.Module):
    """``MultiViewUNetModel``: SD-2.1-style UNet with camera embedding, 3D self-attention and,
    when ``ip_dim`` > 0 (ImageDream), the image-prompt resampler and reference-latent slot."""

    def __init__(self, config: UNetConfig, *, attention: str = "auto", chunk_size: int = 1024):
        super().__init__()
        c = config
        c.check_geometry()
        self.config = c
        self.attention = attention
        self.chunk_size = chunk_size
        self.in_channels = c.in_channels
        self.model_channels = c.model_channels
        self.context_dim = c.context_dim
        self.camera_dim = c.camera_dim
        self.ip_dim = c.ip_dim
        self.ip_weight = c.ip_weight
        # compile(): mx.compile the blocks, one graph per call key (a plain attribute: a dict set
        # on an mlx Module would join its parameter tree)
        self.compiled = False
        object.__setattr__(self, "_compiled_bodies", {})
        emb_dim = c.model_channels * 4

        if c.ip_dim > 0:
            self.image_embed = Resampler(
                dim=c.context_dim, depth=RESAMPLER_DEPTH, dim_head=RESAMPLER_DIM_HEAD, heads=RESAMPLER_HEADS,
                num_queries=c.ip_dim, embedding_dim=RESAMPLER_EMBEDDING_DIM, output_dim=c.context_dim,
                ff_mult=RESAMPLER_FF_MULT,
            )
        self.time_embed = [nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)]
        if c.camera_dim is not None:
            self.camera_embed = [nn.Linear(c.camera_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)]

        def transformer(ch: int) -> SpatialTransformer3D:
            heads, dim_head = c.heads_for(ch)
            return SpatialTransformer3D(ch, heads, dim_head, c.context_dim, c.transformer_depth, c.ip_dim)

        self.input_blocks = [[nn.Conv2d(c.in_channels, c.model_channels, 3, padding=1)]]
        skip_channels = [c.model_channels]
        ch = c.model_channels
        ds = 1
        last = len(c.channel_mult) - 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, mult * c.model_channels)]
                ch = mult * c.model_channels
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(layers)
                skip_channels.append(ch)
            if level != last:
                self.input_blocks.append([Downsample(ch)])
                skip_channels.append(ch)
                ds *= 2

        # The middle block always has a transformer, whatever attention_resolutions says.
        self.middle_block = [ResBlock(ch, emb_dim), transformer(ch), ResBlock(ch, emb_dim)]

        self.output_blocks = []
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, c.model_channels * mult)]
                ch = c.model_channels * mult
                if ds in c.attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == c.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(layers)

        self.out = [group_norm(UNET_NORM_GROUPS, ch, eps=1e-5), nn.SiLU(),
                    nn.Conv2d(c.model_channels, c.out_channels, 3, padding=1)]

    @property
    def dtype(self) -> mx.Dtype:
        return self.time_embed[0].weight.dtype

    def _as(self, t, name: str) -> mx.array:
        return common.as_float_input(t, name, self.dtype)

    def __call__(self, x, timesteps, context=None, camera=None, num_frames: int = 1, ip=None, ip_img=None, *,
                 attention: str | None = None, ip_weight: float | None = None,
                 cache: UNetCache | None = None) -> mx.array:
        """Noise prediction for every frame, NCHW, in the dtype of ``x``.

        - ``x`` (B·F, C_in, h, w), views fastest (index b·F + f); never modified.
        - ``timesteps`` (B·F,) or a scalar, integer or float.
        - ``context`` (B·F, L, context_dim) text tokens.
        - ``camera`` (B·F, camera_dim) or None (no camera embedding, as in the reference).
        - ``ip`` (B·F, T, 1280) CLIP penultimate hidden states (ImageDream only, required there):
          resampled here into ``ip_dim`` tokens appended after the text tokens.
        - ``ip_img`` (B, c, h, w) clean reference latents: they replace frame F−1 of each group in
          the model input (a new array). With c < C_in (extra conditioning channels concatenated by
          the caller) only the first c channels of that frame are replaced. None: no replacement.
        - ``attention`` overrides the model's attention mode for this call, ``ip_weight`` the
          weight of the image-prompt attention (config default 1.0).
        - ``cache``: ``prepare(context, camera, num_frames, ip)``'s result, in place of
          ``context``, ``camera`` and ``ip`` (the same numbers, without recomputing them).
        """
        out_dtype = x.dtype if isinstance(x, mx.array) and mx.issubdtype(x.dtype, mx.floating) else self.dtype
        x = self._as(x, "x")
        checks.check_latents(tuple(x.shape), self.in_channels, len(self.config.channel_mult))
        n = x.shape[0]
        checks.check_frames(num_frames, n)
        mode = common.resolve_attention(self.attention if attention is None else attention)
        timesteps = common.per_item(timesteps, n, "timesteps")

        call = _Call(mode, self.chunk_size, float(self.ip_weight if ip_weight is None else ip_weight))
        if cache is None:
            cache = self._prepare(context, camera, num_frames, ip, n, mode, with_kv=False)
        else:
            made_for = (cache.batch, cache.num_frames) if isinstance(cache, UNetCache) else (None, None)
            checks.check_cache(made_for, (n, num_frames), context is not None or camera is not None or ip is not None)
        if cache.kv:
            call = _Call(call.mode, call.chunk_size, call.ip_weight, cache.kv)

        emb = _mlp(self.time_embed, timestep_embedding(timesteps, self.model_channels).astype(self.dtype))
        if cache.camera_emb is not None:
            emb = emb + cache.camera_emb
        if ip_img is not None:
            ip_img = self._as(ip_img, "ip_img")
            checks.check_reference(tuple(ip_img.shape), tuple(x.shape), num_frames, self.ip_dim)
            x = self._place_reference(x, ip_img, num_frames)
        context = cache.context

        if not self.compiled or call.mode == "chunked":  # chunked evaluates as it goes: not traceable
            return self._body(x, emb, context, num_frames, call).astype(out_dtype)
        key = (num_frames, call.mode, call.chunk_size, call.ip_weight, call.kv is not None)
        if key not in self._compiled_bodies:
            order = [id(m.attn2) for m in self.modules() if isinstance(m, BasicTransformerBlock3D)]

            def body(x, emb, context, kv):
                c = _Call(key[1], key[2], key[3], dict(zip(order, kv, strict=True)) if key[4] else None)
                return self._body(x, emb, context, key[0], c)

            # the weights are inputs of the compiled graph, so it follows them if they change
            self._compiled_bodies[key] = (order, mx.compile(body, inputs=self.state))
        order, body = self._compiled_bodies[key]
        kv = [call.kv[i] for i in order] if call.kv is not None else []
        return body(x, emb, context, kv).astype(out_dtype)

    def _body(self, x, emb, context, num_frames: int, call: _Call) -> mx.array:
        """The blocks, NCHW in and out: what ``compile`` hands to ``mx.compile``."""
        hs = []
        hcur = common.nchw_to_nhwc(x)
        for block in self.input_blocks:
            hcur = _run_block(block, hcur, emb, context, num_frames, call)
            hs.append(hcur)
        hcur = _run_block(self.middle_block, hcur, emb, context, num_frames, call)
        for block in self.output_blocks:
            hcur = _run_block(block, mx.concatenate([hcur, hs.pop()], axis=-1), emb, context, num_frames, call)
        out = self.out[2](nn.silu(norm32(self.out[0], hcur)))
        return common.nhwc_to_nchw(out)

    def compile(self) -> MultiViewUNet:
        """Run the blocks of every call through ``mx.compile`` (one graph per shape and setting;
        the chunked attention mode stays eager). Returns the model."""
        self.compiled = True
        return self

    def prepare(self, context, camera=None, num_frames: int = 1, ip=None) -> UNetCache:
        """The step-invariant work of a call with these conditioning inputs (same shapes and rules
        as ``__call__``), done once: pass the result as ``cache=`` to every step of a generation.
        Frames of a group with the same text and image prompt (what the pipeline passes) share
        one resampler pass and one set of keys/values. The arrays are evaluated here."""
        if not isinstance(context, mx.array) or context.ndim < 1:
            raise InputError(f"context must be a (B·F, L, {self.context_dim}) array; got {type(context).__name__}")
        n = context.shape[0]
        checks.check_frames(num_frames, n)
        mode = common.resolve_attention(self.attention)  # the resampler's, as a plain call's
        cache = self._prepare(context, camera, num_frames, ip, n, mode, with_kv=True)
        mx.eval(cache.context, cache.camera_emb, *[a for kv in cache.kv.values() for a in kv])
        return cache

    def _prepare(self, context, camera, num_frames: int, ip, n: int, mode: str, with_kv: bool) -> UNetCache:
        call = _Call(mode, self.chunk_size, 1.0)
        context = common.check_tokens(self._as(context, "context"), n, self.context_dim, "context")
        camera_emb = None
        if camera is not None:
            camera = self._as(camera, "camera")
            checks.check_camera(tuple(camera.shape), n, self.camera_dim)
            camera_emb = _mlp(self.camera_embed, camera)
        # With caching, frames that repeat their group's first frame share its work (then repeat).
        share = with_kv and num_frames > 1 and _same_in_groups(context, num_frames)
        ip = None if ip is None else self._as(ip, "ip")
        checks.check_image_prompt(None if ip is None else tuple(ip.shape), n, self.ip_dim)
        if self.ip_dim > 0:
            if with_kv and num_frames > 1 and _same_in_groups(ip, num_frames):
                tokens = self.image_embed(ip[::num_frames], call)
                tokens = tokens if share else mx.repeat(tokens, num_frames, axis=0)
            else:
                tokens, share = self.image_embed(ip, call), False
            context = mx.concatenate([context[::num_frames] if share else context, tokens], axis=1)
        elif share:
            context = context[::num_frames]
        kv = {}
        if with_kv:
            for module in self.modules():
                if isinstance(module, BasicTransformerBlock3D):
                    pairs = module.attn2.context_kv(context)
                    kv[id(module.attn2)] = tuple(mx.repeat(a, num_frames, axis=0) for a in pairs) if share else pairs
        if share:
            context = mx.repeat(context, num_frames, axis=0)
        return UNetCache(n, num_frames, context, camera_emb, kv)

    def _place_reference(self, x: mx.array, ref: mx.array, num_frames: int) -> mx.array:
        """x with frame F−1 of every group replaced by the reference latent (a new array)."""
        n, c, h, w = x.shape
        batch = n // num_frames
        groups = x.reshape(batch, num_frames, c, h, w)
        if ref.shape[1] < c:
            ref = mx.concatenate([ref, groups[:, -1, ref.shape[1]:]], axis=1)
        return mx.concatenate([groups[:, :-1], ref[:, None]], axis=1).reshape(n, c, h, w)


def _same_in_groups(t: mx.array, num_frames: int) -> bool:
    """Whether every frame of each group of ``num_frames`` holds the same values as its first."""
    g = t.reshape(t.shape[0] // num_frames, num_frames, -1)
    return bool(mx.array_equal(g[:, 1:], mx.broadcast_to(g[:, :1], g[:, 1:].shape)).item())


def _mlp(layers: list, x: mx.array) -> mx.array:
    """``time_embed`` / ``camera_embed``: Linear, SiLU, Linear."""
    return layers[2](nn.silu(layers[0](x)))


def load_unet(folder: str | os.PathLike, *, dtype: str = "float32", attention: str = "auto",
              chunk_size: int = 1024, compile: bool = False) -> MultiViewUNet:
    """Build the UNet described by ``folder/config.json`` and load its weights strictly.

    ``dtype`` is the compute dtype (float32, float16 or bfloat16; files may hold any of them);
    ``attention`` the default mode (auto | sdpa | chunked | naive), ``chunk_size`` the query
    block of the chunked mode; ``compile``: ``model.compile()`` (mx.compile of every call's blocks).
    """
    check_load_options(dtype, attention, chunk_size)
    config = UNetConfig.from_folder(folder)
    model = common.load_model(lambda: MultiViewUNet(config), load_state(folder), str(folder), dtype=dtype,
                              attention=attention, chunk_size=chunk_size)
    return model.compile() if compile else model
