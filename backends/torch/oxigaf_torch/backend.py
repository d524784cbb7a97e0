"""The torch Backend: arrays and model loaders (NCHW)."""

from __future__ import annotations

import numpy as np
import torch

from oxigaf.backend import Backend
from oxigaf.checkpoints import guarded
from oxigaf.errors import BackendError

from .common import TORCH_DTYPES, torch_dtype


def _pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BackendError(f"unknown torch device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {device!r} asked for, but CUDA is not available here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise BackendError(f"device {device!r} asked for, but MPS is not available here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise BackendError(f"unsupported torch device {device!r}: use cpu, cuda[:N] or mps")
    return dev


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device: str | None = None, dtype: str = "float32"):
        self.torch_device = _pick_device(device)
        self.device = str(self.torch_device)
        self.dtype = dtype
        self.torch_dtype = torch_dtype(dtype)

    def __repr__(self):
        return f"TorchBackend(device={self.device!r}, dtype={self.dtype!r})"

    def versions(self) -> dict[str, str]:
        """The torch version, the device, and whether the inference speed-ups are on
        (``oxigaf_torch.fast``; ``OXIGAF_TORCH_FAST=0`` turns them off)."""
        from . import fast

        return {"torch": torch.__version__, "device": self.device, "fast": "on" if fast.enabled() else "off"}

    # -- arrays ----------------------------------------------------------------------------

    def asarray(self, x, dtype: str | None = None):
        """numpy -> tensor on this device; floating arrays take ``dtype`` (default: compute dtype)."""
        arr = np.asarray(x)
        t = torch.from_numpy(np.array(arr, dtype=np.float32) if arr.dtype.kind == "f" else np.array(arr))
        if arr.dtype.kind == "f":
            return t.to(self.torch_device, TORCH_DTYPES[dtype or self.dtype])
        return t.to(self.torch_device)

    def to_numpy(self, x) -> np.ndarray:
        t = x.detach()
        if t.is_floating_point() and t.dtype != torch.float64:
            t = t.float()
        return t.cpu().numpy()

    def concat(self, xs, axis: int = 0):
        return torch.cat(list(xs), dim=axis)

    def synchronize(self, x=None) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.synchronize(self.torch_device)
        elif self.torch_device.type == "mps":
            torch.mps.synchronize()

    def isfinite(self, x) -> bool:
        return bool(torch.isfinite(x).all())

    def memory(self) -> dict:
        if self.torch_device.type == "cuda":
            return {"current_bytes": torch.cuda.memory_allocated(self.torch_device),
                    "peak_bytes": torch.cuda.max_memory_allocated(self.torch_device)}
        if self.torch_device.type == "mps":
            return {"current_bytes": torch.mps.current_allocated_memory(), "peak_bytes": None}
        return {"current_bytes": None, "peak_bytes": None}

    def reset_peak_memory(self) -> None:
        if self.torch_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.torch_device)

    def clear_cache(self) -> None:
        """Hand back memory held for reuse: the kept CPU buffers (``fast.buffers``: up to 0.8 GB for
        the ImageDream UNet in float32) and CUDA's cached blocks. ``low_memory`` calls it on release."""
        from .fast import buffers

        buffers.release()
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()

    # -- models ----------------------------------------------------------------------------

    def load_unet(self, folder, *, attention: str = "auto", dtype: str | None = None, **kw):
        from .unet import load_unet

        return guarded("multi-view UNet", load_unet, folder, dtype=dtype or self.dtype,
                        device=self.torch_device, attention=attention, **kw)

    def load_vae(self, folder, *, dtype: str | None = None, **kw):
        from .vae import load_vae

        return guarded("VAE", load_vae, folder, dtype=dtype or "float32", device=self.torch_device, **kw)

    def load_image_encoder(self, folder, *, dtype: str | None = None, **kw):
        from .clip import load_image_encoder

        return guarded("CLIP image encoder", load_image_encoder, folder, dtype=dtype or self.dtype,
                        device=self.torch_device, **kw)

    def load_text_encoder(self, folder, *, dtype: str | None = None, **kw):
        from .clip import load_text_encoder

        return guarded("CLIP text encoder", load_text_encoder, folder, dtype=dtype or self.dtype,
                        device=self.torch_device, **kw)

    def load_upsampler_unet(self, folder, *, dtype: str | None = None, **kw):
        from .upsampler import load_upsampler_unet

        return guarded("upsampler UNet", load_upsampler_unet, folder, dtype=dtype or self.dtype,
                        device=self.torch_device, **kw)

    # -- training --------------------------------------------------------------------------

    def unet_trainer(self, config, state, **kw):
        """A trainable UNet with its optimiser (``oxigaf_torch.training.UNetTrainer``)."""
        from .training import UNetTrainer

        return UNetTrainer(config, state, device=self.torch_device, **kw)

    def apply_lora(self, model, deltas):
        """Add LoRA weight deltas (numpy, by parameter name) to a loaded model."""
        from .training import add_to_weights

        return add_to_weights(model, deltas)

    def render_gaussians(self, gaussians, viewmats, intrinsics, size):
        from .splat import render_gaussians

        return render_gaussians(self.torch_device, gaussians, viewmats, intrinsics, size)

    def gaussian_trainer(self, raw, targets, viewmats, intrinsics, size, lrs):
        from .splat import GaussianTrainer

        return GaussianTrainer(self.torch_device, raw, targets, viewmats, intrinsics, size, lrs)
