"""Properties of the DDIM scheduler that hold for every step count and configuration."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oxigaf.errors import ConfigError
from oxigaf.schedulers import TIMESTEP_SPACINGS, DDIMScheduler, EulerDiscreteScheduler

PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _check_timesteps(ts: np.ndarray, n: int) -> None:
    assert ts.dtype == np.int64 and ts.shape == (n,)
    assert ts.min() >= 0 and ts.max() <= 999
    assert np.all(np.diff(ts) < 0)


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
def test_ddim_timesteps_valid_for_every_step_count(spacing):
    """Exhaustive over 1..1000 (cheap): in range, strictly decreasing, exactly n of them."""
    sched = DDIMScheduler(timestep_spacing=spacing)
    for n in range(1, 1001):
        _check_timesteps(sched.set_timesteps(n), n)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 1000), spacing=st.sampled_from(TIMESTEP_SPACINGS), offset=st.integers(0, 1))
def test_ddim_timesteps_valid_or_refused(n, spacing, offset):
    sched = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    if spacing == "leading" and (n - 1) * (1000 // n) + offset > 999:
        with pytest.raises(ConfigError, match="steps_offset"):
            sched.set_timesteps(n)
        return
    _check_timesteps(sched.set_timesteps(n), n)
    # every step lands strictly below where it started
    for t in sched.timesteps[:3]:
        assert sched.previous_timestep(int(t)) < t


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 1000), spacing=st.sampled_from(TIMESTEP_SPACINGS))
def test_euler_timesteps_and_sigmas_valid(n, spacing):
    sched = EulerDiscreteScheduler(timestep_spacing=spacing, beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012)
    ts = sched.set_timesteps(n)
    assert ts.shape == (n,) and np.all(np.diff(ts) < 0) and ts.min() >= 0 and ts.max() <= 999
    assert sched.sigmas.shape == (n + 1,) and np.all(np.isfinite(sched.sigmas)) and sched.sigmas[-1] == 0.0


configs = st.fixed_dictionaries({
    "beta_schedule": st.sampled_from(("linear", "scaled_linear", "squaredcos_cap_v2")),
    "prediction_type": st.sampled_from(PREDICTIONS),
    "timestep_spacing": st.sampled_from(TIMESTEP_SPACINGS),
    "set_alpha_to_one": st.booleans(),
    "clip_sample": st.booleans(),
    "thresholding": st.booleans(),
})


@settings(max_examples=60, deadline=None)
@given(cfg=configs, n=st.integers(1, 100), step=st.integers(0, 99), seed=st.integers(0, 2**32 - 1))
def test_ddim_eta_zero_is_deterministic(cfg, n, step, seed):
    sched = DDIMScheduler(**cfg)
    ts = sched.set_timesteps(n)
    t = ts[step % n]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    out = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    x_copy, out_copy = x.copy(), out.copy()
    a = sched.step(out, t, x)
    b = sched.step(out, t, x)
    np.testing.assert_array_equal(a, b)
    # inputs untouched, and a fresh scheduler agrees
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(out, out_copy)
    other = DDIMScheduler(**cfg)
    other.set_timesteps(n)
    np.testing.assert_array_equal(other.step(out, t, x), a)
    assert a.dtype == np.float32


@settings(max_examples=60, deadline=None)
@given(
    prediction=st.sampled_from(PREDICTIONS),
    spacing=st.sampled_from(TIMESTEP_SPACINGS),
    set_alpha_to_one=st.booleans(),
    schedule=st.sampled_from(("linear", "scaled_linear")),
    n=st.integers(1, 60),
    eta=st.sampled_from((0.0, 0.3, 1.0)),
    seed=st.integers(0, 2**32 - 1),
)
def test_ddim_beta_start_zero_never_nan(prediction, spacing, set_alpha_to_one, schedule, n, eta, seed):
    """β₀ = 0 makes ᾱ₀ = 1: diffusers' variance is 0/0 at t = 0. Ours stays finite along whole trajectories."""
    sched = DDIMScheduler(beta_start=0.0, beta_end=0.012, beta_schedule=schedule, prediction_type=prediction,
                          timestep_spacing=spacing, set_alpha_to_one=set_alpha_to_one, clip_sample=False)
    assert sched.alphas_cumprod[0] == 1.0
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 2, 3, 3)).astype(np.float32)
    for t in sched.set_timesteps(n):
        x = sched.step(np.tanh(0.9 * x + 0.001 * float(t)), t, x, eta=eta, rng=rng)
        assert np.all(np.isfinite(x))
    # the step at t = 0 itself, whatever the spacing visited
    prev, x0 = sched.step(np.tanh(x), 0, x, eta=eta, rng=rng, return_x0=True)
    assert np.all(np.isfinite(prev)) and np.all(np.isfinite(x0))
