"""The Stable Diffusion VAE (diffusers ``AutoencoderKL``, KL-f8) in PyTorch, NCHW.

The module tree mirrors diffusers' key names (``encoder.down_blocks.0.resnets.0.norm1.weight``,
``decoder.mid_block.attentions.0.to_q.weight``, ``quant_conv.weight`` …), so the safetensors
names are the parameter names and loading is strict. Files written by diffusers before 0.14
spell the mid-block attention ``query``/``key``/``value``/``proj_attn``; those names are
mapped by an explicit table before the strict check (``oxigaf.vae``, with the tiling plan).

Numerics follow diffusers: GroupNorm eps 1e-6 (computed in float32 whatever the dtype), the
encoder downsamples with a (0, 1, 0, 1) pad and a stride-2 3×3 convolution without padding,
the mid block is resnet → single-head attention over all H·W positions (residual) → resnet,
the decoder upsamples by nearest ×2 and a 3×3 convolution. Float32 is the default dtype:
the SD VAE overflows in float16 at high resolution.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from oxigaf import vae as plan
from oxigaf.config import VAEConfig, check_load_options
from oxigaf.errors import InputError
from oxigaf.vae import LOGVAR_RANGE, read_vae_state

from . import common
from .common import GroupNorm32, ResnetSkeleton, Upsample, attention

EPS = 1e-6


# --------------------------------------------------------------------------- blocks


class ResnetBlock2D(ResnetSkeleton):
    """norm → SiLU → conv → norm → SiLU → conv, plus the input (1×1 conv when widths differ)."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm32(groups, cin, eps=EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = GroupNorm32(groups, cout, eps=EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None
        self.act = F.silu  # a function, not a module: the module tree stays the checkpoint's


