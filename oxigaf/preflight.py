"""A model folder checked before any weight is read: its components (``layout``), every
component's config and weight-file header, and whether the components fit together."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoints import read_json, read_shapes
from .config import CLIPTextConfig, CLIPVisionConfig, UNetConfig, VAEConfig
from .errors import ModelLoadError
from .layout import components, networks

COMPONENT_CONFIGS = {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": CLIPTextConfig,
                     "image_encoder": CLIPVisionConfig}


@dataclass(frozen=True)
class ModelFolder:
    """What the preflight read: the UNet's and the VAE's configs, whether the model is
    image-conditioned (ImageDream), and the normal-map latents concatenated after the noisy latent
    (``conditioning_maps``: 0, or 1 for GAF's 8-channel UNet)."""

    path: Path
    index: dict
    image_conditioned: bool
    unet_config: UNetConfig
    vae_config: VAEConfig
    conditioning_maps: int

    @property
    def networks(self) -> tuple[str, ...]:
        """The components with weights, in loading order."""
        return networks(self.image_conditioned)


def read_index(model_path: Path) -> dict:
    """``model_index.json``, with a clear error when a single component's folder was given."""
    path = model_path / "model_index.json"
    if not path.is_file() and (model_path / "config.json").is_file():
        try:
            kind = read_json(model_path / "config.json").get("_class_name")
        except ModelLoadError:
            kind = None
        raise ModelLoadError(
            f"{model_path} holds a single model component ({kind or 'config.json'}), not a pipeline: "
            f"pass the folder above it, the one with model_index.json"
        )
    return read_json(path, "model_index.json")


def preflight(model_path: Path) -> ModelFolder:
    """Read every component's config and weight-file header; check that they fit together.

    Only headers are read, so a missing, truncated or mismatched component fails in
    milliseconds instead of after loading gigabytes.
    """
    index = read_index(model_path)
    missing, image_conditioned = components(model_path, index)
    if missing:
        kind = index.get("_class_name")
        what = f" is a {kind}" if isinstance(kind, str) and kind else ""
        hint = " (a latent upscaler: pass it as upsampler=..., not as the model)" if "Upscale" in what else ""
        raise ModelLoadError(
            f"model folder {model_path}{what}{hint}: it lacks the component(s) {', '.join(missing)} "
            "(expected the diffusers layout of an MVDream / ImageDream pipeline)"
        )
    names = networks(image_conditioned)
    cfg = {name: COMPONENT_CONFIGS[name].from_folder(model_path / name) for name in names}
    for name in names:
        read_shapes(model_path / name)
    unet, vae, text = cfg["unet"], cfg["vae"], cfg["text_encoder"]
    where = model_path / "unet"
    unet.check_geometry()
    if image_conditioned and unet.ip_dim <= 0:
        raise ModelLoadError(
            f"{where} holds a text-only MVDream UNet (no ip_dim), but {model_path} is laid out as "
            "ImageDream (it has image_encoder/ and feature_extractor/): use an ImageDream UNet "
            "(e.g. ashawkey/imagedream-ipmv-diffusers)"
        )
    if not image_conditioned and unet.ip_dim > 0:
        raise ModelLoadError(
            f"{where} holds an image-conditioned ImageDream UNet (ip_dim {unet.ip_dim}), but {model_path} "
            "lacks its image_encoder/ and feature_extractor/ (or model_index.json does not list them)"
        )
    if unet.context_dim != text.hidden_size:
        raise ModelLoadError(
            f"the UNet's context_dim {unet.context_dim} ({where}) does not match the text encoder's "
            f"hidden_size {text.hidden_size} ({model_path / 'text_encoder'}): mixed-up components"
        )
    maps, extra = divmod(unet.in_channels - unet.out_channels, vae.latent_channels)
    if unet.out_channels != vae.latent_channels or extra or maps not in (0, 1):
        raise ModelLoadError(
            f"the UNet works on {unet.in_channels} -> {unet.out_channels} channels but the VAE's "
            f"latent_channels is {vae.latent_channels}: a UNet takes the latent ({vae.latent_channels} channels) "
            f"and optionally one normal-map latent ({2 * vae.latent_channels} in all): mixed-up components"
        )
    return ModelFolder(model_path, index, image_conditioned, unet, vae, maps)
