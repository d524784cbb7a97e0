"""The multi-view pipeline: one photo (ImageDream) or a prompt (MVDream) in, N views out.

Per denoising step (ImageDream), frames F = views + 1 per image; the batch is
``[uncond frames of every image…, cond frames of every image…]`` with views fastest:
cond = prompt tokens, CLIP penultimate states of the input, the reference latent;
uncond = negative-prompt tokens, zero CLIP states (still resampled by the UNet), a zero
reference latent, the same cameras. ``eps = uncond + g·(cond − uncond)``, one DDIM step on
all F latents. After the loop the reference slot is dropped, the latents are optionally
upsampled 2×, and the VAE decodes them (float32 unless asked otherwise).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .backend import Backend
from .cameras import CameraParams, as_cameras, camera_vectors
from .checkpoints import read_json, read_shapes, resolve_model
from .config import (
    CLIPTextConfig,
    CLIPVisionConfig,
    DiffusionConfig,
    UNetConfig,
    VAEConfig,
    check_attention,
    check_finite,
    check_guidance,
    check_positive_int,
)
from .errors import ConfigError, InputError, ModelLoadError, NumericsError, OxigafError
from .images import CLIPPreprocessor, load_image, to_uint8, vae_input, vae_views
from .outputs import MultiViewOutput
from .plugins import get_backend
from .schedulers import DDIMScheduler
from .tokenizers import CLIPTokenizer

# Components every published MVDream/ImageDream folder has; ImageDream adds the image encoder.
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
IMAGE_COMPONENTS = ("image_encoder", "feature_extractor")
COMPONENT_CONFIGS = {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": CLIPTextConfig,
                     "image_encoder": CLIPVisionConfig}


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


def _progress(iterable, desc: str, enabled: bool, total: int | None = None):
    """A tqdm bar on a terminal; the bare iterable otherwise."""
    if not (enabled and sys.stderr.isatty()):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def guide(eps, n: int, guidance):
    """Classifier-free guidance: ``eps`` holds the unconditional rows, then the conditional ones
    (2n in all); with n rows guidance is off (1.0) and ``eps`` is the answer."""
    if eps.shape[0] == n:
        return eps
    return eps[:n] + guidance * (eps[n:] - eps[:n])


def guided_ddim_update(eps, x, guidance, w_sample, w_output):
    """``guide`` then a deterministic DDIM step (``DDIMScheduler.linear_weights``): all arrays,
    so that a backend can compile it once for every step of a loop."""
    return w_sample * x + w_output * guide(eps, x.shape[0], guidance)


class Pipeline:
    """ImageDream / MVDream multi-view generation on any oxigaf backend.

    ``Pipeline(model, backend=...)`` and ``Pipeline.from_pretrained(model, backend=...)`` are the
    same. ``model`` is a local folder in the published diffusers layout or a hub id.
    ``upsampler``: None (256 px views), ``"bilinear"`` (weight-free 2×) or an sd-x2 latent
    upscaler folder / hub id (512 px views).
    """

    def __init__(
        self,
        model: str | os.PathLike = "ashawkey/imagedream-ipmv-diffusers",
        backend: str | Backend = "auto",
        dtype: str | None = None,
        device: str | None = None,
        upsampler=None,
        config: DiffusionConfig | None = None,
        lora: str | os.PathLike | None = None,
        compile: bool | None = None,
    ):
        self.config = config or DiffusionConfig()
        if dtype is not None:
            self.config = self.config.replace(dtype=dtype)
        if compile is not None:
            self.config = self.config.replace(compile=compile)
        self.backend = backend if not isinstance(backend, str) else get_backend(backend, device, self.config.dtype)
        self.model_path = resolve_model(model)
        _check_upsampler_kind(upsampler)
        self.index = self._read_index()
        listed = {k for k, v in self.index.items() if not k.startswith("_") and isinstance(v, list)}
        missing = [c for c in REQUIRED_COMPONENTS if c not in listed or not (self.model_path / c).is_dir()]
        if missing:
            kind = self.index.get("_class_name")
            what = f" is a {kind}" if isinstance(kind, str) and kind else ""
            hint = " (a latent upscaler: pass it as upsampler=..., not as the model)" if "Upscale" in what else ""
            raise ModelLoadError(
                f"model folder {self.model_path}{what}{hint}: it lacks the component(s) {', '.join(missing)} "
                "(expected the diffusers layout of an MVDream / ImageDream pipeline)"
            )
        self.image_conditioned = all(c in listed and (self.model_path / c).is_dir() for c in IMAGE_COMPONENTS)
        # Cheap parts first, so a broken folder fails before any weight is read.
        self.scheduler = DDIMScheduler.from_folder(self.model_path / "scheduler")
        self.tokenizer = CLIPTokenizer.from_pretrained(self.model_path / "tokenizer")
        self.preprocessor = (
            CLIPPreprocessor.from_folder(self.model_path / "feature_extractor") if self.image_conditioned else None
        )
        self._preflight()
        # A LoRA adapter (oxigaf train --lora-rank: OUT/lora) is merged into the UNet's weights at load.
        self.lora = None
        if lora is not None:
            from .training.lora import load_lora

            self.lora = load_lora(lora)
            self.lora.check_against(read_shapes(self.model_path / "unet"), str(self.model_path / "unet"))
        self.upsampler = self._make_upsampler(upsampler)
        self._models: dict[str, object] = {}
        for name in ("unet", "vae", "text_encoder") + (("image_encoder",) if self.image_conditioned else ()):
            self._model(name)

    def _read_index(self) -> dict:
        path = self.model_path / "model_index.json"
        if not path.is_file() and (self.model_path / "config.json").is_file():
            # A single component (e.g. .../vae) given where the whole pipeline folder belongs.
            try:
                kind = read_json(self.model_path / "config.json").get("_class_name")
            except ModelLoadError:
                kind = None
            raise ModelLoadError(
                f"{self.model_path} holds a single model component ({kind or 'config.json'}), not a pipeline: "
                f"pass the folder above it, the one with model_index.json"
            )
        return read_json(path, "model_index.json")

    def _preflight(self) -> None:
        """Read every component's config and weight-file header before any weights are loaded.

        Only headers are read, so a missing, truncated or mismatched component fails in
        milliseconds instead of after loading gigabytes.
        """
        names = ("unet", "vae", "text_encoder") + (("image_encoder",) if self.image_conditioned else ())
        cfg = {name: COMPONENT_CONFIGS[name].from_folder(self.model_path / name) for name in names}
        for name in names:
            read_shapes(self.model_path / name)
        unet, vae, text = cfg["unet"], cfg["vae"], cfg["text_encoder"]
        where = self.model_path / "unet"
        unet.check_geometry()
        if self.image_conditioned and unet.ip_dim <= 0:
            raise ModelLoadError(
                f"{where} holds a text-only MVDream UNet (no ip_dim), but {self.model_path} is laid out as "
                "ImageDream (it has image_encoder/ and feature_extractor/): use an ImageDream UNet "
                "(e.g. ashawkey/imagedream-ipmv-diffusers)"
            )
        if not self.image_conditioned and unet.ip_dim > 0:
            raise ModelLoadError(
                f"{where} holds an image-conditioned ImageDream UNet (ip_dim {unet.ip_dim}), but {self.model_path} "
                "lacks its image_encoder/ and feature_extractor/ (or model_index.json does not list them)"
            )
        if unet.context_dim != text.hidden_size:
            raise ModelLoadError(
                f"the UNet's context_dim {unet.context_dim} ({where}) does not match the text encoder's "
                f"hidden_size {text.hidden_size} ({self.model_path / 'text_encoder'}): mixed-up components"
            )
        maps, extra = divmod(unet.in_channels - unet.out_channels, vae.latent_channels)
        if unet.out_channels != vae.latent_channels or extra or maps not in (0, 1):
            raise ModelLoadError(
                f"the UNet works on {unet.in_channels} -> {unet.out_channels} channels but the VAE's "
                f"latent_channels is {vae.latent_channels}: a UNet takes the latent ({vae.latent_channels} channels) "
                f"and optionally one normal-map latent ({2 * vae.latent_channels} in all): mixed-up components"
            )
        self.unet_config, self.vae_config = unet, vae
        # Normal-map latents concatenated after the noisy latent (GAF's 8-channel UNet): 0 or 1.
        self.conditioning_maps = maps

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike = "ashawkey/imagedream-ipmv-diffusers", **kwargs) -> Pipeline:
        return cls(model, **kwargs)

    # -- components --------------------------------------------------------------------------

    def _model(self, name: str):
        """Load a component on first use (and again after ``low_memory`` released it)."""
        if name not in self._models:
            folder = self.model_path / name
            b, cfg = self.backend, self.config
            if name == "unet":
                # only asked of a backend when wanted: a third-party loader need not know the option
                extra = {"compile": True} if cfg.compile else {}
                m = b.load_unet(folder, attention=cfg.attention_mode, chunk_size=cfg.attention_chunk_size, **extra)
                if self.lora is not None:
                    m = b.apply_lora(m, self.lora.deltas())
            elif name == "vae":
                m = b.load_vae(folder, dtype=cfg.vae_dtype)
            elif name == "text_encoder":
                m = b.load_text_encoder(folder)
            elif name == "image_encoder":
                m = b.load_image_encoder(folder)
            else:  # pragma: no cover - internal names only
                raise KeyError(name)
            self._models[name] = m
        return self._models[name]

    def _release(self, *names: str) -> None:
        for name in names:
            self._models.pop(name, None)
        import gc

        gc.collect()
        # what the backend keeps for reuse outlives the models (a third-party backend may keep nothing)
        if hasattr(self.backend, "clear_cache"):
            self.backend.clear_cache()

    def _make_upsampler(self, upsampler):
        if upsampler is None:
            return None
        from .upsampler import BilinearUpsampler, LatentUpsampler

        if isinstance(upsampler, str) and upsampler == "bilinear":
            return BilinearUpsampler()
        if isinstance(upsampler, (str, os.PathLike)):
            return LatentUpsampler.from_pretrained(upsampler, backend=self.backend, dtype=self.config.dtype)
        return upsampler

    @property
    def latent_factor(self) -> int:
        """The VAE's downsampling: 2 ** (len(block_out_channels) − 1), 8 for SD's VAE."""
        return self.vae_config.downsampling_factor

    @property
    def native_size(self) -> int:
        return int(self.unet_config.image_size) * self.latent_factor

    # -- stage 1: conditioning ---------------------------------------------------------------

    def condition(self, image=None, prompt: str = "", negative_prompt: str = "") -> Conditioning:
        """The photo's and the prompt's conditioning, computed once and reusable.

        ``generate``, ``refine`` and ``score_distillation`` take the result wherever they take
        ``image=``, with identical numbers: in a GAF loop the photo is encoded once, not at every
        iteration. A text-only (MVDream) model takes ``image=None``.
        """
        if isinstance(image, (list, tuple)):
            raise InputError("condition() takes one image; call it once per image")
        return self._conditions([self._source(image)], prompt, negative_prompt)[0]

    def _source(self, image):
        """A loaded input photo (PIL), a Conditioning as it is, or None for a text-only model."""
        if isinstance(image, Conditioning):
            if image.model != str(self.model_path) or image.backend != self.backend.name:
                raise InputError(
                    f"this Conditioning was made by a pipeline of {image.model} on {image.backend}; "
                    f"this one runs {self.model_path} on {self.backend.name}: call condition() on it"
                )
            return image
        if self.image_conditioned:
            if image is None:
                raise InputError("this model (ImageDream) needs an input image")
            return load_image(image)
        if image is not None:
            raise InputError("this model (MVDream) is text-only: pass prompt=..., not an image")
        return None

    def _conditions(self, sources: list, prompt: str, negative_prompt: str) -> list[Conditioning]:
        """One Conditioning per source (see ``_source``), the text encoded once for all of them.

        A Conditioning given with a non-empty prompt other than its own gets that prompt's text
        states (its photo's are kept), so passing the photo or its Conditioning gives the same.
        """
        if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
            raise InputError("prompt and negative_prompt must be strings")
        encoded: dict[tuple[str, str], tuple] = {}  # each (prompt, negative prompt) encoded once

        def text_states(pos: str, neg: str):
            if (pos, neg) not in encoded:
                states = self._encode_text([neg, pos])
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
            clip_states = ref = None
            if src is not None:
                clip_states, ref = self._encode_image(src)
            cond = Conditioning(prompt, negative_prompt, pos_states, neg_states, clip_states, ref,
                                str(self.model_path), self.backend.name)
            self._check_conditioning(cond)
            out.append(cond)
        return out

    def _encode_text(self, prompts: list[str]):
        ids = self.tokenizer(prompts)
        return self._model("text_encoder")(self.backend.asarray(ids))["last_hidden_state"]

    def _encode_image(self, image):
        """CLIP penultimate hidden states (1, 257, 1280) and the reference latent (1, 4, h, w)."""
        b = self.backend
        pixels = b.asarray(self.preprocessor(image))
        clip_states = self._model("image_encoder")(pixels, output_hidden_states=True)["hidden_states"][-2]
        vae = self._model("vae")
        # The reference samples the posterior; its mean makes runs reproducible (fixtures do too).
        mean = vae.encode(b.asarray(vae_input(image, self.native_size), dtype=self.config.vae_dtype))
        ref_latent = b.asarray(b.to_numpy(mean) * vae.config.scaling_factor)
        return clip_states, ref_latent

    def _check_conditioning(self, cond: Conditioning) -> None:
        """Encoder outputs must be finite: an overflow here would surface later as a NaN in the UNet."""
        b, cfg = self.backend, self.config
        for what, x, setting in (("text encoder", cond.text, "dtype"), ("text encoder", cond.negative_text, "dtype"),
                                 ("image encoder", cond.clip_states, "dtype"),
                                 ("VAE encoder (reference latent)", cond.reference_latent, "vae_dtype")):
            if x is not None and not b.isfinite(x):
                raise NumericsError(
                    f"NaN or Inf in the {what}'s output (conditioning stage) with {setting} {getattr(cfg, setting)}: "
                    f"float16 overflow is the usual cause; use {setting}='float32' or 'bfloat16'"
                )

    # -- the VAE: views <-> latents ----------------------------------------------------------

    def encode(self, views) -> np.ndarray:
        """Views -> float32 (V, 4, h, w): the VAE posterior mean × scaling_factor at the native size.

        ``views``: a list of PIL images or (H, W, 3) arrays (uint8, or float in [0, 1]), or one
        float array (V, H, W, 3). Float views are encoded as they are, never rounded to 8 bits (a
        renderer's output). PIL images are converted like inputs (RGBA composited on white). A
        square view of another size is resized to the native size with bilinear interpolation
        (PyTorch's ``align_corners=False`` without antialiasing, as the reference resizes its
        input photo; shrink large renders yourself if aliasing matters); a non-square view is an
        ``InputError``.
        """
        b, cfg = self.backend, self.config
        pixels = vae_views(views, self.native_size)
        vae = self._model("vae")
        mean = vae.encode(b.asarray(pixels, dtype=cfg.vae_dtype))
        latents = b.to_numpy(mean).astype(np.float32) * np.float32(vae.config.scaling_factor)
        if not np.isfinite(latents).all():
            raise NumericsError(f"NaN or Inf in the VAE encoder's output (vae_dtype {cfg.vae_dtype}): "
                                "use vae_dtype='float32'")
        return latents

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Scaled latents (V, 4, h, w) -> float32 images (V, H, W, 3) in [0, 1]."""
        b, cfg = self.backend, self.config
        vae = self._model("vae")
        decoded = vae.decode(b.asarray(np.asarray(latents, np.float32) / vae.config.scaling_factor,
                                       dtype=cfg.vae_dtype), tile_size=cfg.vae_tile_size or None)
        decoded = b.to_numpy(decoded).astype(np.float32)
        # Checked before clipping, which would turn an Inf into a white pixel.
        if not np.isfinite(decoded).all():
            raise NumericsError(
                f"NaN or Inf in the decoded images (decoding stage, VAE in {cfg.vae_dtype}): "
                "use vae_dtype='float32'"
            )
        images = np.clip((decoded + 1.0) / 2.0, 0.0, 1.0).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(images)

    def _map_latents(self, normals, views: int, frames: int):
        """Normal maps -> their latents (frames, 4, h, w) for a normal-conditioned UNet, else None.

        An image-conditioned model needs one map per view and the input photo's last (it fills the
        reference slot); a text-only one a map per view.
        """
        need = f"{frames} normal maps ({views} views + the input photo's, last)" if frames > views \
            else f"{frames} normal maps (one per view)"
        if self.conditioning_maps == 0:
            if normals is not None:
                raise InputError(f"normals were given, but this UNet takes no conditioning maps "
                                 f"(in_channels {self.unet_config.in_channels}): pass normals=None")
            return None
        if normals is None:
            raise InputError(f"this UNet is normal-conditioned (in_channels {self.unet_config.in_channels}): "
                             f"pass normals= with {need}")
        count = len(normals) if isinstance(normals, (list, tuple, np.ndarray)) else None
        if count != frames:
            raise InputError(f"normals must hold {need}; got {count if count is not None else type(normals).__name__}")
        return self.encode(normals)

    # -- stage 2: the denoising loop ---------------------------------------------------------

    def _unet_inputs(self, conds: list[Conditioning], cams: list[CameraParams], frames: int, cfg_on: bool) -> dict:
        """The UNet's conditioning arguments for a batch ``[uncond frames…, cond frames…]`` (views fastest).

        Unconditional branch: negative-prompt tokens, zero CLIP states (the UNet still resamples
        them) and a zero reference latent, the same cameras. Cameras repeat per item (c0..c3, ref,
        c0..c3, ref), never interleaved.
        """
        b = self.backend
        per_frame = [c for c in conds for _ in range(frames)]
        kw = {"context": b.concat(([c.negative_text for c in per_frame] if cfg_on else [])
                                  + [c.text for c in per_frame]),
              "num_frames": frames}
        if self.image_conditioned:
            ip = [c.clip_states for c in per_frame]
            ref = [c.reference_latent for c in conds]
            kw["ip"] = b.concat(([ip[0] * 0.0] * len(ip) if cfg_on else []) + ip)
            kw["ip_img"] = b.concat(([ref[0] * 0.0] * len(ref) if cfg_on else []) + ref)
        cam = np.concatenate([camera_vectors(cams), np.zeros((frames - len(cams), 16), np.float32)])
        kw["camera"] = b.asarray(np.tile(cam, ((2 if cfg_on else 1) * len(conds), 1)))
        return self._prepared(kw)

    def _prepared(self, kw: dict) -> dict:
        """``kw`` with its step-invariant part (context, camera, image prompt) done once by the
        UNet's ``prepare`` where the backend's UNet has one: the same numbers, fewer per step."""
        prepare = getattr(self._model("unet"), "prepare", None)
        if prepare is None:
            return kw
        rest = {k: v for k, v in kw.items() if k not in ("context", "camera", "ip")}
        return {**rest, "cache": prepare(kw["context"], kw.get("camera"), kw["num_frames"], kw.get("ip"))}

    def _guided_eps(self, x, t: int, inputs: dict, guidance: float, map_latents=None, attention=None, *,
                    raw: bool = False):
        """The model's guided output at timestep ``t`` for latents x (items·frames, 4, h, w).

        Conditioning maps (normal latents) are concatenated after the latent's channels and stay in
        both guidance branches; the UNet puts the clean reference latent into the reference slot's
        first channels, so that slot's input is [reference latent | the photo's map]. ``raw``: the
        model's output as it is, both branches stacked (unconditional first) when guidance is on.
        """
        b = self.backend
        n = x.shape[0]
        cfg_on = guidance > 1.0  # at 1.0 the unconditional pass is skipped
        model_in = x if map_latents is None else b.concat([x, map_latents], axis=1)
        if cfg_on:
            model_in = b.concat([model_in, model_in])
        ts = b.asarray(np.full(model_in.shape[0], float(t), np.float32))
        eps = self._model("unet")(model_in, ts, attention=attention, **inputs)
        return eps if raw else guide(eps, n, guidance)

    def _denoise(self, x: np.ndarray, timesteps, inputs: dict, guidance: float, *, eta: float = 0.0,
                 seed: int = 0, map_latents=None, callback: Callable | None = None, progress: bool = True,
                 attention: str | None = None) -> np.ndarray:
        """The one CFG + DDIM loop of ``generate`` and ``refine``: latents (items·frames, 4, h, w) in,
        float32 numpy out. ``scheduler.set_timesteps`` must have been called for the grid that
        ``timesteps`` (a tail of it, for refinement) comes from."""
        b, cfg = self.backend, self.config
        x = b.asarray(x)
        rng = np.random.default_rng([seed, 1]) if eta > 0 else None
        total = len(timesteps)
        # compile: guidance and a deterministic DDIM step as one compiled function of arrays (its
        # weights are inputs, so one graph serves every step), where the backend compiles functions
        compile_function = getattr(b, "compile_function", None) if cfg.compile and eta == 0 else None
        fused = compile_function(guided_ddim_update) if compile_function is not None else None
        for i, t in enumerate(_progress(timesteps, "denoising", progress, total)):
            weights = self.scheduler.linear_weights(int(t)) if fused is not None else None
            if weights is not None:
                eps = self._guided_eps(x, int(t), inputs, guidance, map_latents, attention, raw=True)
                x = fused(eps, x, *(b.asarray(np.float32(v)) for v in (guidance, *weights)))
            else:
                eps = self._guided_eps(x, int(t), inputs, guidance, map_latents, attention)
                step_noise = None if rng is None else b.asarray(rng.standard_normal(tuple(x.shape), dtype=np.float32))
                x = self.scheduler.step(eps, int(t), x, eta=eta, noise=step_noise)
            if not b.isfinite(x):
                raise NumericsError(
                    f"NaN or Inf in the latents at denoising step {i + 1}/{total} (timestep {int(t)}) with dtype "
                    f"{cfg.dtype}: float16 overflow is the usual cause; use dtype='float32' or 'bfloat16'"
                )
            if callback is not None:
                callback(i, int(t), x)
        b.synchronize(x)
        return b.to_numpy(x).astype(np.float32)

    # -- stages 3 and 4: upsampling and decoding ---------------------------------------------

    def upsample(self, latents: np.ndarray, seed: int | None = None) -> np.ndarray:
        """Scaled latents (V, 4, h, w) -> (V, 4, 2h, 2w) with the pipeline's upsampler."""
        if self.upsampler is None:
            raise ConfigError("this pipeline has no upsampler: pass upsampler='stabilityai/sd-x2-latent-upscaler'"
                              " (or 'bilinear')")
        seed = self.config.seed if seed is None else seed
        lat = np.asarray(self.upsampler(latents, num_inference_steps=self.config.upsampler_steps, seed=seed),
                         np.float32)
        if not np.isfinite(lat).all():
            raise NumericsError("NaN or Inf in the upsampled latents: try dtype='float32'")
        return lat

    def _outputs(self, final: np.ndarray, cams: list[CameraParams], size: int, seed: int,
                 timings: dict[str, float]) -> list[MultiViewOutput]:
        """Per item: upsample (when ``size`` is twice the native size), decode, wrap."""
        from PIL import Image

        outputs = []
        for item, lat in enumerate(final):
            item_timings = dict(timings)
            shown = lat
            if size == 2 * self.native_size:
                t0 = time.perf_counter()
                shown = self.upsample(lat, seed=seed + item)
                item_timings["upsampling"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            images = self.decode(shown)
            item_timings["decoding"] = time.perf_counter() - t0
            views_pil = [Image.fromarray(v) for v in to_uint8(images)]
            outputs.append(MultiViewOutput(views_pil, images, lat, list(cams), item_timings, _memory(self.backend)))
        return outputs

    # -- what users call ---------------------------------------------------------------------

    def generate(
        self,
        image=None,
        cameras: Sequence | None = None,
        prompt: str = "",
        negative_prompt: str = "",
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        elevation: float | None = None,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        output_size: int | None = None,
        callback: Callable | None = None,
        progress: bool = True,
        eta: float | None = None,
        attention: str | None = None,
        normals=None,
    ):
        """Generate views from noise. A list of images (or Conditionings) is a batch: a list of
        outputs comes back, item i identical to running it alone with ``seed + i``; every item
        gets the same ``normals`` (normal-conditioned models only)."""
        cfg = self.config
        steps = self._steps(num_inference_steps)
        guidance = check_guidance(cfg.guidance_scale if guidance_scale is None else guidance_scale)
        elevation = cfg.elevation if elevation is None else elevation
        seed, eta = self._seed(seed), self._eta(eta)
        if attention is not None:
            check_attention(attention)
        cams = as_cameras(cameras, cfg.num_views, elevation)
        batch = image if isinstance(image, (list, tuple)) else [image]
        if not batch:
            raise InputError("the list of images is empty")
        sources = [self._source(item) for item in batch]
        size = self._output_size(output_size)
        views, frames, hw = len(cams), self._frames(len(cams)), self.native_size // self.latent_factor
        init = self._initial_noise(latents, len(sources), views, frames, hw, seed)
        self._reset_peak_memory()

        t0 = time.perf_counter()
        map_latents = self._map_latents(normals, views, frames)
        conds = self._conditions(sources, prompt, negative_prompt)
        inputs = self._unet_inputs(conds, cams, frames, guidance > 1.0)
        timings = {"conditioning": time.perf_counter() - t0}
        if cfg.low_memory:
            self._release("text_encoder", "image_encoder")

        t0 = time.perf_counter()
        self.scheduler.set_timesteps(steps)
        if map_latents is not None:
            map_latents = self.backend.asarray(np.concatenate([map_latents] * len(conds)))
        final = self._denoise(np.concatenate(init), self.scheduler.timesteps, inputs, guidance, eta=eta, seed=seed,
                              map_latents=map_latents, callback=callback, progress=progress, attention=attention)
        timings["denoising"] = time.perf_counter() - t0
        final = final.reshape((len(conds), frames) + final.shape[1:])[:, :views]
        if cfg.low_memory:
            self._release("unet")
        results = self._outputs(final, cams, size, seed, timings)
        if cfg.low_memory:
            self._release("text_encoder", "image_encoder", "unet", "vae")
        return results if isinstance(image, (list, tuple)) else results[0]

    def refine(self, views, image, cameras, strength: float = 0.5, num_inference_steps: int = 50,
               guidance_scale: float | None = None, prompt: str = "", negative_prompt: str = "", noise=None,
               seed: int | None = None, normals=None, output_size: int | None = None, eta: float = 0.0, *,
               callback: Callable | None = None, progress: bool = True,
               attention: str | None = None) -> MultiViewOutput:
        """Refine rendered views (SDEdit), as GAF does at every iteration of its 3D fit.

        The views are encoded (``encode``), noised to the first timestep that runs and denoised
        with the ``generate`` loop over the tail of diffusers' img2img grid: ``set_timesteps(N)``,
        ``k = min(int(N·strength), N)``, ``timesteps[N − k:]``; GAF's schedule is
        ``num_inference_steps=50, strength=t/1000``. ``image`` is the photo or its
        ``condition()``; ``cameras`` one per view (None: the default orbit); ``noise`` (V, 4, h, w)
        or drawn from ``default_rng(seed)``. ``latents`` of the output are the refined latents
        before upsampling; upsampling and decoding as in ``generate``.
        """
        cfg = self.config
        strength = self._strength(strength)
        steps = self._steps(num_inference_steps)
        if int(steps * strength) < 1:
            raise ConfigError(f"strength {strength} of {steps} steps runs no denoising step "
                              f"(int({steps} × {strength}) = 0): use a larger strength or more num_inference_steps")
        guidance = check_guidance(cfg.guidance_scale if guidance_scale is None else guidance_scale)
        seed, eta = self._seed(seed), self._eta(eta)
        if attention is not None:
            check_attention(attention)
        if isinstance(image, (list, tuple)):
            raise InputError("refine() takes one photo (or its Conditioning), not a list")
        source = self._source(image)
        view_latents = self.encode(views)
        count = len(view_latents)
        cams = self._cameras_for(cameras, count, "views")
        noise = self._noise_like(noise, view_latents.shape, seed)
        size = self._output_size(output_size)
        frames = self._frames(count)
        self._reset_peak_memory()

        t0 = time.perf_counter()
        map_latents = self._map_latents(normals, count, frames)
        cond = self._conditions([source], prompt, negative_prompt)[0]
        inputs = self._unet_inputs([cond], cams, frames, guidance > 1.0)
        timings = {"conditioning": time.perf_counter() - t0}

        t0 = time.perf_counter()
        timesteps = self.scheduler.img2img_timesteps(steps, strength)
        x = self._with_reference_slot(self.scheduler.add_noise(view_latents, noise, int(timesteps[0])), frames)
        if map_latents is not None:
            map_latents = self.backend.asarray(map_latents)
        final = self._denoise(x, timesteps, inputs, guidance, eta=eta, seed=seed, map_latents=map_latents,
                              callback=callback, progress=progress, attention=attention)[:count]
        timings["denoising"] = time.perf_counter() - t0
        return self._outputs(final[None], cams, size, seed, timings)[0]

    def score_distillation(self, latents, image, cameras, timestep: int, noise=None, seed: int | None = None,
                           guidance_scale: float | None = None, prompt: str = "", negative_prompt: str = "",
                           normals=None, *, attention: str | None = None) -> np.ndarray:
        """The score-distillation (SDS) gradient for scaled latents (V, 4, h, w), float32 numpy.

        ``x_t = add_noise(latents, noise, t)``; returns ``(1 − alphas_cumprod[t])·(ε̂ − noise)``
        with ε̂ the guided noise prediction (threestudio's weighting): the gradient to apply to the
        latents. ``noise`` (V, 4, h, w) or drawn from ``default_rng(seed)``.
        """
        cfg = self.config
        hw = self.native_size // self.latent_factor
        lat = self._numeric(latents, "latents")
        if lat.ndim != 4 or lat.shape[1:] != (self.unet_config.out_channels, hw, hw):
            raise InputError(f"latents must have shape (views, {self.unet_config.out_channels}, {hw}, {hw}); "
                             f"got {lat.shape}")
        t = self._train_timestep(timestep)
        guidance = check_guidance(cfg.guidance_scale if guidance_scale is None else guidance_scale)
        if attention is not None:
            check_attention(attention)
        if isinstance(image, (list, tuple)):
            raise InputError("score_distillation() takes one photo (or its Conditioning), not a list")
        source = self._source(image)
        count = len(lat)
        cams = self._cameras_for(cameras, count, "latents")
        noise = self._noise_like(noise, lat.shape, self._seed(seed))
        frames = self._frames(count)
        map_latents = self._map_latents(normals, count, frames)
        cond = self._conditions([source], prompt, negative_prompt)[0]
        inputs = self._unet_inputs([cond], cams, frames, guidance > 1.0)
        b = self.backend
        x_t = b.asarray(self._with_reference_slot(self.scheduler.add_noise(lat, noise, t), frames))
        out = self._guided_eps(x_t, t, inputs, guidance, None if map_latents is None else b.asarray(map_latents),
                               attention)
        eps = self.scheduler.predicted_noise(out, t, x_t)
        eps = b.to_numpy(eps).astype(np.float32)[:count]
        grad = np.float32(1.0 - self.scheduler.alphas_cumprod[t]) * (eps - noise)
        if not np.isfinite(grad).all():
            raise NumericsError(f"NaN or Inf in the score-distillation gradient at timestep {t} (dtype {cfg.dtype})")
        return grad

    # -- argument checks ---------------------------------------------------------------------

    def _steps(self, num_inference_steps: int | None) -> int:
        steps = check_positive_int(self.config.num_inference_steps if num_inference_steps is None
                                   else num_inference_steps, "num_inference_steps")
        if steps > self.scheduler.num_train_timesteps:
            raise ConfigError(f"num_inference_steps must be <= {self.scheduler.num_train_timesteps}; got {steps}")
        return steps

    def _seed(self, seed: int | None) -> int:
        seed = self.config.seed if seed is None else seed
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer; got {seed!r}")
        return int(seed)

    def _eta(self, eta: float | None) -> float:
        eta = self.config.eta if eta is None else eta
        if check_finite(eta, "eta") < 0:
            raise ConfigError(f"eta must be >= 0; got {eta!r}")
        return float(eta)

    @staticmethod
    def _strength(strength: float) -> float:
        if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating, np.integer)) \
                or not math.isfinite(strength) or not 0.0 < strength <= 1.0:
            raise ConfigError(f"strength must be a number in (0, 1]; got {strength!r}")
        return float(strength)

    def _train_timestep(self, timestep) -> int:
        last = self.scheduler.num_train_timesteps
        ok = isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool)
        if not ok and isinstance(timestep, (float, np.floating)) and float(timestep).is_integer():
            ok, timestep = True, int(timestep)
        if not ok or not 0 <= int(timestep) < last:
            raise InputError(f"timestep must be an integer in [0, {last}); got {timestep!r}")
        return int(timestep)

    def _cameras_for(self, cameras, count: int, what: str) -> list[CameraParams]:
        cams = as_cameras(cameras, count, self.config.elevation)
        if len(cams) != count:
            raise InputError(f"got {count} {what} but {len(cams)} cameras: give one camera per view")
        return cams

    def _numeric(self, x, name: str) -> np.ndarray:
        """A finite float32 numpy array from numpy or a backend array, else an InputError naming ``name``."""
        if not isinstance(x, (np.ndarray, list, tuple)):
            try:
                x = self.backend.to_numpy(x)
            except Exception:  # not this backend's array: numpy may still read it
                pass
        try:
            arr = np.asarray(x, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name} must be an array of numbers; got {type(x).__name__}: {exc}") from exc
        if not np.isfinite(arr).all():
            raise InputError(f"{name} contain NaN or Inf")
        return arr

    def _noise_like(self, noise, shape: tuple, seed: int) -> np.ndarray:
        if noise is None:
            return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        arr = self._numeric(noise, "noise")
        if arr.shape != tuple(shape):
            raise InputError(f"noise must have shape {tuple(shape)}; got {arr.shape}")
        return arr

    def _frames(self, views: int) -> int:
        """Frames per item: the views, and ImageDream's reference slot."""
        return views + 1 if self.image_conditioned else views

    @staticmethod
    def _with_reference_slot(x: np.ndarray, frames: int) -> np.ndarray:
        """Views' latents plus zeros for the reference slot (its input is the reference latent)."""
        pad = np.zeros((frames - len(x),) + x.shape[1:], np.float32)
        return np.concatenate([np.asarray(x, np.float32), pad])

    def _reset_peak_memory(self) -> None:
        if hasattr(self.backend, "reset_peak_memory"):
            self.backend.reset_peak_memory()

    def _output_size(self, output_size: int | None) -> int:
        native = self.native_size
        if output_size is None:
            return native * 2 if self.upsampler is not None else native
        if output_size == native:
            return native
        if output_size == 2 * native:
            if self.upsampler is None:
                raise ConfigError(
                    f"output_size {output_size} needs an upsampler: pass upsampler='stabilityai/sd-x2-latent-upscaler'"
                    " (or 'bilinear')"
                )
            return output_size
        raise ConfigError(f"output_size must be {native} or {2 * native} for this model; got {output_size!r}")

    @staticmethod
    def _initial_noise(latents, items: int, views: int, frames: int, hw: int, seed: int) -> list[np.ndarray]:
        """(frames, 4, hw, hw) float32 per item: from ``latents`` or numpy's generator.

        Item i draws from ``default_rng(seed + i)``, so a batch equals its items run alone with
        those seeds, on every backend. The reference slot's noise (ImageDream) never reaches the
        views: its model input is the clean reference latent at every step.
        """
        if latents is None:
            return [np.random.default_rng(seed + i).standard_normal((frames, 4, hw, hw), dtype=np.float32)
                    for i in range(items)]
        try:
            arr = np.asarray(latents, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InputError(f"latents must be an array of numbers; got {type(latents).__name__}: {exc}") from exc
        if arr.ndim == 4:
            arr = arr[None]
        ok_frames = {views, frames}
        if arr.ndim != 5 or arr.shape[0] != items or arr.shape[1] not in ok_frames or arr.shape[2:] != (4, hw, hw):
            raise InputError(
                f"latents must have shape ({views} or {frames}, 4, {hw}, {hw}) per image"
                f" (with {items} image(s)); got {tuple(np.shape(latents))}"
            )
        if not np.isfinite(arr).all():
            raise InputError("latents contain NaN or Inf")
        if arr.shape[1] < frames:  # no reference slot given: it only ever holds noise
            pad = np.zeros((items, frames - arr.shape[1], 4, hw, hw), np.float32)
            arr = np.concatenate([arr, pad], axis=1)
        return list(arr)


def _check_upsampler_kind(upsampler) -> None:
    if upsampler is None or isinstance(upsampler, (str, os.PathLike)) or callable(upsampler):
        return
    raise ConfigError(f"upsampler must be None, 'bilinear', a folder or a hub id; got {upsampler!r}")


def _memory(backend) -> dict[str, int | None]:
    mem = dict(backend.memory())
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mem["peak_rss_bytes"] = rss if sys.platform == "darwin" else rss * 1024
    except (ImportError, OSError):  # pragma: no cover - Windows
        mem["peak_rss_bytes"] = None
    return mem


__all__ = ["Conditioning", "MultiViewOutput", "OxigafError", "Pipeline"]
