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

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backend import Backend
from .cameras import CameraParams, as_cameras, camera_vectors, cameras_json, transforms_json
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
from .images import CLIPPreprocessor, load_image, make_grid, to_uint8, vae_input
from .plugins import get_backend
from .schedulers import DDIMScheduler
from .tokenizers import CLIPTokenizer

# Components every published MVDream/ImageDream folder has; ImageDream adds the image encoder.
REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
IMAGE_COMPONENTS = ("image_encoder", "feature_extractor")
LATENT_FACTOR = 8  # VAE downsampling
COMPONENT_CONFIGS = {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": CLIPTextConfig,
                     "image_encoder": CLIPVisionConfig}
NORM_GROUPS = 32  # GroupNorm groups of every UNet block (the reference's normalization())


@dataclass
class MultiViewOutput:
    """What one input image (or prompt) gave.

    ``views`` PIL images; ``images`` float32 (V, H, W, 3) in [0, 1]; ``latents`` float32
    (V, 4, h, w) scaled latents before upsampling; ``cameras`` the views' poses; ``timings``
    seconds per stage; ``memory`` peak bytes (backend counters, and the process's peak RSS).
    """

    views: list
    images: np.ndarray
    latents: np.ndarray
    cameras: list[CameraParams]
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, int | None] = field(default_factory=dict)

    def grid(self, cols: int | None = None):
        return make_grid(self.views, cols=cols)

    def save(self, folder: str | os.PathLike, *, overwrite: bool = False, fov_deg: float | None = None) -> Path:
        """Write ``view_00.png``…, ``grid.png``, ``cameras.json`` and ``transforms.json``.

        Everything is written into a temporary folder beside ``folder`` and renamed into place
        at the end, so a failure never leaves half-written files, and a failed overwrite leaves
        the previous output in place. An existing non-empty folder is an error unless
        ``overwrite=True``; a file-system failure is an ``InputError`` naming the folder.
        """
        import json

        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise InputError(f"output path {folder} exists and is not a folder")
        if folder.is_dir() and any(folder.iterdir()) and not overwrite:
            raise InputError(f"output folder {folder} is not empty; pass overwrite=True (CLI: --overwrite)")
        kwargs = {} if fov_deg is None else {"fov_deg": fov_deg}
        size = int(self.images.shape[1])
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        except OSError as exc:
            raise InputError(f"cannot create the output folder {folder}: {exc}") from exc
        old = None
        try:
            for i, view in enumerate(self.views):
                view.save(tmp / f"view_{i:02d}.png")
            self.grid().save(tmp / "grid.png")
            (tmp / "cameras.json").write_text(json.dumps(cameras_json(self.cameras, size, **kwargs), indent=2))
            (tmp / "transforms.json").write_text(json.dumps(transforms_json(self.cameras, size, **kwargs), indent=2))
            if folder.exists():
                old = tmp.with_name(tmp.name + "-old")
                folder.rename(old)
            tmp.rename(folder)
        except BaseException as exc:
            if old is not None and old.exists() and not folder.exists():
                try:
                    old.rename(folder)  # the swap failed: put the previous output back
                except OSError:
                    pass
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise InputError(f"cannot write the output folder {folder}: {exc}") from exc
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return folder


