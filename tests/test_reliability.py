"""Reliability: broken models, bad settings, odd images and failures while saving.

Every user-caused problem must end in an ``OxigafError`` whose message names it (the file, the
tensor, the field, the value), before any expensive work where possible; unusual but valid
images must run through with finite output; a NaN or Inf must stop the run naming the stage.

The pipeline cases run on a shrunken copy of the e2e fixture model (the same weights with 8×8
latents, i.e. 64 px views) with one or two denoising steps, on every installed backend.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

import oxigaf
from oxigaf import CameraParams, DiffusionConfig
from oxigaf.errors import BackendError, ConfigError, InputError, ModelLoadError, NumericsError, OxigafError
from oxigaf.images import MAX_SIDE, load_image
from oxigaf.pipeline import MultiViewOutput, Pipeline
from oxigaf.plugins import get_backend

from conftest import BACKENDS, FIXTURES

E2E = FIXTURES / "imagedream_e2e"
UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"
UPSCALER = Path(oxigaf.__file__).parent / "demo_data" / "upscaler"
NAN, INF = float("nan"), float("inf")


def _names(exc: BaseException, *parts: str) -> None:
    msg = str(exc)
    for part in parts:
        assert part in msg, f"{part!r} not in {type(exc).__name__} message: {msg}"


def _edit_json(path: Path, drop=(), **changes) -> None:
    data = json.loads(path.read_text())
    for key in drop:
        data.pop(key, None)
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    """The e2e fixture model with 8×8 latents (64 px views): same weights, a fraction of the work."""
    root = tmp_path_factory.mktemp("small") / "model"
    shutil.copytree(E2E / "model", root)
    _edit_json(root / "unet" / "config.json", image_size=8)
    return root


def _variant(small_model: Path, tmp_path: Path, copies=()) -> Path:
    """A model folder to break: top-level files and the components in ``copies`` are private
    copies, the other components links to the shared small model (never written through)."""
    root = tmp_path / "model"
    root.mkdir()
    for item in small_model.iterdir():
        if item.is_file():
            shutil.copy2(item, root / item.name)
        elif item.name in copies:
            shutil.copytree(item, root / item.name)
        else:
            (root / item.name).symlink_to(item, target_is_directory=True)
    return root


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)


# ------------------------------------------------------------------------------------ models


def _truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:72] = b"#" * 64
    path.write_bytes(bytes(data))


def _tensor_problems(root: Path) -> None:
    path = root / UNET_WEIGHTS
    state = load_file(str(path))
    del state["out.2.bias"]
    state["extra.weight"] = np.zeros(3, np.float16)
    state["camera_embed.0.bias"] = np.zeros(7, np.float16)
    save_file(state, str(path))


def _mvdream_unet(root: Path) -> None:
    # What a text-only MVDream UNet looks like: no image-prompt layers, ip_dim 0.
    _edit_json(root / "unet" / "config.json", drop=("ip_dim",))
    path = root / UNET_WEIGHTS
    state = load_file(str(path))
    save_file({k: v for k, v in state.items() if "_ip." not in k and not k.startswith("image_embed.")}, str(path))


def _drop_image_parts(root: Path) -> None:
    for part in ("image_encoder", "feature_extractor"):
        _remove(root / part)
    _edit_json(root / "model_index.json", drop=("image_encoder", "feature_extractor"))


def _split_into_shards(root: Path) -> None:
    unet = root / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model-00001-of-00002.safetensors")
    names = load_file(str(unet / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    weight_map = {k: "diffusion_pytorch_model-00001-of-00002.safetensors" for k in names}
    weight_map["out.2.bias"] = "diffusion_pytorch_model-00002-of-00002.safetensors"  # never written
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _replace_component(root: Path, name: str, source: Path) -> None:
    _remove(root / name)
    shutil.copytree(source, root / name)


@dataclass
class Case:
    id: str
    mutate: object  # (root) -> the path to load, or None for root itself
    names: tuple
    exc: type = ModelLoadError
    copies: tuple = ()
    early: bool = True  # found before any weights are loaded


def _case(id, mutate, *names, exc=ModelLoadError, copies=(), early=True):
    return Case(id, mutate, names, exc, copies, early)


MODEL_CASES = [
    _case("folder_missing", lambda r: r.parent / "no_such_model", "no_such_model", "does not exist"),
    _case("path_is_a_file", lambda r: r / "model_index.json", "model_index.json", "is a file"),
    _case("component_folder_missing", lambda r: _remove(r / "unet"), "lacks", "unet"),
    _case("component_not_in_index", lambda r: _edit_json(r / "model_index.json", drop=("vae",)), "lacks", "vae"),
    _case("tokenizer_missing", lambda r: _remove(r / "tokenizer"), "tokenizer"),
    _case("model_index_missing", lambda r: (r / "model_index.json").unlink(), "model_index.json", "not found"),
    _case("model_index_corrupt", lambda r: (r / "model_index.json").write_text('{"unet": ["mv_unet", '),
          "model_index.json", "not valid JSON"),
    _case("model_index_not_an_object", lambda r: (r / "model_index.json").write_text("[1, 2]"),
          "model_index.json", "JSON object"),
    _case("unet_config_missing", lambda r: (r / "unet" / "config.json").unlink(), "config.json", "unet",
          copies=("unet",)),
    _case("vae_config_corrupt", lambda r: _truncate(r / "vae" / "config.json", 0.5), "config.json", "vae",
          "not valid JSON", copies=("vae",)),
    _case("scheduler_config_missing", lambda r: (r / "scheduler" / "scheduler_config.json").unlink(),
          "scheduler_config.json", "not found", copies=("scheduler",)),
    _case("scheduler_config_corrupt", lambda r: (r / "scheduler" / "scheduler_config.json").write_bytes(b"\xff\x00{"),
          "scheduler_config.json", copies=("scheduler",)),
    _case("scheduler_config_bad_value",
          lambda r: _edit_json(r / "scheduler" / "scheduler_config.json", beta_end=2.0),
          "scheduler_config.json", "beta_end", exc=OxigafError, copies=("scheduler",)),
    _case("feature_extractor_corrupt",
          lambda r: (r / "feature_extractor" / "preprocessor_config.json").write_text("{{"),
          "preprocessor_config.json", copies=("feature_extractor",)),
    _case("unet_config_key_missing", lambda r: _edit_json(r / "unet" / "config.json", drop=("model_channels",)),
          "unet", "model_channels", copies=("unet",)),
    _case("unet_config_wrong_kind", lambda r: _edit_json(r / "unet" / "config.json", model_channels="64"),
          "unet", "model_channels", "'64'", copies=("unet",)),
    _case("unet_config_impossible_geometry", lambda r: _edit_json(r / "unet" / "config.json", model_channels=48),
          "unet", "config.json", "48", copies=("unet",)),
    _case("unet_config_zero_head_channels", lambda r: _edit_json(r / "unet" / "config.json", num_head_channels=0),
          "unet", "num_head_channels", "0", copies=("unet",)),
    _case("unet_config_channel_mult_not_numbers",
          lambda r: _edit_json(r / "unet" / "config.json", channel_mult=["a", 2]), "unet", "channel_mult", "'a'",
          copies=("unet",)),
    _case("image_encoder_config_zero_patch", lambda r: _edit_json(r / "image_encoder" / "config.json", patch_size=0),
          "image_encoder", "patch_size", "0", copies=("image_encoder",)),
    _case("text_encoder_config_heads_do_not_divide",
          lambda r: _edit_json(r / "text_encoder" / "config.json", num_attention_heads=7),
          "text_encoder", "num_attention_heads 7", copies=("text_encoder",), early=False),
    _case("vae_config_groups_do_not_divide", lambda r: _edit_json(r / "vae" / "config.json", norm_num_groups=7),
          "vae", "norm_num_groups", copies=("vae",), early=False),
    _case("unet_weights_truncated", lambda r: _truncate(r / UNET_WEIGHTS, 0.6),
          str(UNET_WEIGHTS), "truncated", copies=("unet",)),
    _case("unet_weights_header_corrupt", lambda r: _corrupt_header(r / UNET_WEIGHTS),
          str(UNET_WEIGHTS), "corrupt", copies=("unet",)),
    _case("unet_weights_empty", lambda r: (r / UNET_WEIGHTS).write_bytes(b""), str(UNET_WEIGHTS), "too short",
          copies=("unet",)),
    _case("unet_weights_missing", lambda r: (r / UNET_WEIGHTS).unlink(), "no .safetensors", "unet", copies=("unet",)),
    _case("unet_shard_missing", _split_into_shards, "00002-of-00002", "missing", copies=("unet",)),
    _case("image_encoder_truncated", lambda r: _truncate(r / "image_encoder" / "model.safetensors", 0.99),
          "image_encoder", "model.safetensors", "truncated", copies=("image_encoder",)),
    _case("unet_tensors_missing_unexpected_misshaped", _tensor_problems, "missing (1): out.2.bias",
          "unexpected (1): extra.weight", "camera_embed.0.bias: file (7,)", copies=("unet",), early=False),
    _case("vae_folder_as_unet", lambda r: _replace_component(r, "unet", r / "vae"),
          "AutoencoderKL", "MultiViewUNetModel"),
    _case("image_encoder_as_text_encoder", lambda r: _replace_component(r, "text_encoder", r / "image_encoder"),
          "text_encoder", "CLIPVisionModel"),
    _case("mvdream_unet_in_imagedream_folder", _mvdream_unet, "MVDream", "ImageDream", "image_encoder",
          copies=("unet",)),
    _case("imagedream_unet_without_image_encoder", _drop_image_parts, "ImageDream", "image_encoder"),
    _case("text_encoder_width_mismatch", lambda r: _edit_json(r / "unet" / "config.json", context_dim=32),
          "context_dim", "32", "hidden_size", "64", copies=("unet",)),
    _case("upscaler_as_main_model", lambda r: UPSCALER, "StableDiffusionLatentUpscalePipeline", "upsampler="),
    _case("component_as_main_model", lambda r: r / "vae", "AutoencoderKL", "model_index.json"),
]


def _counting_backend(name: str, loads: list):
    """A real backend whose model loaders record that they ran (instance attributes only)."""
    backend = get_backend(name)
    for method in ("load_unet", "load_vae", "load_text_encoder", "load_image_encoder", "load_upsampler_unet"):
        real = getattr(backend, method)

        def counted(*args, _real=real, _method=method, **kwargs):
            loads.append(_method)
            return _real(*args, **kwargs)

        setattr(backend, method, counted)
    return backend


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: c.id)
def test_broken_model_is_named(case, backend_name, small_model, tmp_path):
    root = _variant(small_model, tmp_path, case.copies)
    target = case.mutate(root)
    target = target if isinstance(target, Path) else root
    loads = []
    with pytest.raises(case.exc) as info:
        Pipeline(target, backend=_counting_backend(backend_name, loads))
    _names(info.value, *case.names)
    if case.early:
        assert loads == [], f"weights were loaded before the error: {loads}"


def test_unforeseen_build_failure_still_names_the_folder(backend_name, monkeypatch, small_model):
    # Whatever a config check misses and makes model construction fail ends as a ModelLoadError.
    import importlib

    module = importlib.import_module(f"oxigaf_{backend_name}.unet")

    def broken(folder, **kwargs):
        raise ZeroDivisionError("integer division or modulo by zero")

    monkeypatch.setattr(module, "load_unet", broken)
    with pytest.raises(ModelLoadError) as info:
        get_backend(backend_name).load_unet(small_model / "unet")
    _names(info.value, str(small_model / "unet"), "ZeroDivisionError")


def test_hub_id_offline_and_not_cached(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        Pipeline("nobody/no-such-model", backend=BACKENDS[0])
    _names(info.value, "nobody/no-such-model", "HF_HUB_OFFLINE", "cache")


# ----------------------------------------------------------------------- settings, arguments


@pytest.fixture(scope="module", params=BACKENDS)
def pipe(request, small_model):
    return Pipeline(small_model, backend=request.param)


class Spy:
    """Stands in for a loaded model: records each call and runs ``fn`` (default: nothing); its
    other attributes (``config``, ``encode``…) are the real model's."""

    def __init__(self, model, fn=None):
        self.model, self.fn, self.calls = model, fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append(1)
        return self.fn(*args, **kwargs) if self.fn else None

    def __getattr__(self, name):
        return getattr(self.model, name)


