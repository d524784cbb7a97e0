"""The Stable Diffusion VAE (diffusers ``AutoencoderKL``, KL-f8) in MLX: NHWC inside, NCHW outside.

The module tree mirrors diffusers' key names (``encoder.down_blocks.0.resnets.0.norm1.weight``,
``decoder.mid_block.attentions.0.to_q.weight``, ``quant_conv.weight`` …), so the safetensors
names are the parameter names and loading is strict (conv weights are transposed once by
``common.load_weights``). Files written by diffusers before 0.14 spell the mid-block attention
``query``/``key``/``value``/``proj_attn``; those names are mapped by an explicit table before
the strict check.

Numerics follow diffusers: GroupNorm eps 1e-6 (PyTorch grouping, float32 whatever the dtype),
the encoder downsamples with a (0, 1, 0, 1) pad and a stride-2 3×3 convolution without padding,
the mid block is resnet → single-head attention over all H·W positions (residual) → resnet,
the decoder upsamples by nearest ×2 and a 3×3 convolution. Float32 is the default dtype: the
SD VAE overflows in float16 at high resolution.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from oxigaf import vae as plan
from oxigaf.config import VAEConfig, check_load_options
from oxigaf.errors import InputError
from oxigaf.vae import LOGVAR_RANGE, read_vae_state

from . import common
from .common import ResnetSkeleton, Upsample, attention, group_norm, norm32

EPS = 1e-6


# --------------------------------------------------------------------------- blocks


class ResnetBlock2D(ResnetSkeleton):
    """norm → SiLU → conv → norm → SiLU → conv, plus the input (1×1 conv when widths differ)."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(groups, cin, EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(groups, cout, EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_shortcut = nn.Conv2d(cin, cout, 1)
        self.act = nn.silu


