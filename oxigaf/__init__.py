"""oxigaf: one photo in, consistent novel views out (ImageDream / MVDream multi-view diffusion)."""

from .cameras import CameraParams
from .config import DiffusionConfig
from .errors import BackendError, ConfigError, InputError, ModelLoadError, NumericsError, OxigafError
from .pipeline import MultiViewOutput, Pipeline
from .plugins import available_backends, get_backend
from .upsampler import BilinearUpsampler, LatentUpsampler

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BilinearUpsampler",
    "CameraParams",
    "ConfigError",
    "DiffusionConfig",
    "InputError",
    "LatentUpsampler",
    "ModelLoadError",
    "MultiViewOutput",
    "NumericsError",
    "OxigafError",
    "Pipeline",
    "available_backends",
    "get_backend",
    "__version__",
]
