"""oxigaf: one photo in, consistent novel views out (ImageDream / MVDream multi-view diffusion)."""

from .cameras import CameraParams
from .config import DiffusionConfig
from .errors import BackendError, ConfigError, InputError, ModelLoadError, NumericsError, OxigafError
from .plugins import available_backends, get_backend

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "CameraParams",
    "ConfigError",
    "DiffusionConfig",
    "InputError",
    "ModelLoadError",
    "NumericsError",
    "OxigafError",
    "available_backends",
    "get_backend",
    "__version__",
]
