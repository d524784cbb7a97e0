"""The torch backend's inference speed-ups, in one place, applied to a loaded model.

The model files (``unet``, ``vae``, ``upsampler``, ``clip``) are the networks only. After
loading, ``apply`` swaps a model's modules for subclasses with faster inference forwards (the
way diffusers swaps attention processors): the parameters, their names and the checkpoint
stay the same, and every swapped forward falls back to the plain one whenever autograd records
a graph. What the swaps bring:

- ``winograd``: 3x3 convolutions as Winograd F(4x4, 3x3) (float32 on the CPU) or one im2col
  GEMM (small maps);
- ``buffers``: the largest intermediates written into buffers kept between calls on the CPU;
- ``norms``: GroupNorm + SiLU in one float32 buffer, half-precision LayerNorm without copies;
- ``unet``: in-place residual adds and GEGLU, channels-last activations, the no-grad wrapper
  (``records_graph``) and ``torch.compile`` of the blocks (``compile=True``).

One switch turns them all off: ``load_*(..., fast=False)``, or ``OXIGAF_TORCH_FAST=0`` in the
environment (the default of ``fast=None``); ``compile=True`` still compiles then. The outputs
agree with the plain models' to the parity tests' tolerances.
"""

from __future__ import annotations

import os

import torch
from torch import nn

ENV = "OXIGAF_TORCH_FAST"


def enabled(fast: bool | None = None) -> bool:
    """Whether the speed-ups apply: ``fast`` when given, else ``OXIGAF_TORCH_FAST`` (default on)."""
    if fast is not None:
        return bool(fast)
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def records_graph(model: nn.Module, *inputs) -> bool:
    """Whether a call of ``model`` on ``inputs`` must record autograd's graph: grad mode is on and
    a parameter or an input tensor requires a gradient. The sped-up models' forwards run under
    ``torch.no_grad`` otherwise, and so take their inference paths for callers that never asked
    for gradients but did not turn grad mode off either, the pipeline among them (loaded weights
    are frozen: ``common.load_weights``)."""
    if not torch.is_grad_enabled():
        return False
    return (any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)
            or any(p.requires_grad for p in model.parameters()))


def swap(model: nn.Module, table: dict) -> nn.Module:
    """Give every module of ``model`` whose exact class is a key of ``table`` the class it maps
    to (a subclass that adds no parameters): same weights, same names, another forward."""
    for module in model.modules():
        fast_class = table.get(type(module))
        if fast_class is not None:
            module.__class__ = fast_class
    return model


def apply(model: nn.Module, fast: bool | None = None, **options) -> nn.Module:
    """``model`` (a loaded ``MultiViewUNet``, ``VAE`` or ``UpsamplerUNet``) with the speed-ups of
    its kind when ``enabled(fast)``; ``options`` are that kind's (``unet.speed_up``,
    ``models.speed_up_vae``, ``models.speed_up_upsampler``)."""
    from ..unet import MultiViewUNet
    from ..upsampler import UpsamplerUNet
    from ..vae import VAE

    on = enabled(fast)
    if isinstance(model, MultiViewUNet):
        from .unet import speed_up

        return speed_up(model, on, **options)
    from .models import speed_up_upsampler, speed_up_vae

    if isinstance(model, VAE):
        return speed_up_vae(model, on, **options)
    if isinstance(model, UpsamplerUNet):
        return speed_up_upsampler(model, on, **options)
    raise TypeError(f"no speed-ups for a {type(model).__name__}")
