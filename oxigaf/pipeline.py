"""The multi-view pipeline: one photo (ImageDream) or a prompt (MVDream) in, N views out.

``Pipeline`` loads a model folder and runs three flows over the shared parts:
``conditioning`` (text states, the photo's CLIP states and reference latent), ``layout`` (frames,
the reference slot, cameras, the classifier-free-guidance branches, noising), ``denoise`` (the
guided DDIM loop) and ``outputs`` (``MultiViewOutput``, its atomic save and run record).
``generate`` denoises from noise, ``refine`` from rendered views noised part of the way (SDEdit),
``score_distillation`` returns one guided step's score-distillation gradient. After the loop the
reference slot is dropped, the latents are optionally upsampled 2×, and the VAE decodes them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from . import inputs, layout
from .backend import Backend
from .cameras import CameraParams, as_cameras
from .checkpoints import read_shapes, resolve_model
from .conditioning import (
    Conditioning,
    check_conditioning,
    encode_image,
    encode_text,
    load_source,
    make_conditions,
    vae_latents,
)
from .config import DiffusionConfig, check_attention
from .denoise import Denoiser, guide, guided_ddim_update
from .errors import ConfigError, InputError, NumericsError, OxigafError
from .images import CLIPPreprocessor, to_uint8, vae_views
from .outputs import MultiViewOutput, run_record
from .plugins import get_backend
from .preflight import preflight
from .schedulers import DDIMScheduler
from .tokenizers import CLIPTokenizer


class Pipeline:
    """ImageDream / MVDream multi-view generation on any oxigaf backend.

    ``Pipeline(model, backend=...)`` and ``Pipeline.from_pretrained(model, backend=...)`` are the
    same. ``model`` is a local folder in the published diffusers layout or a hub id.
    ``upsampler``: None (256 px views), ``"bilinear"`` (weight-free 2×) or an sd-x2 latent
    upscaler folder / hub id (512 px views). ``config`` holds every generation setting; the
    per-call arguments of ``generate``, ``refine`` and ``score_distillation`` override it for
    one call (None: the config's value).
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
        inputs.check_upsampler_kind(upsampler)
        # Every config and weight-file header first, so a broken folder fails before any weight is read.
        self.folder = preflight(self.model_path)
        self.index, self.image_conditioned = self.folder.index, self.folder.image_conditioned
        self.unet_config, self.vae_config = self.folder.unet_config, self.folder.vae_config
        self.conditioning_maps = self.folder.conditioning_maps
        self.scheduler = self._model_scheduler = DDIMScheduler.from_folder(self.model_path / "scheduler")
        self.scheduler = self._scheduler(self.config)
        self.tokenizer = CLIPTokenizer.from_pretrained(self.model_path / "tokenizer")
        self.preprocessor = (
            CLIPPreprocessor.from_folder(self.model_path / "feature_extractor") if self.image_conditioned else None
        )
        # A LoRA adapter (oxigaf train --lora-rank: OUT/lora) is merged into the UNet's weights at load.
        self.lora = None
        if lora is not None:
            from .training.lora import load_lora

            self.lora = load_lora(lora)
            self.lora.check_against(read_shapes(self.model_path / "unet"), str(self.model_path / "unet"))
        self.upsampler = self._make_upsampler(upsampler)
        self._models: dict[str, object] = {}
        for name in self.folder.networks:
            self._model(name)

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
        self.backend.clear_cache()  # what the backend keeps for reuse outlives the models

    def _make_upsampler(self, upsampler):
        if upsampler is None:
            return None
        from .upsampler import BilinearUpsampler, LatentUpsampler

        if isinstance(upsampler, str) and upsampler == "bilinear":
            return BilinearUpsampler()
        if isinstance(upsampler, (str, os.PathLike)):
            return LatentUpsampler.from_pretrained(upsampler, backend=self.backend, dtype=self.config.dtype)
        return upsampler

    def _scheduler(self, cfg: DiffusionConfig) -> DDIMScheduler:
        """The DDIM scheduler of the model's ``scheduler_config.json``, its prediction type replaced by
        ``cfg.prediction_type`` when that is set (None: the model's)."""
        kind = cfg.prediction_type or self._model_scheduler.config.prediction_type
        if kind == self.scheduler.config.prediction_type:
            return self.scheduler
        return DDIMScheduler(dataclasses.replace(self._model_scheduler.config, prediction_type=kind))

    @property
    def latent_factor(self) -> int:
        """The VAE's downsampling: 2 ** (len(block_out_channels) − 1), 8 for SD's VAE."""
        return self.vae_config.downsampling_factor

    @property
    def native_size(self) -> int:
        return int(self.unet_config.image_size) * self.latent_factor

    # -- conditioning ------------------------------------------------------------------------

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
        return load_source(image, image_conditioned=self.image_conditioned, model=str(self.model_path),
                           backend=self.backend.name)

    def _conditions(self, sources: list, prompt: str, negative_prompt: str) -> list[Conditioning]:
        b = self.backend

        def image(photo):
            clip_states, ref = encode_image(b, photo, image_encoder=self._model("image_encoder"),
                                            preprocessor=self.preprocessor, vae=self._model("vae"),
                                            size=self.native_size, vae_dtype=self.config.vae_dtype)
            return clip_states, b.asarray(ref)

        return make_conditions(
            sources, prompt, negative_prompt, image=image,
            text=lambda prompts: encode_text(b, self.tokenizer, self._model("text_encoder"), prompts),
            check=lambda cond: check_conditioning(cond, b, self.config),
            model=str(self.model_path), backend=b.name)

    # -- the VAE: views <-> latents, and the upsampler ---------------------------------------

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
        cfg = self.config
        latents = vae_latents(self.backend, self._model("vae"), vae_views(views, self.native_size), cfg.vae_dtype)
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

    def _map_latents(self, normals, views: int, frames: int):
        """Normal maps -> their latents (frames, 4, h, w) for a normal-conditioned UNet, else None."""
        normals = inputs.check_normals(normals, views, frames, self.conditioning_maps, self.unet_config.in_channels)
        return None if normals is None else self.encode(normals)

    # -- the parts every flow shares ---------------------------------------------------------

    def _settings(self, image, what: str, *, attention: str | None, batch: bool = False,
                  **overrides) -> tuple[DiffusionConfig, list]:
        """The checking preamble of ``generate``, ``refine`` and ``score_distillation``.

        Returns the call's settings, the config with every given (non-None) override applied and
        checked as ``DiffusionConfig`` checks it, and the input(s) loaded (``_source``): a list of
        images is a batch where ``batch`` allows one.
        """
        given = {k: int(v) if isinstance(v, np.integer) else float(v) if isinstance(v, np.floating) else v
                 for k, v in overrides.items() if v is not None}  # numpy scalars as Python numbers
        cfg = self.config.replace(**given)
        if "num_inference_steps" in overrides:  # a denoising flow
            inputs.check_steps(cfg.num_inference_steps, self.scheduler.num_train_timesteps)
        if attention is not None:
            check_attention(attention)
        if isinstance(image, (list, tuple)) and not batch:
            raise InputError(f"{what}() takes one photo (or its Conditioning), not a list")
        items = image if isinstance(image, (list, tuple)) else [image]
        if not items:
            raise InputError("the list of images is empty")
        return cfg, [self._source(item) for item in items]

    def _denoiser(self, cfg: DiffusionConfig, conds: list[Conditioning], cams: list[CameraParams], frames: int,
                  map_latents, attention: str | None) -> Denoiser:
        """The guided UNet for ``conds`` in the frame layout, its step-invariant inputs prepared once
        by the UNet (the same numbers, fewer per step)."""
        unet, guided = self._model("unet"), cfg.guidance_scale > 1.0
        kw = layout.unet_inputs(self.backend, conds, cams, frames, guided, self.image_conditioned)
        prepared = {k: v for k, v in kw.items() if k not in ("context", "camera", "ip")}
        prepared["cache"] = unet.prepare(kw["context"], kw.get("camera"), kw["num_frames"], kw.get("ip"))
        maps = None if map_latents is None else self.backend.asarray(map_latents)
        return Denoiser(unet, self.backend, self._scheduler(cfg), prepared, cfg.guidance_scale, cfg.ip_weight,
                        maps, attention)

    def _outputs(self, final: np.ndarray, cams: list[CameraParams], size: int, seed: int,
                 timings: dict[str, float], records: list | None = None) -> list[MultiViewOutput]:
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
            out = MultiViewOutput(views_pil, images, lat, list(cams), item_timings, inputs.peak_memory(self.backend))
            if records is not None:
                out.record = records[item]
            outputs.append(out)
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
        *,
        ip_weight: float | None = None,
    ):
        """Generate views from noise. A list of images (or Conditionings) is a batch: a list of
        outputs comes back, item i identical to running it alone with ``seed + i``; every item
        gets the same ``normals`` (normal-conditioned models only). Each output's ``record`` is
        its run record (``outputs.run_record``), which ``save`` writes as ``oxigaf.json``."""
        # 1. check inputs: the call's settings (None = the config's value) and the photos
        cfg, sources = self._settings(image, "generate", attention=attention, batch=True,
                                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                      elevation=elevation, seed=seed, eta=eta, ip_weight=ip_weight)
        cams = as_cameras(cameras, cfg.num_views, cfg.elevation)
        size = inputs.output_size(output_size, self.native_size, self.upsampler)
        views, hw = len(cams), self.native_size // self.latent_factor
        frames = layout.num_frames(views, self.image_conditioned)
        init = inputs.initial_noise(latents, len(sources), views, frames, hw, cfg.seed)
        self.backend.reset_peak_memory()

        # 2. encode the prompts and the photos
        t0 = time.perf_counter()
        map_latents = self._map_latents(normals, views, frames)
        conds = self._conditions(sources, prompt, negative_prompt)
        if map_latents is not None:
            map_latents = np.concatenate([map_latents] * len(conds))
        denoiser = self._denoiser(cfg, conds, cams, frames, map_latents, attention)
        timings = {"conditioning": time.perf_counter() - t0}
        if cfg.low_memory:
            self._release("text_encoder", "image_encoder")

        # 3. the timesteps, 4. the denoising loop from the initial noise
        t0 = time.perf_counter()
        denoiser.scheduler.set_timesteps(cfg.num_inference_steps)
        final = denoiser.loop(np.concatenate(init), denoiser.scheduler.timesteps, eta=cfg.eta, seed=cfg.seed,
                              compile=cfg.compile, dtype=cfg.dtype, callback=callback, progress=progress)
        timings["denoising"] = time.perf_counter() - t0
        final = final.reshape((len(conds), frames) + final.shape[1:])[:, :views]  # drop the reference slot
        if cfg.low_memory:
            self._release("unet")

        # 5. upsample and decode, one output (and run record) per item
        given = image if isinstance(image, (list, tuple)) else [image]
        records = [run_record(self, config=cfg, seed=cfg.seed + i, cameras=cams, prompt=c.prompt,
                              negative_prompt=c.negative_prompt, image=given[i],
                              decoded=None if isinstance(sources[i], Conditioning) else sources[i], size=size,
                              latents=None if latents is None else init[i])
                   for i, c in enumerate(conds)]
        results = self._outputs(final, cams, size, cfg.seed, timings, records)
        if cfg.low_memory:
            self._release("text_encoder", "image_encoder", "unet", "vae")
        return results if isinstance(image, (list, tuple)) else results[0]

    def refine(self, views, image, cameras, strength: float = 0.5, num_inference_steps: int | None = None,
               guidance_scale: float | None = None, prompt: str = "", negative_prompt: str = "", noise=None,
               seed: int | None = None, normals=None, output_size: int | None = None, eta: float | None = None, *,
               callback: Callable | None = None, progress: bool = True, attention: str | None = None,
               ip_weight: float | None = None, elevation: float | None = None) -> MultiViewOutput:
        """Refine rendered views (SDEdit), as GAF does at every iteration of its 3D fit.

        The views are encoded (``encode``), noised to the first timestep that runs and denoised
        with the ``generate`` loop over the tail of diffusers' img2img grid: ``set_timesteps(N)``,
        ``k = min(int(N·strength), N)``, ``timesteps[N − k:]``; GAF's schedule is
        ``num_inference_steps=50, strength=t/1000``. ``image`` is the photo or its
        ``condition()``; ``cameras`` one per view (None: the default orbit at ``elevation``);
        ``noise`` (V, 4, h, w) or drawn from ``default_rng(seed)``. ``latents`` of the output are
        the refined latents before upsampling; upsampling and decoding as in ``generate``.
        """
        # 1. check inputs
        strength = inputs.check_strength(strength)
        cfg, (source,) = self._settings(image, "refine", attention=attention,
                                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                        seed=seed, eta=eta, ip_weight=ip_weight, elevation=elevation)
        steps = cfg.num_inference_steps
        if int(steps * strength) < 1:
            raise ConfigError(f"strength {strength} of {steps} steps runs no denoising step "
                              f"(int({steps} × {strength}) = 0): use a larger strength or more num_inference_steps")
        view_latents = self.encode(views)
        count = len(view_latents)
        cams = self._cameras_for(cameras, count, "views", cfg)
        noise = inputs.noise_like(self.backend, noise, view_latents.shape, cfg.seed)
        size = inputs.output_size(output_size, self.native_size, self.upsampler)
        frames = layout.num_frames(count, self.image_conditioned)
        self.backend.reset_peak_memory()

        # 2. encode the prompt and the photo
        t0 = time.perf_counter()
        map_latents = self._map_latents(normals, count, frames)
        conds = self._conditions([source], prompt, negative_prompt)
        denoiser = self._denoiser(cfg, conds, cams, frames, map_latents, attention)
        timings = {"conditioning": time.perf_counter() - t0}

        # 3. the img2img timesteps, 4. noise the views to the first, 5. the denoising loop
        t0 = time.perf_counter()
        sched = denoiser.scheduler
        timesteps = sched.img2img_timesteps(steps, strength)
        x_t = layout.add_noise(view_latents, noise, sched.alphas_cumprod[int(timesteps[0])])
        final = denoiser.loop(layout.with_reference_slot(x_t, frames), timesteps, eta=cfg.eta, seed=cfg.seed,
                              compile=cfg.compile, dtype=cfg.dtype, callback=callback, progress=progress)[:count]
        timings["denoising"] = time.perf_counter() - t0

        # 6. upsample and decode
        return self._outputs(final[None], cams, size, cfg.seed, timings)[0]

    def score_distillation(self, latents, image, cameras, timestep: int, noise=None, seed: int | None = None,
                           guidance_scale: float | None = None, prompt: str = "", negative_prompt: str = "",
                           normals=None, *, attention: str | None = None, ip_weight: float | None = None,
                           elevation: float | None = None) -> np.ndarray:
        """The score-distillation (SDS) gradient for scaled latents (V, 4, h, w), float32 numpy.

        ``x_t = add_noise(latents, noise, t)``; returns ``(1 − alphas_cumprod[t])·(ε̂ − noise)``
        with ε̂ the guided noise prediction (threestudio's weighting): the gradient to apply to the
        latents. ``noise`` (V, 4, h, w) or drawn from ``default_rng(seed)``.
        """
        # 1. check inputs
        hw = self.native_size // self.latent_factor
        lat = inputs.numeric(self.backend, latents, "latents")
        if lat.ndim != 4 or lat.shape[1:] != (self.unet_config.out_channels, hw, hw):
            raise InputError(f"latents must have shape (views, {self.unet_config.out_channels}, {hw}, {hw}); "
                             f"got {lat.shape}")
        t = inputs.check_timestep(timestep, self.scheduler.num_train_timesteps)
        cfg, (source,) = self._settings(image, "score_distillation", attention=attention,
                                        guidance_scale=guidance_scale, seed=seed, ip_weight=ip_weight,
                                        elevation=elevation)
        count = len(lat)
        cams = self._cameras_for(cameras, count, "latents", cfg)
        noise = inputs.noise_like(self.backend, noise, lat.shape, cfg.seed)
        frames = layout.num_frames(count, self.image_conditioned)

        # 2. encode the prompt and the photo
        map_latents = self._map_latents(normals, count, frames)
        denoiser = self._denoiser(cfg, self._conditions([source], prompt, negative_prompt), cams, frames,
                                  map_latents, attention)

        # 3. noise the latents to t, 4. the guided prediction, 5. the gradient
        b, sched = self.backend, denoiser.scheduler
        x_t = b.asarray(layout.with_reference_slot(layout.add_noise(lat, noise, sched.alphas_cumprod[t]), frames))
        eps = sched.predicted_noise(denoiser.eps(x_t, t), t, x_t)
        eps = b.to_numpy(eps).astype(np.float32)[:count]
        grad = np.float32(1.0 - sched.alphas_cumprod[t]) * (eps - noise)
        if not np.isfinite(grad).all():
            raise NumericsError(f"NaN or Inf in the score-distillation gradient at timestep {t} (dtype {cfg.dtype})")
        return grad

    def _cameras_for(self, cameras, count: int, what: str, cfg: DiffusionConfig) -> list[CameraParams]:
        cams = as_cameras(cameras, count, cfg.elevation)
        if len(cams) != count:
            raise InputError(f"got {count} {what} but {len(cams)} cameras: give one camera per view")
        return cams


__all__ = ["Conditioning", "MultiViewOutput", "OxigafError", "Pipeline", "guide", "guided_ddim_update"]
