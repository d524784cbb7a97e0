"""Input images, CLIP preprocessing, the VAE's input, and turning outputs into pictures.

- ``load_image`` accepts a path, a PIL image or a numpy array in any common mode and returns an
  RGB PIL image. Transparency is composited onto a background colour, white by default:
  ImageDream and MVDream were trained on renders of objects on white backgrounds, so a cut-out
  portrait on white is what the model expects (black would read as part of the subject).
- ``CLIPPreprocessor`` computes what transformers' ``CLIPImageProcessor`` (its PIL path)
  computes from a ``preprocessor_config.json``.
- ``vae_input`` computes the image the ImageDream pipeline encodes with the VAE as its
  reference latent.
- ``to_uint8`` and ``make_grid`` turn float outputs into 8-bit pictures and a contact sheet.

Layout: ``load.py`` (``load_image``), ``preprocess.py`` (CLIP and VAE inputs), ``pictures.py``
(``to_uint8``, ``make_grid``).
"""

from __future__ import annotations

from .load import DEFAULT_BACKGROUND, MAX_SIDE, load_image
from .pictures import make_grid, to_uint8
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPPreprocessor, vae_input, vae_views

__all__ = [
    "CLIPPreprocessor",
    "DEFAULT_BACKGROUND",
    "MAX_SIDE",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "load_image",
    "make_grid",
    "to_uint8",
    "vae_input",
    "vae_views",
]