class AttentionBlock(nn.Module):
    """Single-head self-attention over every spatial position, with its own GroupNorm."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm32(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x, mode: str, chunk_size: int):
        b, c, h, w = x.shape
        t = self.group_norm(x).reshape(b, c, h * w).transpose(1, 2)
        q, k, v = (lin(t)[:, None] for lin in (self.to_q, self.to_k, self.to_v))
        o = attention(q, k, v, mode, chunk_size=chunk_size)[:, 0]
        o = self.to_out[0](o)
        return x + o.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([AttentionBlock(channels, groups)] if add_attention else [])

    def forward(self, x, mode: str, chunk_size: int):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x, mode, chunk_size)
        return self.resnets[1](x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # Pad right and bottom only: the reference's asymmetric "same" for stride 2.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class DownEncoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(cout)] if downsample else [])

    def forward(self, x):
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class UpDecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(cout)] if upsample else [])

    def forward(self, x):
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < len(ch) - 1)
            for i in range(len(ch))
        ])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm32(g, ch[-1], eps=EPS)
        # Mean and log-variance: twice the latent channels.
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x, mode: str, chunk_size: int):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x, mode, chunk_size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        # One more resnet per block than the encoder has.
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < len(ch) - 1)
            for i in range(len(ch))
        ])
        self.conv_norm_out = GroupNorm32(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z, mode: str, chunk_size: int):
        return self.tail(self.trunk(z, mode, chunk_size))

    def trunk(self, z, mode: str, chunk_size: int):
        """conv_in and the mid block, at latent resolution (the only global operation: attention)."""
        return self.mid_block(self.conv_in(z), mode, chunk_size)

    def tail(self, x):
        """The up blocks and the output layers: convolutions, and GroupNorms over what they are given."""
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# --------------------------------------------------------------------------- the VAE


class VAE(nn.Module):
    """diffusers ``AutoencoderKL``: ``encode`` images in [-1, 1] to the posterior mean, ``decode``
    unscaled latents to images in [-1, 1], both NCHW. ``scaling_factor`` is left to the caller.

    Batches run one image at a time (each image's numbers are the same as when decoded alone,
    and peak memory is one image's). With ``tile_size`` > 0 (in **pixels**, a multiple of the
    scale factor, 8 for SD), images larger than a tile are decoded in overlapping tiles of
    ``tile_size`` pixels that overlap by ``tile_overlap`` pixels (default a quarter tile) and are
    cross-faded with linear ramps. The mid block (global attention, at latent resolution) always
    sees the whole latent; the up blocks' GroupNorms see one tile, so tiled output is close to
    but not equal to untiled (see tests/test_vae.py for the measured difference).
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
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None
        self.attention = "auto"
        self.chunk_size = 1024
        self.tile_size = 0
        self.tile_overlap = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    def _mode(self) -> str:
        return common.resolve_attention(self.attention, self.device)

    def _input(self, x, channels: int, what: str) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.ndim != 4 or x.shape[1] != channels:
            raise InputError(f"VAE {what} must be (batch, {channels}, height, width); got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise InputError(f"VAE {what} must be floating point; got {x.dtype}")
        return x.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def encode(self, images, return_logvar: bool = False):
        """Images (B, 3, H, W) in [-1, 1] -> posterior mean (B, latent, H/f, W/f), unscaled;
        with ``return_logvar`` also the log-variance, clamped to [-30, 20]."""
        x = self._input(images, self.config.in_channels, "images")
        mode = self._mode()
        moments = []
        for i in range(x.shape[0]):
            m = self.encoder(x[i:i + 1], mode, self.chunk_size)
            if self.quant_conv is not None:
                m = self.quant_conv(m)
            moments.append(m)
        moments = torch.cat(moments)
        mean, logvar = moments.chunk(2, dim=1)
        if return_logvar:
            return mean, logvar.clamp(*LOGVAR_RANGE)
        return mean

    @torch.no_grad()
    def decode(self, latents, tile_size: int | None = None, tile_overlap: int | None = None):
        """Unscaled latents (B, latent, h, w) -> images (B, 3, h·f, w·f) in [-1, 1].

        ``tile_size`` / ``tile_overlap`` (pixels) override the values given at load time for this
        call; 0 disables tiling. Images no larger than a tile are decoded whole.
        """
        z = self._input(latents, self.config.latent_channels, "latents")
        f = self.scale_factor
        tile, overlap = plan.call_tiling((self.tile_size, self.tile_overlap), tile_size, tile_overlap, f)
        mode = self._mode()
        outs = []
        for i in range(z.shape[0]):
            zi = z[i:i + 1]
            if self.post_quant_conv is not None:
                zi = self.post_quant_conv(zi)
            if plan.is_tiled(tile, zi.shape[2], zi.shape[3], f):
                outs.append(self._decode_tiled(zi, tile // f, overlap // f, mode))
            else:
                outs.append(self.decoder(zi, mode, self.chunk_size))
        return torch.cat(outs).contiguous()

    def _decode_tiled(self, z, tile: int, overlap: int, mode: str):
        """One latent (1, C, h, w); tiles of ``tile`` latent pixels overlapping by ``overlap``.

        The trunk (conv_in and the mid block, whose attention is global) runs on the whole latent:
        it is small, at latent resolution. Only the up blocks, where the memory is, run per tile.
        """
        f = self.scale_factor
        h = self.decoder.trunk(z, mode, self.chunk_size)
        _, _, lh, lw = h.shape
        out = torch.zeros((1, self.config.out_channels, lh * f, lw * f), dtype=torch.float32, device=z.device)
        weight = torch.zeros((1, 1, lh * f, lw * f), dtype=torch.float32, device=z.device)
        for t in plan.tiles(lh, lw, tile, overlap, f):
            img = self.decoder.tail(h[:, :, t.y:t.y + t.h, t.x:t.x + t.w]).float()
            wt = torch.from_numpy(t.weight).to(z.device)[None, None]
            ys, xs = slice(t.y * f, (t.y + t.h) * f), slice(t.x * f, (t.x + t.w) * f)
            out[:, :, ys, xs] += img * wt
            weight[:, :, ys, xs] += wt
        return (out / weight).to(z.dtype)


# --------------------------------------------------------------------------- loading


def load_vae(folder: str | os.PathLike, *, dtype: str = "float32", device: str | torch.device = "cpu",
             tile_size: int = 0, tile_overlap: int | None = None, attention: str = "auto",
             chunk_size: int = 1024, fast: bool | None = None, **speed) -> VAE:
    """Build the VAE described by ``folder/config.json`` and load its weights strictly.

    ``dtype``: float32 (default; the SD VAE overflows in float16), float16 or bfloat16.
    ``tile_size`` / ``tile_overlap``: default decode tiling in pixels (see ``VAE``); 0 = never.
    ``attention`` / ``chunk_size``: mode of the mid-block attention (auto | sdpa | chunked | naive).
    ``fast`` (None: on unless ``OXIGAF_TORCH_FAST=0``): the inference speed-ups of
    ``oxigaf_torch.fast.models.speed_up_vae``, which takes the options in ``speed``.
    """
    from . import fast as speedups

    check_load_options(dtype, attention, chunk_size)
    config = VAEConfig.from_folder(folder)
    config.check_geometry()
    tile_size, tile_overlap = plan.tile_plan(tile_size, tile_overlap, config.downsampling_factor)
    model = common.load_model(lambda: VAE(config), read_vae_state(folder), str(folder), dtype=dtype,
                              device=device, attention=attention, chunk_size=chunk_size)
    model.tile_size = tile_size
    model.tile_overlap = tile_overlap
    return speedups.apply(model, fast, **speed)