def _spy(pipe, monkeypatch, part: str, fn=None) -> Spy:
    spy = Spy(pipe._model(part), fn)
    monkeypatch.setitem(pipe._models, part, spy)
    return spy


IMG = E2E / "input.png"

ARG_CASES = [
    ("guidance_low", dict(guidance_scale=0.5), ConfigError, ("guidance_scale", "0.5")),
    ("guidance_high", dict(guidance_scale=25.0), ConfigError, ("guidance_scale", "25.0")),
    ("guidance_nan", dict(guidance_scale=NAN), ConfigError, ("guidance_scale", "nan")),
    ("guidance_inf", dict(guidance_scale=INF), ConfigError, ("guidance_scale", "inf")),
    ("guidance_str", dict(guidance_scale="5"), ConfigError, ("guidance_scale", "'5'")),
    ("steps_zero", dict(num_inference_steps=0), ConfigError, ("num_inference_steps", "0")),
    ("steps_negative", dict(num_inference_steps=-3), ConfigError, ("num_inference_steps", "-3")),
    ("steps_fraction", dict(num_inference_steps=1.5), ConfigError, ("num_inference_steps", "1.5")),
    ("steps_beyond_training", dict(num_inference_steps=5000), ConfigError, ("num_inference_steps", "5000")),
    ("no_cameras", dict(cameras=[]), InputError, ("at least one view",)),
    ("camera_nan_azimuth", dict(cameras=[0.0, NAN]), InputError, ("azimuth", "nan")),
    ("camera_inf_elevation", dict(cameras=[(0.0, INF)]), InputError, ("elevation", "inf")),
    ("camera_neg_inf_azimuth", dict(cameras=[CameraParams(0.0), (-INF, 0.0)]), InputError, ("azimuth", "-inf")),
    ("camera_at_pole", dict(cameras=[(0.0, 90.0)]), InputError, ("elevation", "90")),
    ("camera_negative_distance", dict(cameras=[(0.0, 0.0, -1.0)]), InputError, ("distance", "-1.0")),
    ("camera_not_a_camera", dict(cameras=["front"]), InputError, ("camera 0", "'front'")),
    ("camera_unknown_field", dict(cameras=[{"azimuth": 0, "roll": 3}]), InputError, ("camera 0", "roll")),
    ("cameras_not_a_list", dict(cameras=4), InputError, ("cameras",)),
    ("elevation_nan", dict(elevation=NAN), ConfigError, ("elevation", "nan")),
    ("latents_wrong_shape", dict(latents=np.zeros((4, 4, 9, 9), np.float32)), InputError,
     ("latents", "(4, 4, 9, 9)")),
    ("latents_not_numbers", dict(latents="noise"), InputError, ("latents", "str")),
    ("latents_nan", dict(latents=np.full((5, 4, 8, 8), NAN, np.float32)), InputError, ("latents", "NaN")),
    ("output_size_unsupported", dict(output_size=300), ConfigError, ("output_size", "300")),
    ("output_size_needs_upsampler", dict(output_size=128), ConfigError, ("output_size 128", "upsampler")),
    ("attention_unknown", dict(attention="flash"), ConfigError, ("attention", "'flash'")),
    ("seed_negative", dict(seed=-1), ConfigError, ("seed", "-1")),
    ("eta_negative", dict(eta=-0.5), ConfigError, ("eta", "-0.5")),
    ("eta_nan", dict(eta=NAN), ConfigError, ("eta", "nan")),
    ("prompt_not_text", dict(prompt=3), InputError, ("prompt",)),
    ("image_missing", dict(image=E2E / "no_such_input.png"), InputError, ("no_such_input.png", "not found")),
    ("image_wrong_type", dict(image=5), InputError, ("int", "image")),
    ("image_none", dict(image=None), InputError, ("needs an input image",)),
]