def _progress(iterable, desc: str, enabled: bool, total: int | None = None):
    """A tqdm bar on a terminal; the bare iterable otherwise."""
    if not (enabled and sys.stderr.isatty()):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


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
    ):
        self.config = config or DiffusionConfig()
        if dtype is not None:
            self.config = self.config.replace(dtype=dtype)
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
        for mult in unet.channel_mult:
            ch = mult * unet.model_channels
            heads, head_dim = unet.heads_for(ch) if ch > 0 else (0, 0)
            if ch <= 0 or ch % NORM_GROUPS or heads < 1 or heads * head_dim != ch:
                raise ModelLoadError(
                    f"{unet.source}: a block of {ch} channels (model_channels {unet.model_channels} x {mult}) "
                    f"cannot be built: it needs a positive multiple of {NORM_GROUPS} that splits into attention "
                    f"heads (num_heads {unet.num_heads}, num_head_channels {unet.num_head_channels})"
                )
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
        if not unet.in_channels == unet.out_channels == vae.latent_channels:
            raise ModelLoadError(
                f"the UNet works on {unet.in_channels} -> {unet.out_channels} latent channels but the VAE's "
                f"latent_channels is {vae.latent_channels}: mixed-up components"
            )

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
                m = b.load_unet(folder, attention=cfg.attention_mode, chunk_size=cfg.attention_chunk_size)
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
    def native_size(self) -> int:
        return int(self._model("unet").config.image_size) * LATENT_FACTOR

    # -- conditioning ------------------------------------------------------------------------

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

    # -- generation --------------------------------------------------------------------------

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
    ):
        """Generate views. A list of images is a batch: a list of outputs comes back, item i
        identical to running it alone with ``seed + i``."""
        cfg = self.config
        steps = check_positive_int(cfg.num_inference_steps if num_inference_steps is None else num_inference_steps,
                                   "num_inference_steps")
        if steps > self.scheduler.num_train_timesteps:
            raise ConfigError(f"num_inference_steps must be <= {self.scheduler.num_train_timesteps}; got {steps}")
        guidance = check_guidance(cfg.guidance_scale if guidance_scale is None else guidance_scale)
        elevation = cfg.elevation if elevation is None else elevation
        seed = cfg.seed if seed is None else seed
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer; got {seed!r}")
        eta = cfg.eta if eta is None else eta
        if check_finite(eta, "eta") < 0:
            raise ConfigError(f"eta must be >= 0; got {eta!r}")
        eta = float(eta)
        if attention is not None:
            check_attention(attention)
        if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
            raise InputError("prompt and negative_prompt must be strings")
        cams = as_cameras(cameras, cfg.num_views, elevation)

        batch = image if isinstance(image, (list, tuple)) else [image]
        if self.image_conditioned:
            if any(item is None for item in batch) or not batch:
                raise InputError("this model (ImageDream) needs an input image")
            pil_images = [load_image(item) for item in batch]
        else:
            if image is not None:
                raise InputError("this model (MVDream) is text-only: pass prompt=..., not an image")
            pil_images = [None]

        native = self.native_size
        want = self._output_size(output_size, native)
        latent_hw = native // LATENT_FACTOR
        views = len(cams)
        frames = views + 1 if self.image_conditioned else views
        init = self._initial_noise(latents, len(pil_images), views, frames, latent_hw, seed)

        results = self._run(pil_images, cams, frames, init, prompt, negative_prompt, steps, guidance, eta, seed,
                            want, native, callback, progress, attention)
        if cfg.low_memory:
            self._release("text_encoder", "image_encoder", "unet", "vae")
        return results if isinstance(image, (list, tuple)) else results[0]

    def _output_size(self, output_size: int | None, native: int) -> int:
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

    def _run(self, pils, cams, frames, noise, prompt, negative_prompt, steps, guidance, eta, seed, want, native,
             callback, progress, attention) -> list[MultiViewOutput]:
        """Denoise every item together: one UNet call per step over all items' frames."""
        b, cfg = self.backend, self.config
        if hasattr(b, "reset_peak_memory"):
            b.reset_peak_memory()
        timings: dict[str, float] = {}
        items, views = len(pils), len(cams)
        cfg_on = guidance > 1.0  # at 1.0 the unconditional pass is skipped
        groups = 2 if cfg_on else 1
        n = items * frames  # frames per guidance branch

        t0 = time.perf_counter()
        text = self._encode_text([negative_prompt, prompt] if cfg_on else [prompt])
        neg_text, pos_text = text[0:1], text[-1:]
        context = b.concat(([neg_text] * n if cfg_on else []) + [pos_text] * n)
        unet_kw: dict = {}
        if self.image_conditioned:
            encoded = [self._encode_image(pil) for pil in pils]
            cond_ip = [states for states, _ in encoded for _ in range(frames)]
            cond_ref = [ref for _, ref in encoded]
            # Unconditional branch: zero CLIP states (the UNet still resamples them) and a zero
            # reference latent.
            unet_kw["ip"] = b.concat(([cond_ip[0] * 0.0] * n if cfg_on else []) + cond_ip)
            unet_kw["ip_img"] = b.concat(([cond_ref[0] * 0.0] * items if cfg_on else []) + cond_ref)
        b.synchronize(context)
        self._check_conditioning(context, unet_kw)
        timings["conditioning"] = time.perf_counter() - t0
        if cfg.low_memory:
            self._release("text_encoder", "image_encoder")

        t0 = time.perf_counter()
        unet = self._model("unet")
        # Cameras repeat per item (c0..c3, ref, c0..c3, ref), never interleaved.
        cam = np.concatenate([camera_vectors(cams), np.zeros((frames - views, 16), np.float32)])
        camera = b.asarray(np.tile(cam, (groups * items, 1)))
        ts_shape = groups * n
        self.scheduler.set_timesteps(steps)
        x = b.asarray(np.concatenate(noise))
        rng = np.random.default_rng([seed, 1]) if eta > 0 else None
        for i, t in enumerate(_progress(self.scheduler.timesteps, "denoising", progress, steps)):
            model_in = b.concat([x] * groups) if cfg_on else x
            ts = b.asarray(np.full(ts_shape, float(t), np.float32))
            eps = unet(model_in, ts, context, camera=camera, num_frames=frames, attention=attention, **unet_kw)
            if cfg_on:
                eps = eps[:n] + guidance * (eps[n:] - eps[:n])
            step_noise = None if rng is None else b.asarray(rng.standard_normal((n, 4) + noise[0].shape[2:],
                                                                                 dtype=np.float32))
            x = self.scheduler.step(eps, int(t), x, eta=eta, noise=step_noise)
            if not b.isfinite(x):
                raise NumericsError(
                    f"NaN or Inf in the latents at denoising step {i + 1}/{steps} (timestep {int(t)}) with dtype "
                    f"{cfg.dtype}: float16 overflow is the usual cause; use dtype='float32' or 'bfloat16'"
                )
            if callback is not None:
                callback(i, int(t), x)
        b.synchronize(x)
        timings["denoising"] = time.perf_counter() - t0
        final = b.to_numpy(x).astype(np.float32).reshape((items, frames) + x.shape[1:])[:, :views]
        if cfg.low_memory:
            self._release("unet")

        outputs = []
        for item in range(items):
            item_timings = dict(timings)
            lat = final[item]
            if want == 2 * native:
                t0 = time.perf_counter()
                lat = np.asarray(self.upsampler(lat, num_inference_steps=cfg.upsampler_steps, seed=seed + item),
                                 np.float32)
                item_timings["upsampling"] = time.perf_counter() - t0
                if not np.isfinite(lat).all():
                    raise NumericsError("NaN or Inf in the upsampled latents: try dtype='float32'")
            t0 = time.perf_counter()
            images = self.decode(lat)
            item_timings["decoding"] = time.perf_counter() - t0
            from PIL import Image

            views_pil = [Image.fromarray(v) for v in to_uint8(images)]
            outputs.append(MultiViewOutput(views_pil, images, final[item], list(cams), item_timings, _memory(b)))
        return outputs

    def _check_conditioning(self, context, unet_kw) -> None:
        """Encoder outputs must be finite: an overflow here would surface later as a NaN in the UNet."""
        b = self.backend
        cfg = self.config
        for what, x, setting in (("text encoder", context, "dtype"), ("image encoder", unet_kw.get("ip"), "dtype"),
                                 ("VAE encoder (reference latent)", unet_kw.get("ip_img"), "vae_dtype")):
            if x is not None and not b.isfinite(x):
                raise NumericsError(
                    f"NaN or Inf in the {what}'s output (conditioning stage) with {setting} {getattr(cfg, setting)}: "
                    f"float16 overflow is the usual cause; use {setting}='float32' or 'bfloat16'"
                )

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


__all__ = ["MultiViewOutput", "OxigafError", "Pipeline"]
