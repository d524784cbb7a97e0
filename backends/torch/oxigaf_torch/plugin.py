"""Entry point of the torch backend: cheap to import, does not import torch."""

from __future__ import annotations

import importlib.util

from oxigaf.backend import BackendSpec
from oxigaf.plugins import hookimpl


def _available() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    try:
        import torch  # noqa: F401
    except Exception as exc:  # a broken install is "not available", with the reason
        return f"torch does not import: {exc}"
    return None


def _priority() -> int:
    # Below MLX on Apple Silicon; above it elsewhere (mlx on Linux runs on a slow CPU BLAS).
    import platform
    import sys

    return 50 if (sys.platform == "darwin" and platform.machine() == "arm64") else 100


def _factory(device=None, dtype="float32"):
    from .backend import TorchBackend

    return TorchBackend(device=device, dtype=dtype)


@hookimpl
def oxigaf_backends():
    return [BackendSpec("torch", _factory, _available, _priority, extra="oxigaf[torch]",
                        description="PyTorch: CUDA, MPS or CPU")]
