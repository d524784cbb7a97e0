"""What conditions a generation: the prompts' text states and the photo's image encoding.

``encode_image`` is the one image encoding of inference and training: the photo's CLIP
penultimate hidden states, and its reference latent, the VAE posterior mean × scaling_factor
(the reference samples the posterior; its mean makes runs reproducible, as the fixtures do).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from .errors import InputError, NumericsError
from .images import load_image, vae_input


@dataclass(frozen=True)
class Conditioning:
    """What ``Pipeline.condition(image, prompt, negative_prompt)`` computed, in backend arrays.

    ``text`` / ``negative_text`` (1, 77, C): the prompts' text-encoder states; ImageDream only:
    ``clip_states`` (1, 257, 1280) the photo's CLIP penultimate hidden states and
    ``reference_latent`` (1, 4, h, w) its VAE posterior mean × scaling_factor. ``model`` and
    ``backend`` name the pipeline that made it: its arrays are that backend's.
    """

    prompt: str
    negative_prompt: str
    text: Any
    negative_text: Any
    clip_states: Any
    reference_latent: Any
    model: str
    backend: str


def encode_text(backend, tokenizer, text_encoder, prompts: list[str]):
    """The text encoder's last hidden states (N, 77, C) for ``prompts``, a backend array."""
    return text_encoder(backend.asarray(tokenizer(prompts)))["last_hidden_state"]


def vae_latents(backend, vae, pixels: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """float32 numpy (N, 4, h, w): the VAE posterior mean of ``pixels`` (N, 3, H, W in [-1, 1]) × scaling_factor."""
    mean = vae.encode(backend.asarray(pixels, dtype=dtype))
    return backend.to_numpy(mean).astype(np.float32) * np.float32(vae.config.scaling_factor)


def encode_image(backend, image, *, image_encoder=None, preprocessor=None, vae=None, size: int | None = None,
                 vae_dtype: str = "float32") -> tuple[Any, np.ndarray | None]:
    """A photo (anything ``load_image`` reads; an RGB PIL image is used as it is) ->
    ``(clip_states, reference_latent)``.

    ``clip_states`` (1, 257, 1280), a backend array: the CLIP penultimate hidden states of the
    ``preprocessor``'s pixels (with ``image_encoder``; else None). ``reference_latent`` (1, 4, h, w)
    float32 numpy: ``vae_latents`` of the photo at ``size`` px (with ``vae``; else None).
    """
    if not (isinstance(image, Image.Image) and image.mode == "RGB"):
        image = load_image(image)
    clip_states = ref = None
    if image_encoder is not None:
        pixels = backend.asarray(preprocessor(image))
        clip_states = image_encoder(pixels, output_hidden_states=True)["hidden_states"][-2]
    if vae is not None:
        ref = vae_latents(backend, vae, vae_input(image, size), vae_dtype)
    return clip_states, ref


def load_source(image, *, image_conditioned: bool, model: str, backend: str):
    """A generation's input: a loaded photo (PIL), a Conditioning as it is, or None for a text-only model."""
    if isinstance(image, Conditioning):
        if image.model != model or image.backend != backend:
            raise InputError(
                f"this Conditioning was made by a pipeline of {image.model} on {image.backend}; "
                f"this one runs {model} on {backend}: call condition() on it"
            )
        return image
    if image_conditioned:
        if image is None:
            raise InputError("this model (ImageDream) needs an input image")
        return load_image(image)
    if image is not None:
        raise InputError("this model (MVDream) is text-only: pass prompt=..., not an image")
    return None


def make_conditions(sources: list, prompt: str, negative_prompt: str, *, text: Callable, image: Callable,
                    check: Callable, model: str, backend: str) -> list[Conditioning]:
    """One Conditioning per source (see ``load_source``), each (prompt, negative prompt) encoded once.

    ``text(prompts)`` gives the states of a list of prompts, ``image(photo)`` a photo's
    ``(clip_states, reference_latent)`` in backend arrays; ``check(conditioning)`` sees each new
    Conditioning (``check_conditioning``). A Conditioning given with a non-empty
    prompt other than its own gets that prompt's text states (its photo's are kept), so passing
    the photo or its Conditioning gives the same.
    """
    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise InputError("prompt and negative_prompt must be strings")
    encoded: dict[tuple[str, str], tuple] = {}

    def text_states(pos: str, neg: str):
        if (pos, neg) not in encoded:
            states = text([neg, pos])
            encoded[pos, neg] = (states[1:2], states[0:1])
        return encoded[pos, neg]

    out = []
    for src in sources:
        if isinstance(src, Conditioning):
            pos, neg = prompt or src.prompt, negative_prompt or src.negative_prompt
            if (pos, neg) != (src.prompt, src.negative_prompt):
                pos_states, neg_states = text_states(pos, neg)
                src = replace(src, prompt=pos, negative_prompt=neg, text=pos_states, negative_text=neg_states)
            out.append(src)
            continue
        pos_states, neg_states = text_states(prompt, negative_prompt)
        clip_states, ref = image(src) if src is not None else (None, None)
        cond = Conditioning(prompt, negative_prompt, pos_states, neg_states, clip_states, ref, model, backend)
        check(cond)
        out.append(cond)
    return out


def check_conditioning(cond: Conditioning, backend, config) -> None:
    """Encoder outputs must be finite: an overflow here would surface later as a NaN in the UNet."""
    for what, x, setting in (("text encoder", cond.text, "dtype"), ("text encoder", cond.negative_text, "dtype"),
                             ("image encoder", cond.clip_states, "dtype"),
                             ("VAE encoder (reference latent)", cond.reference_latent, "vae_dtype")):
        if x is not None and not backend.isfinite(x):
            value = config.dtype if setting == "dtype" else config.vae_dtype
            raise NumericsError(
                f"NaN or Inf in the {what}'s output (conditioning stage) with {setting} {value}: "
                f"float16 overflow is the usual cause; use {setting}='float32' or 'bfloat16'"
            )


__all__ = ["Conditioning", "check_conditioning", "encode_image", "encode_text", "load_source", "make_conditions",
           "vae_latents"]
