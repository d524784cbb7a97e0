"""The exceptions oxigaf raises. Every error a user can cause is an ``OxigafError``."""


class OxigafError(Exception):
    """Base class of every error oxigaf raises on purpose."""


class ConfigError(OxigafError, ValueError):
    """A configuration value or argument is out of range or of the wrong kind."""


class ModelLoadError(OxigafError):
    """A model folder, config or weight file is missing, corrupt or does not match."""


class InputError(OxigafError, ValueError):
    """An input image, camera or latent array cannot be used."""


class BackendError(OxigafError):
    """A compute backend is unknown, not installed or cannot run here."""


class NumericsError(OxigafError, FloatingPointError):
    """A NaN or Inf appeared in the computation."""