class AttentionBlock(nn.Module):
    """Single-head self-attention over every spatial position, with its own GroupNorm."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(groups, channels, EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x, mode: str, chunk_size: int):
        b, h, w, c = x.shape
        # NHWC flattened row-major is PyTorch's token order.
        t = norm32(self.group_norm, x).reshape(b, h * w, c)
        q, k, v = (lin(t)[:, None] for lin in (self.to_q, self.to_k, self.to_v))
        o = attention(q, k, v, mode, chunk_size=chunk_size)[:, 0]
        return x + self.to_out[0](o).reshape(b, h, w, c)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, groups) for _ in range(2)]
        self.attentions = [AttentionBlock(channels, groups)] if add_attention else []

    def __call__(self, x, mode: str, chunk_size: int):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x, mode, chunk_size)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def __call__(self, x):
        # Pad right and bottom only: the reference's asymmetric "same" for stride 2.
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))


class DownEncoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(layers)]
        self.downsamplers = [Downsample(cout)] if downsample else []

    def __call__(self, x):
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class UpDecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(layers)]
        self.upsamplers = [Upsample(cout)] if upsample else []

    def __call__(self, x):
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = [
            DownEncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < len(ch) - 1)
            for i in range(len(ch))
        ]
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = group_norm(g, ch[-1], EPS)
        # Mean and log-variance: twice the latent channels.
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def __call__(self, x, mode: str, chunk_size: int):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x, mode, chunk_size)
        return self.conv_out(nn.silu(norm32(self.conv_norm_out, x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        # One more resnet per block than the encoder has.
        self.up_blocks = [
            UpDecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < len(ch) - 1)
            for i in range(len(ch))
        ]
        self.conv_norm_out = group_norm(g, ch[-1], EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def __call__(self, z, mode: str, chunk_size: int):
        return self.tail(self.trunk(z, mode, chunk_size))

    def trunk(self, z, mode: str, chunk_size: int):
        """conv_in and the mid block, at latent resolution (the only global operation: attention)."""
        return self.mid_block(self.conv_in(z), mode, chunk_size)

    def tail(self, x):
        """The up blocks and the output layers: convolutions, and GroupNorms over what they are given."""
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(norm32(self.conv_norm_out, x)))


# --------------------------------------------------------------------------- the VAE


class VAE(nn.Module):
    """diffusers ``AutoencoderKL``: ``encode`` images in [-1, 1] to the posterior mean, ``decode``
    unscaled latents to images in [-1, 1], both NCHW. ``scaling_factor`` is left to the caller.

    Batches run one image at a time, each evaluated before the next (each image's numbers are
    the same as when decoded alone, and peak memory is one image's). With ``tile_size`` > 0 (in
    **pixels**, a multiple of the scale factor, 8 for SD), images larger than a tile are decoded
    in overlapping tiles of ``tile_size`` pixels that overlap by ``tile_overlap`` pixels (default
    a quarter tile) and are cross-faded with linear ramps. The mid block (global attention, at
    latent resolution) always sees the whole latent; the up blocks' GroupNorms see one tile, so
    tiled output is close to but not equal to untiled (see tests/test_vae.py for the measured
    difference).
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = config.shift_factor
        self.scale_factor = config.downsampling_factor
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        if config.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(c, c, 1)
        self.attention = "auto"
        self.chunk_size = 1024
        self.tile_size = 0
        self.tile_overlap = 0

    @property
    def dtype(self) -> mx.Dtype:
        return self.decoder.conv_in.weight.dtype

    def _input(self, x, channels: int, what: str) -> mx.array:
        x = x if isinstance(x, mx.array) else mx.array(np.asarray(x))
        if x.ndim != 4 or x.shape[1] != channels:
            raise InputError(f"VAE {what} must be (batch, {channels}, height, width); got {tuple(x.shape)}")
        if not mx.issubdtype(x.dtype, mx.floating):
            raise InputError(f"VAE {what} must be floating point; got {x.dtype}")
        return common.nchw_to_nhwc(x.astype(self.dtype))

    def encode(self, images, return_logvar: bool = False):
        """Images (B, 3, H, W) in [-1, 1] -> posterior mean (B, latent, H/f, W/f), unscaled;
        with ``return_logvar`` also the log-variance, clamped to [-30, 20]."""
        x = self._input(images, self.config.in_channels, "images")
        mode = common.resolve_attention(self.attention)
        moments = []
        for i in range(x.shape[0]):
            m = self.encoder(x[i:i + 1], mode, self.chunk_size)
            if "quant_conv" in self:
                m = self.quant_conv(m)
            mx.eval(m)
            moments.append(m)
        moments = common.nhwc_to_nchw(mx.concatenate(moments, axis=0))
        c = self.config.latent_channels
        mean, logvar = moments[:, :c], moments[:, c:]
        if return_logvar:
            return mean, mx.clip(logvar, *LOGVAR_RANGE)
        return mean

    def decode(self, latents, tile_size: int | None = None, tile_overlap: int | None = None):
        """Unscaled latents (B, latent, h, w) -> images (B, 3, h·f, w·f) in [-1, 1].

        ``tile_size`` / ``tile_overlap`` (pixels) override the values given at load time for this
        call; 0 disables tiling. Images no larger than a tile are decoded whole.
        """
        z = self._input(latents, self.config.latent_channels, "latents")
        f = self.scale_factor
        tile, overlap = plan.call_tiling((self.tile_size, self.tile_overlap), tile_size, tile_overlap, f)
        mode = common.resolve_attention(self.attention)
        outs = []
        for i in range(z.shape[0]):
            zi = z[i:i + 1]
            if "post_quant_conv" in self:
                zi = self.post_quant_conv(zi)
            if plan.is_tiled(tile, zi.shape[1], zi.shape[2], f):
                img = self._decode_tiled(zi, tile // f, overlap // f, mode)
            else:
                img = self.decoder(zi, mode, self.chunk_size)
            mx.eval(img)
            outs.append(img)
        return common.nhwc_to_nchw(mx.concatenate(outs, axis=0))

    def _decode_tiled(self, z, tile: int, overlap: int, mode: str):
        """One latent (1, h, w, C); tiles of ``tile`` latent pixels overlapping by ``overlap``.

        The trunk (conv_in and the mid block, whose attention is global) runs on the whole latent:
        it is small, at latent resolution. Only the up blocks, where the memory is, run per tile.
        """
        f = self.scale_factor
        h = self.decoder.trunk(z, mode, self.chunk_size)
        mx.eval(h)
        _, lh, lw, _ = h.shape
        out = mx.zeros((1, lh * f, lw * f, self.config.out_channels), dtype=mx.float32)
        weight = mx.zeros((1, lh * f, lw * f, 1), dtype=mx.float32)
        for t in plan.tiles(lh, lw, tile, overlap, f):
            img = self.decoder.tail(h[:, t.y:t.y + t.h, t.x:t.x + t.w]).astype(mx.float32)
            wt = mx.array(t.weight)[None, :, :, None]
            ys, xs = slice(t.y * f, (t.y + t.h) * f), slice(t.x * f, (t.x + t.w) * f)
            out[:, ys, xs] = out[:, ys, xs] + img * wt
            weight[:, ys, xs] = weight[:, ys, xs] + wt
            # One tile's activations at a time: evaluate before building the next tile's graph.
            mx.eval(out, weight)
        return (out / weight).astype(z.dtype)


# --------------------------------------------------------------------------- loading


def load_vae(folder: str | os.PathLike, *, dtype: str = "float32", tile_size: int = 0,
             tile_overlap: int | None = None, attention: str = "auto", chunk_size: int = 1024) -> VAE:
    """Build the VAE described by ``folder/config.json`` and load its weights strictly.

    ``dtype``: float32 (default; the SD VAE overflows in float16), float16 or bfloat16.
    ``tile_size`` / ``tile_overlap``: default decode tiling in pixels (see ``VAE``); 0 = never.
    ``attention`` / ``chunk_size``: mode of the mid-block attention (auto | sdpa | chunked | naive).
    """
    check_load_options(dtype, attention, chunk_size)
    config = VAEConfig.from_folder(folder)
    config.check_geometry()
    tile_size, tile_overlap = plan.tile_plan(tile_size, tile_overlap, config.downsampling_factor)
    model = common.load_model(lambda: VAE(config), read_vae_state(folder), str(folder), dtype=dtype,
                              attention=attention, chunk_size=chunk_size)
    model.tile_size = tile_size
    model.tile_overlap = tile_overlap
    return model
