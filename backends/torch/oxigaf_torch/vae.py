"""The Stable Diffusion VAE (diffusers ``AutoencoderKL``, KL-f8) in PyTorch, NCHW.

The module tree mirrors diffusers' key names (``encoder.down_blocks.0.resnets.0.norm1.weight``,
``decoder.mid_block.attentions.0.to_q.weight``, ``quant_conv.weight`` …), so the safetensors
names are the parameter names and loading is strict. Files written by diffusers before 0.14
spell the mid-block attention ``query``/``key``/``value``/``proj_attn``; those names are
mapped by an explicit table before the strict check.

Numerics follow diffusers: GroupNorm eps 1e-6 (computed in float32 whatever the dtype), the
encoder downsamples with a (0, 1, 0, 1) pad and a stride-2 3×3 convolution without padding,
the mid block is resnet → single-head attention over all H·W positions (residual) → resnet,
the decoder upsamples by nearest ×2 and a 3×3 convolution. Float32 is the default dtype:
the SD VAE overflows in float16 at high resolution.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from oxigaf.checkpoints import load_state, rename
from oxigaf.config import VAEConfig, check_load_options
from oxigaf.errors import ConfigError, InputError, ModelLoadError

from . import common, winograd
from .common import Conv2d, GroupNorm32, ResnetSkeleton, Upsample, attention

EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)

# diffusers < 0.14 names of the mid-block attention's layers -> today's names.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_PREFIXES = ("encoder.mid_block.attentions.", "decoder.mid_block.attentions.")


# --------------------------------------------------------------------------- blocks


class ResnetBlock2D(ResnetSkeleton):
    """norm → SiLU → conv → norm → SiLU → conv, plus the input (1×1 conv when widths differ)."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm32(groups, cin, eps=EPS)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.norm2 = GroupNorm32(groups, cout, eps=EPS)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = Conv2d(cin, cout, 1) if cin != cout else None
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
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

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
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < len(ch) - 1)
            for i in range(len(ch))
        ])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm32(g, ch[-1], eps=EPS)
        # Mean and log-variance: twice the latent channels.
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

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
        self.conv_in = Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        # One more resnet per block than the encoder has.
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < len(ch) - 1)
            for i in range(len(ch))
        ])
        self.conv_norm_out = GroupNorm32(g, ch[-1], eps=EPS)
        self.conv_out = Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

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


# --------------------------------------------------------------------------- tiling


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``length``; the last one is flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def blend_ramp(size: int, ramp: int, head: bool, tail: bool) -> np.ndarray:
    """1-D tile weight: 1 inside, a linear ramp from ~0 over ``ramp`` samples at each edge that
    another tile overlaps, so overlapping tiles cross-fade and tile borders carry little weight."""
    w = np.ones(size, np.float32)
    r = min(ramp, size)
    if r > 0:
        up = (np.arange(r, dtype=np.float32) + 0.5) / r
        if head:
            w[:r] = np.minimum(w[:r], up)
        if tail:
            w[size - r:] = np.minimum(w[size - r:], up[::-1])
    return w