@pytest.mark.parametrize("kwargs, exc, names", [c[1:] for c in ARG_CASES], ids=[c[0] for c in ARG_CASES])
def test_bad_generate_arguments_fail_before_any_work(pipe, monkeypatch, kwargs, exc, names):
    spies = [_spy(pipe, monkeypatch, part) for part in ("text_encoder", "image_encoder", "unet")]
    kwargs = {"image": IMG, "num_inference_steps": 1, "progress": False, **kwargs}
    with pytest.raises(exc) as info:
        pipe.generate(**kwargs)
    _names(info.value, *names)
    assert [s.calls for s in spies] == [[], [], []]


SETUP_CASES = [
    ("backend_unknown", dict(backend="tensorflow"), BackendError, ("tensorflow",)),
    ("dtype_unknown", dict(dtype="float8"), ConfigError, ("dtype", "float8")),
    ("device_unknown", dict(device="tpu"), BackendError, ("tpu",)),
    ("views_zero", dict(config=lambda: DiffusionConfig(num_views=0)), ConfigError, ("num_views", "0")),
    ("steps_zero", dict(config=lambda: DiffusionConfig(num_inference_steps=0)), ConfigError,
     ("num_inference_steps", "0")),
    ("guidance_nan", dict(config=lambda: DiffusionConfig(guidance_scale=NAN)), ConfigError, ("guidance_scale", "nan")),
    ("attention_unknown", dict(config=lambda: DiffusionConfig(attention="flash")), ConfigError, ("attention", "flash")),
    ("vae_dtype_unknown", dict(config=lambda: DiffusionConfig(vae_dtype="half")), ConfigError, ("vae_dtype", "half")),
    ("upsampler_kind", dict(upsampler=42), ConfigError, ("upsampler", "42")),
    ("upsampler_missing", dict(upsampler="/no/such/upscaler"), ModelLoadError, ("/no/such/upscaler",)),
]


