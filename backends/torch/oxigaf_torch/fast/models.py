"""The VAE's and the upsampler K-UNet's inference speed-ups, applied to a loaded model: their
3x3 convolutions as ``winograd.FastConv2d``, the VAE decoder's activations channels-last where
Winograd pays from a narrower width in it, the K-UNet's calls without autograd's graph when
nothing needs one (``records_graph``)."""

from __future__ import annotations

import torch
from torch import nn

from ..common import GroupNorm32
from ..upsampler import UpsamplerUNet
from ..vae import VAE, Decoder
from . import records_graph, swap, winograd
from .norms import FastGroupNorm
from .winograd import FastConv2d


def _winograd(model: nn.Module, winograd_conv: bool | None) -> bool:
    """Swap in ``FastConv2d`` and ``FastGroupNorm``; Winograd on where asked (None: float32 on
    the CPU). Returns whether it is on."""
    swap(model, {nn.Conv2d: FastConv2d, GroupNorm32: FastGroupNorm})
    if winograd_conv is None:
        winograd_conv = model.dtype == torch.float32 and model.device.type == "cpu"
    winograd.enable(model, bool(winograd_conv))
    return bool(winograd_conv)


class ChannelsLastDecoder(Decoder):
    """The VAE decoder with channels-last activations (its weights converted to match)."""

    def trunk(self, z, mode: str, chunk_size: int):
        return super().trunk(z.contiguous(memory_format=torch.channels_last), mode, chunk_size)


def speed_up_vae(model: VAE, on: bool = True, *, winograd_conv: bool | None = None) -> VAE:
    """``winograd_conv``: the wide 3x3 convolutions of inference calls as Winograd F(4x4, 3x3)
    (None: on for float32 on the CPU). With it, a decoder that has layers of
    ``winograd.MIN_CHANNELS_LAST`` channels runs channels-last, where Winograd pays from that
    width; the encoder, at the input's resolution only once per image, stays NCHW."""
    model.winograd_conv = model.channels_last = False
    if not on:
        return model
    model.winograd_conv = _winograd(model, winograd_conv)
    model.channels_last = model.winograd_conv and bool(winograd.wide_layers(model.decoder,
                                                                            winograd.MIN_CHANNELS_LAST))
    if model.channels_last:
        model.decoder.__class__ = ChannelsLastDecoder
        model.decoder.to(memory_format=torch.channels_last)
    return model


class FastUpsamplerUNet(UpsamplerUNet):
    """The K-UNet's calls without autograd's graph when nothing needs one."""

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, **kw):
        with torch.set_grad_enabled(records_graph(self, sample, encoder_hidden_states, timestep_cond)):
            return super().forward(sample, timestep, encoder_hidden_states, timestep_cond, **kw)


def speed_up_upsampler(model: UpsamplerUNet, on: bool = True, *, winograd_conv: bool | None = None) -> UpsamplerUNet:
    """``winograd_conv``: as ``speed_up_vae``'s."""
    model.winograd_conv = False
    if not on:
        return model
    model.__class__ = FastUpsamplerUNet
    model.winograd_conv = _winograd(model, winograd_conv)
    return model
