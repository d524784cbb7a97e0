"""The MLX Backend: arrays and model loaders (NCHW at the interface, NHWC inside models)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from oxigaf.backend import Backend
from oxigaf.checkpoints import guarded
from oxigaf.errors import BackendError

from .common import MLX_DTYPES


def _pick_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "gpu" if mx.default_device() == mx.gpu else "cpu"
    if device not in ("cpu", "gpu"):
        raise BackendError(f"unknown mlx device {device!r}: use cpu or gpu")
    if device == "gpu":
        try:
            mx.set_default_device(mx.gpu)
            mx.eval(mx.zeros(1))
        except Exception as exc:
            raise BackendError(f"mlx has no usable GPU here: {exc}") from exc
    else:
        mx.set_default_device(mx.cpu)
    return device


class MLXBackend(Backend):
    name = "mlx"

    def __init__(self, device: str | None = None, dtype: str = "float32"):
        self.device = _pick_device(device)
        self.dtype = dtype
        self.mlx_dtype = MLX_DTYPES[dtype]

    def __repr__(self):
        return f"MLXBackend(device={self.device!r}, dtype={self.dtype!r})"

    def versions(self) -> dict[str, str]:
        return {"mlx": mx.__version__, "device": self.device}

    # -- arrays ----------------------------------------------------------------------------

    def asarray(self, x, dtype: str | None = None):
        arr = np.asarray(x)
        if arr.dtype.kind == "f":
            return mx.array(np.array(arr, dtype=np.float32)).astype(MLX_DTYPES[dtype or self.dtype])
        return mx.array(np.array(arr))

    def to_numpy(self, x) -> np.ndarray:
        if mx.issubdtype(x.dtype, mx.floating) and x.dtype != mx.float32:
            x = x.astype(mx.float32)
        return np.array(x)

    def concat(self, xs, axis: int = 0):
        return mx.concatenate(list(xs), axis=axis)

    def synchronize(self, x=None) -> None:
        if x is not None:
            mx.eval(x)
        mx.synchronize()

    def isfinite(self, x) -> bool:
        return bool(mx.all(mx.isfinite(x)).item())

    def memory(self) -> dict:
        return {"current_bytes": int(mx.get_active_memory()), "peak_bytes": int(mx.get_peak_memory())}

    def reset_peak_memory(self) -> None:
        mx.reset_peak_memory()

    def clear_cache(self) -> None:
        """Hand MLX's cached buffers back (``low_memory`` calls it on release)."""
        mx.clear_cache()

    def compile_function(self, fn):
        """``fn`` (arrays in, arrays out) through ``mx.compile``: one fused graph per input shape
        (the pipeline's guided DDIM step, with ``DiffusionConfig.compile``)."""
        return mx.compile(fn)

    # -- models ----------------------------------------------------------------------------

    def load_unet(self, folder, *, attention: str = "auto", dtype: str | None = None, **kw):
        from .unet import load_unet

        return guarded("multi-view UNet", load_unet, folder, dtype=dtype or self.dtype, attention=attention, **kw)

    def load_vae(self, folder, *, dtype: str | None = None, **kw):
        from .vae import load_vae

        return guarded("VAE", load_vae, folder, dtype=dtype or "float32", **kw)

    def load_image_encoder(self, folder, *, dtype: str | None = None, **kw):
        from .clip import load_image_encoder

        return guarded("CLIP image encoder", load_image_encoder, folder, dtype=dtype or self.dtype, **kw)

    def load_text_encoder(self, folder, *, dtype: str | None = None, **kw):
        from .clip import load_text_encoder

        return guarded("CLIP text encoder", load_text_encoder, folder, dtype=dtype or self.dtype, **kw)

    def load_upsampler_unet(self, folder, *, dtype: str | None = None, **kw):
        from .upsampler import load_upsampler_unet

        return guarded("upsampler UNet", load_upsampler_unet, folder, dtype=dtype or self.dtype, **kw)

    # -- training --------------------------------------------------------------------------

    def unet_trainer(self, config, state, **kw):
        """A trainable UNet with its optimiser (``oxigaf_mlx.training.UNetTrainer``)."""
        from .training import UNetTrainer

        return UNetTrainer(config, state, **kw)

    def apply_lora(self, model, deltas):
        """Add LoRA weight deltas (numpy, by parameter name) to a loaded model."""
        from .training import add_to_weights

        return add_to_weights(model, deltas)

    def render_gaussians(self, gaussians, viewmats, intrinsics, size):
        from .splat import render_gaussians

        return render_gaussians(gaussians, viewmats, intrinsics, size)

    def gaussian_trainer(self, raw, targets, viewmats, intrinsics, size, lrs):
        from .splat import GaussianTrainer

        return GaussianTrainer(raw, targets, viewmats, intrinsics, size, lrs)