@pytest.mark.parametrize("kwargs, exc, names", [c[1:] for c in SETUP_CASES], ids=[c[0] for c in SETUP_CASES])
def test_bad_pipeline_settings_fail_before_loading(backend_name, small_model, kwargs, exc, names):
    loads, kwargs = [], dict(kwargs)
    if "backend" in kwargs or "device" in kwargs:
        kwargs.setdefault("backend", backend_name)
    else:
        kwargs["backend"] = _counting_backend(backend_name, loads)
    with pytest.raises(exc) as info:
        if callable(kwargs.get("config")):
            kwargs["config"] = kwargs["config"]()  # DiffusionConfig itself refuses
        Pipeline(small_model, **kwargs)
    _names(info.value, *names)
    assert loads == []


def test_main_model_given_as_upsampler(backend_name, small_model):
    with pytest.raises(ModelLoadError) as info:
        Pipeline(small_model, backend=backend_name, upsampler=small_model)
    _names(info.value, "MultiViewUNetModel", "UNet2DConditionModel")


# -------------------------------------------------------------------------------------- images


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _write_png(path: Path, width: int, height: int, color_type: int, bit_depth: int, rows) -> Path:
    """A PNG written by hand (Pillow cannot write 48-bit RGB, and huge images are cheaper this way):
    ``rows`` yields each row's raw bytes; compressed as it streams."""
    z = zlib.compressobj(1)
    chunks = [z.compress(b"\x00" + row) for row in rows]
    data = b"".join(chunks) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data)
                     + _png_chunk(b"IEND", b""))
    return path


