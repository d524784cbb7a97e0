"""The pipeline's behaviour, its errors and the CLI (the reference runs: test_pipeline_e2e.py)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from oxigaf import CameraParams, DiffusionConfig
from oxigaf.errors import ConfigError, InputError, ModelLoadError
from oxigaf.pipeline import Pipeline

from conftest import BACKENDS, FIXTURES, make_hub_cache, rel_l2

E2E = FIXTURES / "imagedream_e2e"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(E2E / "model", backend=BACKENDS[0])


# Behaviour tests that need no reference numbers run on the shipped toy model (64 px, 8x8 latents):
# the same code paths as the e2e model at a fraction of its cost.
@pytest.fixture(scope="module")
def toy():
    from oxigaf import toys

    return Pipeline.from_pretrained(toys.model_path(), backend=BACKENDS[0])


def test_latents_without_reference_slot(toy, toy_photo):
    # The reference slot only ever holds noise: leaving it out changes nothing.
    noise = np.random.default_rng(0).standard_normal((5, 4, 8, 8), dtype=np.float32)
    kw = dict(num_inference_steps=2, progress=False)
    out = toy.generate(toy_photo, latents=noise[:4], **kw)
    full = toy.generate(toy_photo, latents=noise, **kw)
    assert rel_l2(out.latents, full.latents) <= 1e-6


def test_batch_equals_single_runs_and_keeps_camera_order(toy, toy_photo):
    from PIL import Image

    flipped = toy_photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    cams = [CameraParams(a, 5.0) for a in (0.0, 45.0, 180.0)]
    kw = dict(cameras=cams, num_inference_steps=2, seed=7, progress=False)
    batch = toy.generate([toy_photo, flipped], **kw)
    alone0 = toy.generate(toy_photo, **kw)
    alone1 = toy.generate(flipped, **{**kw, "seed": 8})
    assert rel_l2(batch[0].latents, alone0.latents) <= 1e-5
    assert rel_l2(batch[1].latents, alone1.latents) <= 1e-5
    assert rel_l2(batch[0].latents, batch[1].latents) > 1e-2  # the items are not one run repeated
    assert [c.azimuth for c in batch[1].cameras] == [0.0, 45.0, 180.0]
    # each item's run record names its own seed and the resolved settings
    assert [o.record["seed"] for o in batch] == [7, 8] and alone1.record["seed"] == 8
    assert [o.record["config"]["num_inference_steps"] for o in batch] == [2, 2]


# -- settings: the config, per-call overrides (None = the config's value), ip_weight, prediction_type

SETTINGS = dict(num_inference_steps=2, guidance_scale=3.0, seed=5, eta=0.5, ip_weight=0.5, elevation=10.0)


@pytest.fixture(scope="module")
def configured(toy):
    """The toy model with SETTINGS in its config, beside ``toy`` (the default config)."""
    from oxigaf import toys

    return Pipeline(toys.model_path(), backend=BACKENDS[0], config=DiffusionConfig(**SETTINGS))


def test_per_call_settings_default_to_the_config(toy, configured, toy_photo):
    explicit = toy.generate(toy_photo, progress=False, **SETTINGS)
    implicit = configured.generate(toy_photo, progress=False)
    np.testing.assert_array_equal(implicit.latents, explicit.latents)
    assert [c.elevation for c in implicit.cameras] == [10.0] * 4
    assert implicit.record["config"] == explicit.record["config"]
    assert {k: implicit.record["config"][k] for k in SETTINGS} == SETTINGS
    # refine and score distillation take their steps, eta, guidance, seed and ip_weight from the config too
    views = implicit.images
    seen = []
    a = configured.refine(views, toy_photo, None, strength=1.0, progress=False,
                          callback=lambda i, t, x: seen.append(i))
    b = toy.refine(views, toy_photo, None, strength=1.0, progress=False, **SETTINGS)
    assert seen == [0, 1]  # the config's 2 steps, not a fixed 50
    np.testing.assert_array_equal(a.latents, b.latents)
    sds_kw = {k: SETTINGS[k] for k in ("guidance_scale", "seed", "ip_weight", "elevation")}
    np.testing.assert_array_equal(configured.score_distillation(implicit.latents, toy_photo, None, 500),
                                  toy.score_distillation(implicit.latents, toy_photo, None, 500, **sds_kw))
    # a per-call value overrides the config's
    assert rel_l2(configured.refine(views, toy_photo, None, strength=1.0, progress=False, eta=0.0).latents,
                  a.latents) > 1e-3


def test_ip_weight_reaches_the_unet(toy, toy_photo):
    kw = dict(num_inference_steps=2, seed=1, progress=False)
    base = toy.generate(toy_photo, **kw)
    assert rel_l2(toy.generate(toy_photo, ip_weight=0.0, **kw).latents, base.latents) > 1e-3
    assert rel_l2(toy.generate(toy_photo, ip_weight=1.0, **kw).latents, base.latents) == 0.0  # the default
    g1 = toy.score_distillation(base.latents, toy_photo, None, 500, seed=0)
    g0 = toy.score_distillation(base.latents, toy_photo, None, 500, seed=0, ip_weight=0.0)
    assert rel_l2(g0, g1) > 1e-3
    r1 = toy.refine(base.images, toy_photo, None, strength=0.5, num_inference_steps=2, progress=False)
    r0 = toy.refine(base.images, toy_photo, None, strength=0.5, num_inference_steps=2, progress=False, ip_weight=0.0)
    assert rel_l2(r0.latents, r1.latents) > 1e-3


def test_prediction_type_none_is_the_models_and_a_value_overrides_it(toy, toy_photo):
    from oxigaf import toys

    assert DiffusionConfig().prediction_type is None
    assert toy.scheduler.config.prediction_type == "v_prediction"  # the toy's scheduler_config.json
    eps = Pipeline(toys.model_path(), backend=BACKENDS[0], config=DiffusionConfig(prediction_type="epsilon"))
    assert eps.scheduler.config.prediction_type == "epsilon"
    assert eps.scheduler.alphas_cumprod.tolist() == toy.scheduler.alphas_cumprod.tolist()
    kw = dict(num_inference_steps=2, seed=2, progress=False)
    assert rel_l2(eps.generate(toy_photo, **kw).latents, toy.generate(toy_photo, **kw).latents) > 1e-3
    toy_v = Pipeline(toys.model_path(), backend=BACKENDS[0], config=DiffusionConfig(prediction_type="v_prediction"))
    assert toy_v.scheduler.config.prediction_type == "v_prediction"
    np.testing.assert_array_equal(toy_v.generate(toy_photo, **kw).latents, toy.generate(toy_photo, **kw).latents)


@pytest.mark.parametrize("method", ["generate", "refine", "score_distillation"])
@pytest.mark.parametrize("name, value", [("ip_weight", float("nan")), ("guidance_scale", 30.0), ("seed", -2)])
def test_bad_per_call_settings_are_named_by_every_flow(toy, toy_photo, method, name, value):
    lat = np.zeros((4, 4, 8, 8), np.float32)
    call = {"generate": lambda **kw: toy.generate(toy_photo, progress=False, **kw),
            "refine": lambda **kw: toy.refine(np.zeros((4, 64, 64, 3), np.float32), toy_photo, None, **kw),
            "score_distillation": lambda **kw: toy.score_distillation(lat, toy_photo, None, 500, **kw)}[method]
    with pytest.raises(ConfigError, match=name):
        call(**{name: value})


def _cached_bytes(backend: str) -> int:
    """What the backend holds for reuse between calls: torch's kept CPU buffers, MLX's cache."""
    if backend == "torch":
        from oxigaf_torch.fast import buffers

        return sum(b.numel() * b.element_size() for b in buffers._KEPT.values())
    import mlx.core as mx

    return mx.get_cache_memory()


def test_low_memory_releases_models_and_changes_nothing(toy, toy_photo):
    from oxigaf import toys

    lean = Pipeline(toys.model_path(), backend=BACKENDS[0], config=DiffusionConfig(low_memory=True))
    kw = dict(num_inference_steps=2, seed=3, progress=False)
    out = lean.generate(toy_photo, **kw)
    assert not lean._models  # encoders, UNet and VAE all released after the run
    assert _cached_bytes(BACKENDS[0]) == 0  # and what the backend kept for them
    plain = toy.generate(toy_photo, **kw)
    assert _cached_bytes(BACKENDS[0]) > 0  # which a run without low_memory keeps
    assert rel_l2(out.latents, plain.latents) <= 1e-6
    again = lean.generate(toy_photo, **kw)  # reloaded on demand
    assert rel_l2(again.latents, out.latents) <= 1e-6


def test_callback_sees_every_step(toy, toy_photo):
    seen = []
    toy.generate(toy_photo, num_inference_steps=3, progress=False, callback=lambda i, t, x: seen.append((i, t)))
    assert [i for i, _ in seen] == [0, 1, 2]
    assert [t for _, t in seen] == sorted((t for _, t in seen), reverse=True)


def test_bad_arguments_are_clear_errors(pipe):
    img = E2E / "input.png"
    with pytest.raises(ConfigError, match="guidance_scale"):
        pipe.generate(img, guidance_scale=25.0)
    with pytest.raises(ConfigError, match="num_inference_steps"):
        pipe.generate(img, num_inference_steps=0)
    with pytest.raises(InputError, match="latents"):
        pipe.generate(img, latents=np.zeros((4, 4, 16, 16), np.float32))
    with pytest.raises(ConfigError, match="output_size"):
        pipe.generate(img, output_size=300)
    with pytest.raises(ConfigError, match="upsampler"):
        pipe.generate(img, output_size=512)
    with pytest.raises(InputError, match="image"):
        pipe.generate(None)


def test_missing_component_is_named(tmp_path):
    import shutil

    shutil.copytree(E2E / "model", tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / "vae")
    with pytest.raises(ModelLoadError, match="vae"):
        Pipeline(tmp_path / "m", backend=BACKENDS[0])


def test_bilinear_upsampler_doubles_the_size(toy_photo):
    from oxigaf import toys

    pipe = Pipeline(toys.model_path(), backend=BACKENDS[0], upsampler="bilinear")
    out = pipe.generate(toy_photo, num_inference_steps=1, progress=False)
    assert out.images.shape == (4, 128, 128, 3) and out.latents.shape == (4, 4, 8, 8)


def test_hub_id_loads_offline_from_local_cache(tmp_path):
    make_hub_cache(tmp_path / "hub", "ashawkey/imagedream-ipmv-diffusers", E2E / "model")
    code = ("from oxigaf.pipeline import Pipeline; "
            "p = Pipeline.from_pretrained('ashawkey/imagedream-ipmv-diffusers', backend='torch'); "
            "print('OK', p.model_path)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.startswith("OK") and "snapshots" in out.stdout, out.stderr


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "oxigaf.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_cli_generate_and_errors(tmp_path):
    from oxigaf import toys

    out = _cli("generate", str(E2E / "input.png"), "-o", str(tmp_path / "v"), "--model", str(toys.model_path()),
               "--backend", BACKENDS[0], "--steps", "2", "--azimuths", "0,120,240", "--quiet")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "v").glob("view_*.png")) == ["view_00.png", "view_01.png",
                                                                          "view_02.png"]
    again = _cli("generate", str(E2E / "input.png"), "-o", str(tmp_path / "v"), "--model", str(E2E / "model"))
    assert again.returncode == 2 and "not empty" in again.stderr and "Traceback" not in again.stderr
    bad = _cli("generate", str(tmp_path / "missing.png"), "-o", str(tmp_path / "w"), "--model", str(E2E / "model"),
               "--backend", BACKENDS[0])
    assert bad.returncode == 2 and "missing.png" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    nomodel = _cli("generate", str(E2E / "input.png"), "-o", str(tmp_path / "x"), "--model", str(tmp_path / "nope"))
    assert nomodel.returncode == 2 and "nope" in nomodel.stderr


def test_cli_demo_toy_model_with_ground_truth(tmp_path):
    out = _cli("demo", "-o", str(tmp_path / "demo"), "--backend", BACKENDS[0], "--steps", "2", "--quiet")
    assert out.returncode == 0, out.stderr
    from PIL import Image

    assert Image.open(tmp_path / "demo" / "view_00.png").size == (64, 64)
    # one column per view plus the input, generated above ground truth (x4 nearest)
    assert Image.open(tmp_path / "demo" / "comparison.png").size == ((5 * 64 + 4) * 4, 2 * 64 * 4)
    assert sum("PSNR" in line and "SSIM" in line for line in out.stdout.splitlines()) == 5


def test_cli_info():
    out = _cli("info")
    assert out.returncode == 0 and "torch" in out.stdout