def _tile_plan(tile_size: int, tile_overlap: int | None, factor: int) -> tuple[int, int]:
    """Pixel tile size and overlap, checked: multiples of the VAE's scale factor, overlap < tile."""
    if not isinstance(tile_size, int) or isinstance(tile_size, bool) or tile_size < 0 or tile_size % factor:
        raise ConfigError(f"VAE tile_size must be 0 or a positive multiple of {factor} pixels; got {tile_size!r}")
    if tile_overlap is None:
        tile_overlap = (tile_size // 4) // factor * factor
    if (not isinstance(tile_overlap, int) or isinstance(tile_overlap, bool) or tile_overlap < 0
            or tile_overlap % factor or (tile_size and tile_overlap >= tile_size)):
        raise ConfigError(
            f"VAE tile_overlap must be a multiple of {factor} pixels in [0, tile_size); got {tile_overlap!r}"
        )
    return tile_size, tile_overlap


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
        self.scale_factor = 2 ** (len(config.block_out_channels) - 1)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        self.quant_conv = Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = Conv2d(c, c, 1) if config.use_post_quant_conv else None
        self.attention = "auto"
        self.chunk_size = 1024
        self.tile_size = 0
        self.tile_overlap = 0
        # the decoder's activation layout (load_vae: channels-last with Winograd convolutions)
        self.channels_last = False

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
        if tile_size is None:
            tile, overlap = self.tile_size, self.tile_overlap if tile_overlap is None else tile_overlap
        else:
            tile, overlap = tile_size, tile_overlap
        tile, overlap = _tile_plan(tile, overlap, self.scale_factor)
        mode = self._mode()
        outs = []
        for i in range(z.shape[0]):
            zi = z[i:i + 1]
            if self.post_quant_conv is not None:
                zi = self.post_quant_conv(zi)
            if self.channels_last:
                zi = zi.contiguous(memory_format=torch.channels_last)
            f = self.scale_factor
            if tile and (zi.shape[2] * f > tile or zi.shape[3] * f > tile):
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
        stride = tile - overlap
        out = torch.zeros((1, self.config.out_channels, lh * f, lw * f), dtype=torch.float32, device=z.device)
        weight = torch.zeros((1, 1, lh * f, lw * f), dtype=torch.float32, device=z.device)
        th, tw = min(tile, lh), min(tile, lw)
        for y in tile_starts(lh, tile, stride):
            wy = blend_ramp(th * f, overlap * f, head=y > 0, tail=y + th < lh)
            for x in tile_starts(lw, tile, stride):
                wx = blend_ramp(tw * f, overlap * f, head=x > 0, tail=x + tw < lw)
                img = self.decoder.tail(h[:, :, y:y + th, x:x + tw]).float()
                wt = torch.from_numpy(np.outer(wy, wx)).to(z.device)[None, None]
                out[:, :, y * f:(y + th) * f, x * f:(x + tw) * f] += img * wt
                weight[:, :, y * f:(y + th) * f, x * f:(x + tw) * f] += wt
        return (out / weight).to(z.dtype)


# --------------------------------------------------------------------------- loading


def read_vae_state(folder) -> dict[str, np.ndarray]:
    """The VAE's tensors with legacy (diffusers < 0.14) mid-block attention names mapped to today's."""
    state = load_state(folder)
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        new = next(iter(rename({key: None}, LEGACY_ATTENTION_NAMES))) if key.startswith(_ATTENTION_PREFIXES) else key
        if new in out:
            raise ModelLoadError(f"weights in {folder}: {new!r} appears under both its old and its new name")
        out[new] = value
    return out


def load_vae(folder: str | os.PathLike, *, dtype: str = "float32", device: str | torch.device = "cpu",
             tile_size: int = 0, tile_overlap: int | None = None, attention: str = "auto",
             chunk_size: int = 1024, winograd_conv: bool | None = None) -> VAE:
    """Build the VAE described by ``folder/config.json`` and load its weights strictly.

    ``dtype``: float32 (default; the SD VAE overflows in float16), float16 or bfloat16.
    ``tile_size`` / ``tile_overlap``: default decode tiling in pixels (see ``VAE``); 0 = never.
    ``attention`` / ``chunk_size``: mode of the mid-block attention (auto | sdpa | chunked | naive).
    ``winograd_conv``: the wide 3x3 convolutions of inference calls as Winograd F(4x4, 3x3)
    (``winograd.Conv2d``); by default on for float32 on the CPU. With it, a decoder that has
    layers of ``winograd.MIN_CHANNELS_LAST`` channels runs channels-last, where Winograd pays
    from that width (the SD VAE at 512 px on 2 AMX cores: 11 s against 18 s in NCHW);
    the encoder, at the input's resolution only once per image, stays NCHW.
    """
    check_load_options(dtype, attention, chunk_size)
    config = VAEConfig.from_folder(folder)
    config.check_geometry()
    tile_size, tile_overlap = _tile_plan(tile_size, tile_overlap, 2 ** (len(config.block_out_channels) - 1))
    model = common.load_model(lambda: VAE(config), read_vae_state(folder), str(folder), dtype=dtype,
                              device=device, attention=attention, chunk_size=chunk_size, winograd_conv=winograd_conv)
    model.tile_size = tile_size
    model.tile_overlap = tile_overlap
    model.channels_last = model.winograd_conv and bool(winograd.wide_layers(model.decoder, winograd.MIN_CHANNELS_LAST))
    if model.channels_last:
        model.decoder.to(memory_format=torch.channels_last)
    return model