def _pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 90 * np.sin(x / 7.0), 128 + 90 * np.cos(y / 5.0), (x + y) % 256], axis=-1)
    return np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> dict[str, Path]:
    """Unusual but valid inputs: every one must give finite views."""
    d = tmp_path_factory.mktemp("odd_images")
    photo = _pattern(96, 80)
    out = {}
    Image.fromarray(photo).convert("L").save(out.setdefault("gray", d / "gray.png"))
    rgba = np.dstack([photo, np.where(np.arange(80) < 40, 255, 0).astype(np.uint8)[None].repeat(96, 0)])
    Image.fromarray(rgba, "RGBA").save(out.setdefault("rgba", d / "rgba.png"))
    Image.fromarray(photo).convert("CMYK").save(out.setdefault("cmyk", d / "cmyk.jpg"), quality=90)
    gray16 = (photo[..., 0].astype(np.uint16) * 257).astype(">u2")
    _write_png(out.setdefault("gray16", d / "gray16.png"), 80, 96, 0, 16, (r.tobytes() for r in gray16))
    rgb16 = (photo.astype(np.uint16) * 257).astype(">u2")
    _write_png(out.setdefault("rgb16", d / "rgb16.png"), 80, 96, 2, 16, (r.tobytes() for r in rgb16))
    Image.fromarray(_pattern(1500, 24)).save(out.setdefault("tall", d / "tall.png"))
    Image.fromarray(_pattern(20, 1600)).save(out.setdefault("wide", d / "wide.png"))
    Image.fromarray(_pattern(5, 3)).save(out.setdefault("tiny", d / "tiny.png"))
    Image.fromarray(photo).quantize(16).save(out.setdefault("palette", d / "palette.gif"))
    # 7000 × 7000 gray (49 M pixels; Pillow's bomb guard starts at 89 M): a gradient row repeated.
    row = (np.arange(7000) % 251).astype(np.uint8).tobytes()
    _write_png(out.setdefault("huge", d / "huge.png"), 7000, 7000, 0, 8, (row for _ in range(7000)))
    return out


