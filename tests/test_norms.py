"""GroupNorm accuracy where torch's CPU kernel cancels: groups with a large mean and small spread."""

import numpy as np
import pytest

from conftest import BACKENDS, rel_l2


def _reference(x: np.ndarray, groups: int, eps: float) -> np.ndarray:
    g = x.astype(np.float64).reshape(x.shape[0], groups, -1)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
    return g.reshape(x.shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_norm_is_exact_for_large_mean_groups(backend):
    rng = np.random.default_rng(0)
    x = (51.0 + 0.08 * rng.standard_normal((2, 8, 6, 6))).astype(np.float32)  # as in the UNet fixture
    want = _reference(x, 4, 1e-5)
    if backend == "torch":
        import torch

        from oxigaf_torch.common import GroupNorm32

        gn = GroupNorm32(4, 8, eps=1e-5)
        got = gn(torch.from_numpy(x)).detach().numpy()
        plain = torch.nn.functional.group_norm(torch.from_numpy(x), 4, eps=1e-5).numpy()
        assert rel_l2(plain, want) > 1e-5  # the cancellation this guards against is real
    else:
        import mlx.core as mx

        from oxigaf_mlx.common import group_norm

        gn = group_norm(4, 8, 1e-5)
        import mlx.nn as nn

        nhwc = mx.array(x.transpose(0, 2, 3, 1))
        got = np.array(gn(nhwc)).transpose(0, 3, 1, 2)
        plain = np.array(nn.GroupNorm(4, 8, eps=1e-5, pytorch_compatible=True)(nhwc)).transpose(0, 3, 1, 2)
        assert rel_l2(plain, want) > 1e-5
    assert rel_l2(got, want) <= 1e-6


def test_channels_last_group_norm_keeps_its_layout_and_accuracy_on_large_maps(monkeypatch):
    # The VAE decoder runs channels-last. On a 256x256 map torch's channels-last kernel drifts
    # (3e-6 here against float64, the groups centred); the inference GroupNorm (oxigaf_torch.fast)
    # keeps the layout and the NCHW path's accuracy.
    torch = pytest.importorskip("torch")
    from oxigaf_torch.fast import norms
    from oxigaf_torch.fast.norms import FastGroupNorm as GroupNorm32

    g = torch.Generator().manual_seed(1)
    gn = GroupNorm32(32, 64, eps=1e-6)
    with torch.no_grad():
        gn.weight.copy_(1 + 0.1 * torch.randn(64, generator=g))
        gn.bias.copy_(0.1 * torch.randn(64, generator=g))
    x = 3 * torch.randn(1, 64, 256, 256, generator=g) + 50 * torch.randn(1, 64, 1, 1, generator=g)
    cl = x.contiguous(memory_format=torch.channels_last)
    w, b = gn.weight.detach().numpy()[:, None, None], gn.bias.detach().numpy()[:, None, None]
    want = _reference(x.numpy(), 32, 1e-6) * w + b
    with torch.no_grad():
        got, nchw = gn(cl), gn(x)
        monkeypatch.setattr(norms, "LARGE_MAP", 10**9)  # the centred groups through the kernel
        kernel = gn(cl)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    assert rel_l2(kernel.numpy(), want) > 5e-7  # the drift this guards against is real
    assert rel_l2(got.numpy(), want) <= 2e-7 and rel_l2(nchw.numpy(), want) <= 2e-7


def test_mlx_group_norm_stays_exact_on_large_maps():
    # A VAE decoder's maps at 512 px: MLX's own GroupNorm sums each group in one run and drifts.
    mx = pytest.importorskip("mlx.core")
    import mlx.nn as nn

    from oxigaf_mlx.common import group_norm

    rng = np.random.default_rng(2)
    x = (3 * rng.standard_normal((1, 256, 256, 64)) + 50 * rng.standard_normal((1, 1, 1, 64))).astype(np.float32)
    want = _reference(x.transpose(0, 3, 1, 2), 32, 1e-6).transpose(0, 2, 3, 1)
    got = np.array(group_norm(32, 64, 1e-6)(mx.array(x)))
    plain = np.array(nn.GroupNorm(32, 64, eps=1e-6, pytorch_compatible=True)(mx.array(x)))
    assert rel_l2(plain, want) > 1e-5  # the drift this guards against is real
    assert rel_l2(got, want) <= 5e-7
