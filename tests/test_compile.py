"""``compile=True``: the compiled UNet step gives the eager numbers (torch.compile, mx.compile)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from conftest import FIXTURES, rel_l2

FOLDER = FIXTURES / "mvunet" / "imagedream_tiny" / "unet"


def test_compile_option_reaches_config_and_cli():
    from oxigaf import DiffusionConfig
    from oxigaf.cli import build_parser
    from oxigaf.cli import config_from_args as _config
    from oxigaf.errors import ConfigError

    assert DiffusionConfig().compile is False
    with pytest.raises(ConfigError, match="compile"):
        DiffusionConfig(compile="yes")
    args = build_parser().parse_args(["generate", "photo.png", "-o", "out", "--compile"])
    assert _config(args).compile is True
    assert _config(build_parser().parse_args(["generate", "photo.png", "-o", "out"])).compile is False


# Tracing and compiling the graph takes minutes on a CPU: a slow test (docs/testing.md).
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="mlx is not installed")
def test_mlx_compiled_unet_equals_eager():
    import mlx.core as mx

    from oxigaf_mlx.unet import load_unet

    # sdpa: the CPU's default (chunked) evaluates its query blocks as it goes and stays eager
    eager, compiled = load_unet(FOLDER, attention="sdpa"), load_unet(FOLDER, attention="sdpa", compile=True)
    rng = np.random.default_rng(6)
    b, f, h = 1, 3, 16
    n = b * f
    a = lambda *s: mx.array(rng.standard_normal(s, np.float32))  # noqa: E731
    ctx, ip, cam, ref = mx.repeat(a(b, 77, 64), f, axis=0), mx.repeat(a(b, 9, 1280), f, axis=0), a(n, 16), a(b, 4, h, h)
    cache = compiled.prepare(ctx, cam, f, ip)
    outs = []
    for step in (900.0, 300.0):  # the second call reuses the compiled graph
        x, ts = a(n, 4, h, h), mx.full((n,), step)
        want = np.array(eager(x, ts, ctx, cam, f, ip, ref))
        got = np.array(compiled(x, ts, num_frames=f, ip_img=ref, cache=cache))
        assert rel_l2(got, want) <= 1e-4
        outs.append(got)
    assert rel_l2(outs[0], outs[1]) > 1e-3  # a stale graph would give the first step's output again
    assert len(compiled._compiled_bodies) == 1


torch = pytest.importorskip("torch")


def _compiler_works() -> bool:
    try:
        f = torch.compile(lambda a: a * 2 + 1, dynamic=False)
        return bool(torch.equal(f(torch.ones(3)), torch.full((3,), 3.0)))
    except Exception:  # no C++ compiler, unsupported platform...
        return False


# Inductor with freezing (the CPU default) takes minutes to compile even the tiny UNet with a cold
# cache: a slow test (docs/testing.md).
@pytest.mark.slow
def test_compiled_unet_equals_eager():
    if not _compiler_works():
        pytest.skip("torch.compile is unavailable here")
    from oxigaf_torch.unet import load_unet

    eager, compiled = load_unet(FOLDER), load_unet(FOLDER, compile=True)
    rng = np.random.default_rng(5)
    b, f, h = 1, 3, 16
    n = b * f
    t = lambda *s: torch.from_numpy(rng.standard_normal(s, np.float32))  # noqa: E731
    ctx, ip, cam, ref = t(b, 77, 64).repeat_interleave(f, 0), t(b, 9, 1280).repeat_interleave(f, 0), t(n, 16), \
        t(b, 4, h, h)
    with torch.no_grad():
        for step in (900.0, 300.0):  # the second call reuses the compiled graph
            x, ts = t(n, 4, h, h), torch.full((n,), step)
            want = eager(x, ts, ctx, cam, f, ip, ref)
            cache = compiled.prepare(ctx, cam, f, ip)
            got = compiled(x, ts, num_frames=f, ip_img=ref, cache=cache)
            assert rel_l2(got.numpy(), want.numpy()) <= 1e-4


# --------------------------------------------------------------------------- the fused guided DDIM step


def _toy_scheduler_config(**changes) -> dict:
    import json

    from oxigaf import toys

    path = toys.model_path() / "scheduler" / "scheduler_config.json"
    return {**json.loads(path.read_text()), **changes}


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_linear_ddim_weights_equal_the_diffusers_step(prediction):
    from diffusers import DDIMScheduler as Reference

    from oxigaf.schedulers import DDIMScheduler

    config = _toy_scheduler_config(prediction_type=prediction)
    ours, ref = DDIMScheduler.from_config(config), Reference.from_config(config)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    rng = np.random.default_rng(11)
    for t in (int(ours.timesteps[0]), int(ours.timesteps[9]), int(ours.timesteps[-1])):
        sample, output = rng.standard_normal((2, 3, 4, 8, 8), dtype=np.float32)
        w_sample, w_output = ours.linear_weights(t)
        want = ref.step(torch.from_numpy(output), t, torch.from_numpy(sample)).prev_sample.numpy()
        assert rel_l2(w_sample * sample + w_output * output, want) <= 1e-6


def test_linear_ddim_weights_refuse_nonlinear_steps():
    from oxigaf.schedulers import DDIMScheduler

    for change in ({"clip_sample": True}, {"thresholding": True}):
        sched = DDIMScheduler.from_config(_toy_scheduler_config(**change))
        sched.set_timesteps(10)
        assert sched.linear_weights(int(sched.timesteps[0])) is None


@pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="mlx is not installed")
def test_mlx_compiled_guided_step_equals_guidance_then_step():
    import mlx.core as mx

    from oxigaf.pipeline import guide, guided_ddim_update
    from oxigaf.schedulers import DDIMScheduler
    from oxigaf_mlx.backend import MLXBackend

    b = MLXBackend("cpu")
    fused = b.compile_function(guided_ddim_update)
    sched = DDIMScheduler.from_config(_toy_scheduler_config())
    sched.set_timesteps(10)
    rng = np.random.default_rng(12)
    eps = mx.array(rng.standard_normal((10, 4, 8, 8), dtype=np.float32))
    x = mx.array(rng.standard_normal((5, 4, 8, 8), dtype=np.float32))
    outs = []
    for t in (int(sched.timesteps[0]), int(sched.timesteps[5])):  # one graph, the weights are inputs
        want = np.array(sched.step(guide(eps, 5, 5.0), t, x))
        got = np.array(fused(eps, x, *(b.asarray(np.float32(v)) for v in (5.0, *sched.linear_weights(t)))))
        assert rel_l2(got, want) <= 1e-6
        outs.append(got)
    assert rel_l2(outs[0], outs[1]) > 1e-2  # weights baked in at the first call would repeat its output


@pytest.mark.parametrize("guidance, eta", [(5.0, 0.0), (1.0, 0.0), (5.0, 0.5)])
def test_compiled_loop_gives_the_eager_views(guidance, eta, toy_photo, monkeypatch):
    # The loop's fused path (guidance + linear DDIM step in one function), on the shipped toy model:
    # the backend's compile_function where it has one (mlx), else the plain function. The UNet stays
    # the eager one already loaded, so the loop is what is compared.
    from oxigaf import Pipeline, toys

    backend = "mlx" if importlib.util.find_spec("mlx") is not None else "torch"
    pipe = Pipeline.from_pretrained(toys.model_path(), backend=backend)
    kw = dict(num_inference_steps=4, guidance_scale=guidance, eta=eta, seed=5, progress=False)
    eager = pipe.generate(toy_photo, **kw)
    calls = []
    compile_function = getattr(pipe.backend, "compile_function", lambda fn: fn)

    def counted(fn):
        compiled = compile_function(fn)
        return lambda *a: calls.append(1) or compiled(*a)

    monkeypatch.setattr(pipe.backend, "compile_function", counted, raising=False)
    pipe.config = pipe.config.replace(compile=True)
    fused = pipe.generate(toy_photo, **kw)
    assert len(calls) == (4 if eta == 0 else 0)  # eta > 0 draws noise: the general step
    assert rel_l2(fused.latents, eager.latents) <= 1e-5
    assert np.abs(fused.images - eager.images).max() <= 1e-4


def test_pipeline_runs_the_compiled_torch_graph(toy_photo, monkeypatch):
    # The pipeline calls the UNet with grad mode on (torch's default): the compiled graph must
    # run all the same. A stand-in for torch.compile counts the calls instead of compiling.
    from oxigaf import DiffusionConfig, Pipeline, toys

    calls = []

    def fake_compile(fn, **kw):
        return lambda *a: calls.append(kw) or fn(*a)

    monkeypatch.setattr(torch, "compile", fake_compile)
    pipe = Pipeline.from_pretrained(toys.model_path(), backend="torch", config=DiffusionConfig(compile=True))
    out = pipe.generate(toy_photo, num_inference_steps=2, seed=1, progress=False)
    assert torch.is_grad_enabled() and len(calls) == 2  # one UNet call per step (CFG in one batch)
    eager = Pipeline.from_pretrained(toys.model_path(), backend="torch").generate(
        toy_photo, num_inference_steps=2, seed=1, progress=False)
    assert rel_l2(out.latents, eager.latents) <= 1e-5


def test_frozen_graph_steps_aside_when_the_weights_change():
    # Inductor's freezing (the CPU compile) bakes the weights of the first compiled call into the
    # graph. A stand-in graph shows what the model does when they change afterwards: it warns and
    # runs eager, with the new weights, from then on.
    from oxigaf_torch.unet import load_unet

    model = load_unet(FOLDER)
    rng = np.random.default_rng(7)
    t = lambda *s: torch.from_numpy(rng.standard_normal(s, np.float32))  # noqa: E731
    f, h = 3, 16
    x, ts, ctx, ip, cam = t(f, 4, h, h), torch.full((f,), 500.0), t(f, 77, 64), t(f, 9, 1280), t(f, 16)
    with torch.no_grad():
        eager = model(x, ts, ctx, cam, f, ip)
        model.compiled_blocks = lambda x, *rest: torch.zeros_like(x)  # the "frozen" graph
        model._freezing = True
        assert torch.count_nonzero(model(x, ts, ctx, cam, f, ip)) == 0  # the graph ran
        assert torch.count_nonzero(model(x, ts, ctx, cam, f, ip)) == 0  # same weights: still the graph
        model.out[2].weight.mul_(2.0)
        with pytest.warns(UserWarning, match="weights changed"):
            changed = model(x, ts, ctx, cam, f, ip)
        assert model.compiled_blocks is None
    assert rel_l2(changed.numpy(), eager.numpy()) > 1e-3  # the new weights, run eager