def test_odd_images_load_as_rgb(odd_images):
    sizes = {}
    for name, path in odd_images.items():
        img = load_image(path)
        assert img.mode == "RGB", name
        sizes[name] = img.size
        assert np.asarray(img).std() > 0, name  # the picture survived (not a flat fill)
    assert sizes["huge"] == (MAX_SIDE, MAX_SIDE)  # downscaled on load
    assert sizes["tiny"] == (3, 5) and sizes["tall"] == (24, 1500) and sizes["gray16"] == (80, 96)


# MLX's CLIP forward is slow on a CPU (docs/testing.md): it gets the extreme shapes only.
ODD_FOR_PIPELINE = {"mlx": ["tall", "tiny", "huge"]}


def test_odd_images_give_finite_views(pipe, odd_images):
    # Every mode is RGB after load_image (tested above); what reaches the models differently is
    # the size and shape (CLIP's resize and crop, the VAE input's crop).
    names = ODD_FOR_PIPELINE.get(pipe.backend.name, ["rgba", "cmyk", "gray16", "tall", "wide", "tiny", "huge"])
    outs = pipe.generate([odd_images[n] for n in names], cameras=[90.0], num_inference_steps=1,
                         guidance_scale=1.0, progress=False)
    assert len(outs) == len(names)
    for name, out in zip(names, outs, strict=True):
        assert out.images.shape == (1, 64, 64, 3), name
        assert np.isfinite(out.images).all() and np.isfinite(out.latents).all(), name
        assert out.views[0].size == (64, 64)


def test_rotated_photo_is_turned_once(tmp_path):
    # A phone portrait (EXIF orientation 6) loaded, then passed back in (as the pipeline and the
    # CLI do) must stay upright, not be turned a second time.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_pattern(10, 20)).save(tmp_path / "phone.jpg", exif=exif.tobytes())
    once = load_image(tmp_path / "phone.jpg")
    assert once.size == (10, 20)
    assert load_image(once).size == (10, 20)


