"""Entry point of the MLX backend: cheap to import, does not import mlx."""

from __future__ import annotations

import importlib.util

from oxigaf.backend import BackendSpec
from oxigaf.plugins import hookimpl


def _available() -> str | None:
    if importlib.util.find_spec("mlx") is None:
        return "mlx is not installed"
    try:
        import mlx.core  # noqa: F401
    except Exception as exc:
        return f"mlx does not import: {exc}"
    return None


def _priority() -> int:
    import platform
    import sys

    # MLX is the fast path on Apple Silicon (Metal, unified memory); elsewhere a fallback.
    return 200 if (sys.platform == "darwin" and platform.machine() == "arm64") else 10


def _factory(device=None, dtype="float32"):
    from .backend import MLXBackend

    return MLXBackend(device=device, dtype=dtype)


@hookimpl
def oxigaf_backends():
    return [BackendSpec("mlx", _factory, _available, _priority, extra="oxigaf[mlx]",
                        description="Apple MLX: Metal on Apple Silicon, CPU or CUDA elsewhere")]