def test_bad_image_files_are_input_errors(tmp_path):
    (tmp_path / "notes.png").write_text("this is not a picture\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    good = (E2E / "input.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    # 20000 × 20000: only the header is written; Pillow's bomb guard refuses it before decoding.
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b""))
    cases = {
        "missing.png": ("missing.png", "not found"),
        "notes.png": ("notes.png", "not an image"),
        "empty.jpg": ("empty.jpg",),
        "folder.png": ("folder.png", "folder"),
        "cut.png": ("decode",),
        "bomb.png": ("bomb.png", "too many pixels"),
    }
    for name, parts in cases.items():
        with pytest.raises(InputError) as info:
            load_image(tmp_path / name)
        _names(info.value, *parts)
    for zero in (Image.new("RGB", (0, 5)), np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(InputError, match="zero-sized"):
            load_image(zero)


def test_bad_image_stops_pipeline_before_any_work(pipe, monkeypatch, tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    spies = [_spy(pipe, monkeypatch, part) for part in ("image_encoder", "unet")]
    with pytest.raises(InputError, match="notes.png"):
        pipe.generate([IMG, tmp_path / "notes.png"], num_inference_steps=1, progress=False)
    with pytest.raises(InputError, match="zero-sized"):
        pipe.generate(Image.new("RGB", (4, 0)), num_inference_steps=1, progress=False)
    assert [s.calls for s in spies] == [[], []]


# ------------------------------------------------------------------------------------ numerics


def test_inf_in_unet_output_stops_at_step_2(pipe, monkeypatch):
    real, seen = pipe._model("unet"), []

    def overflowing(*args, **kwargs):
        eps = real(*args, **kwargs)
        return eps + INF if len(spy.calls) == 2 else eps

    spy = _spy(pipe, monkeypatch, "unet", overflowing)
    with pytest.raises(NumericsError) as info:
        pipe.generate(IMG, cameras=[0.0], num_inference_steps=2, guidance_scale=1.0, progress=False,
                      callback=lambda i, t, x: seen.append(i))
    _names(info.value, "denoising step 2/2", "float16", "float32", "bfloat16")
    assert seen == [0]  # stopped at once: no later step, no decoding of garbage


def test_nan_from_vae_decoder_is_named(pipe, monkeypatch):
    vae = pipe._model("vae")

    class NaNDecoder:
        config = vae.config

        def encode(self, x):
            return vae.encode(x)

        def decode(self, z, **kw):
            return vae.decode(z, **kw) * NAN

    monkeypatch.setitem(pipe._models, "vae", NaNDecoder())
    with pytest.raises(NumericsError, match="decoded images"):
        pipe.decode(np.zeros((1, 4, 8, 8), np.float32))


def test_inf_from_vae_decoder_is_not_clipped_to_white(pipe, monkeypatch):
    vae = pipe._model("vae")

    class InfDecoder:
        config = vae.config

        def decode(self, z, **kw):
            return vae.decode(z, **kw) + INF

    monkeypatch.setitem(pipe._models, "vae", InfDecoder())
    with pytest.raises(NumericsError, match="decoded images"):
        pipe.decode(np.zeros((1, 4, 8, 8), np.float32))


def test_inf_in_conditioning_is_named(pipe, monkeypatch):
    real = pipe._model("text_encoder")

    def overflowing(ids):
        out = dict(real(ids))
        out["last_hidden_state"] = out["last_hidden_state"] + INF
        return out

    _spy(pipe, monkeypatch, "text_encoder", overflowing)
    unet = _spy(pipe, monkeypatch, "unet")
    with pytest.raises(NumericsError) as info:
        pipe.generate(IMG, cameras=[0.0], num_inference_steps=1, progress=False)
    _names(info.value, "text encoder", "conditioning", "float32")
    assert unet.calls == []


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_float16_overflowing_weights_stop_with_advice(backend_name, small_model, tmp_path):
    # The UNet's output conv scaled far past float16's range: the real failure users meet.
    root = _variant(small_model, tmp_path, copies=("unet",))
    state = {k: v.astype(np.float32) for k, v in load_file(str(root / UNET_WEIGHTS)).items()}
    state["out.2.weight"] = state["out.2.weight"] * np.float32(1e6)
    save_file(state, str(root / UNET_WEIGHTS))
    pipe16 = Pipeline(root, backend=backend_name, dtype="float16")
    with pytest.raises(NumericsError) as info:
        pipe16.generate(IMG, cameras=[0.0], num_inference_steps=2, guidance_scale=1.0, progress=False)
    _names(info.value, "denoising step 1/2", "float16", "float32")


# ------------------------------------------------------------------------------------- outputs


def _output(views: int = 3, size: int = 16) -> MultiViewOutput:
    rng = np.random.default_rng(0)
    images = rng.random((views, size, size, 3), dtype=np.float32)
    pil = [Image.fromarray((im * 255).astype(np.uint8)) for im in images]
    return MultiViewOutput(pil, images, np.zeros((views, 4, 2, 2), np.float32),
                           [CameraParams(a) for a in np.linspace(0, 270, views)])


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _fail_on_call(n: int, exc=RuntimeError("disk full (simulated)")):
    count = []

    def fail(*args, **kwargs):
        count.append(1)
        if len(count) >= n:
            raise exc
        return fail.real(*args, **kwargs)

    return fail


def test_save_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    out = _output()
    fail = _fail_on_call(2)
    fail.real = json.dumps
    monkeypatch.setattr(json, "dumps", fail)  # cameras.json written, transforms.json fails
    with pytest.raises(RuntimeError, match="simulated"):
        out.save(tmp_path / "views")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one


def test_failing_view_leaves_nothing(tmp_path, monkeypatch):
    out = _output()
    fail = _fail_on_call(2, OSError(28, "No space left on device"))
    fail.real = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises((OSError, OxigafError)) as info:
        out.save(tmp_path / "views")
    _names(info.value, "No space left")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_output(tmp_path, monkeypatch):
    old = _output(views=2).save(tmp_path / "views")
    before = _tree(old)
    fail = _fail_on_call(1)
    fail.real = json.dumps
    monkeypatch.setattr(json, "dumps", fail)
    with pytest.raises(RuntimeError):
        _output(views=4).save(tmp_path / "views", overwrite=True)
    assert _tree(tmp_path / "views") == before
    assert [p.name for p in tmp_path.iterdir()] == ["views"]


def test_failed_swap_restores_the_old_output(tmp_path, monkeypatch):
    old = _output(views=2).save(tmp_path / "views")
    before = _tree(old)
    real_rename, into_place = Path.rename, []

    def rename(self, target):
        if Path(target) == tmp_path / "views":
            into_place.append(self)
            if len(into_place) == 1:  # the new output's swap into place fails once
                raise OSError(5, "Input/output error (simulated)")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises((OSError, OxigafError)):
        _output(views=4).save(tmp_path / "views", overwrite=True)
    monkeypatch.undo()
    assert _tree(tmp_path / "views") == before
    assert [p.name for p in tmp_path.iterdir()] == ["views"]


def test_existing_output_is_never_clobbered_silently(tmp_path):
    out = _output()
    (tmp_path / "views").mkdir()
    (tmp_path / "views" / "mine.txt").write_text("keep me")
    with pytest.raises(InputError) as info:
        out.save(tmp_path / "views")
    _names(info.value, "views", "not empty", "overwrite")
    assert _tree(tmp_path / "views") == {"mine.txt": b"keep me"}
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        out.save(tmp_path / "file")
    with pytest.raises(InputError) as info:
        out.save(tmp_path / "file" / "views")  # a parent that is a file
    _names(info.value, "file")
    (tmp_path / "empty").mkdir()
    out.save(tmp_path / "empty")  # an empty folder is fine
    assert len(list((tmp_path / "empty").glob("view_*.png"))) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "views"]


# ----------------------------------------------------------------------------------------- CLI


def test_cli_errors_are_one_line_exit_2(small_model, tmp_path):
    broken = _variant(small_model, tmp_path, copies=("unet",))
    _truncate(broken / UNET_WEIGHTS, 0.5)
    (tmp_path / "notes.png").write_text("not a picture")
    (tmp_path / "out_file").write_text("x")
    img, model = str(IMG), str(small_model)
    runs = {
        "guidance": (["generate", img, "--model", model, "--guidance", "50"], ("guidance_scale", "50")),
        "guidance_nan": (["generate", img, "--model", model, "--guidance", "nan"], ("guidance_scale", "nan")),
        "steps": (["generate", img, "--model", model, "--steps", "0"], ("num_inference_steps",)),
        "backend": (["generate", img, "--model", model, "--backend", "tensorflow"], ("tensorflow",)),
        "weights": (["generate", img, "--model", str(broken), "--backend", BACKENDS[0]],
                    ("diffusion_pytorch_model.safetensors", "truncated")),
        "image": (["generate", str(tmp_path / "notes.png"), "--model", model, "--backend", BACKENDS[-1]],
                  ("notes.png", "not an image")),
        "azimuth": (["generate", img, "--model", model, "--azimuths", "0,nan"], ("azimuth", "nan")),
        "hub": (["generate", img, "--model", "nobody/no-such-model", "--backend", BACKENDS[0]],
                ("nobody/no-such-model",)),
        "output_is_file": (["generate", img, "--model", model, "-o", str(tmp_path / "out_file")],
                           ("out_file", "not a folder")),
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    procs = {}
    for name, (args, _) in runs.items():
        if "-o" not in args:
            args = [*args, "-o", str(tmp_path / f"out_{name}")]
        procs[name] = subprocess.Popen([sys.executable, "-m", "oxigaf.cli", *args, "--quiet", "--steps", "1"]
                                       if name != "steps" else [sys.executable, "-m", "oxigaf.cli", *args],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2, (name, stderr)
        assert len(lines) == 1 and lines[0].startswith("oxigaf: error: "), (name, stderr)
        for part in runs[name][1]:
            assert part in lines[0], (name, part, lines[0])
        assert not (tmp_path / f"out_{name}").exists(), name
    assert (tmp_path / "out_file").read_text() == "x"
