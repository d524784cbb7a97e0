"""``unet.prepare(...)`` + ``unet(x, t, cache=...)`` (the step-invariant work done once per
generation) gives the plain call's numbers on both backends, and refuses a mismatched cache."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from oxigaf.errors import InputError

from conftest import FIXTURES, rel_l2

FOLDER = FIXTURES / "mvunet" / "imagedream_tiny" / "unet"
BACKENDS = [b for b in ("torch", "mlx") if importlib.util.find_spec(b) is not None]
# One CFG batch as the pipeline builds it: 2 groups of 3 frames, each group repeating one text
# and image prompt over its frames (the case the cache shares), plus one per-frame case; 8x8
# latents (a larger map adds nothing here and costs MLX's CPU seconds per call).
B, F, H = 2, 3, 8


def _args(rng, shared: bool) -> dict:
    n = B * F

    def per_group(shape):
        a = rng.standard_normal((B,) + shape, np.float32)
        return np.repeat(a, F, axis=0) if shared else rng.standard_normal((n,) + shape, np.float32)

    return dict(context=per_group((77, 64)), ip=per_group((9, 1280)),
                camera=rng.standard_normal((n, 16), np.float32),
                ip_img=rng.standard_normal((B, 4, H, H), np.float32))


class _Torch:
    def __init__(self):
        import torch

        from oxigaf_torch.unet import load_unet

        self.torch, self.model = torch, load_unet(FOLDER)

    def arr(self, a):
        return self.torch.from_numpy(np.ascontiguousarray(a))

    def call(self, *a, **k):
        with self.torch.no_grad():
            return self.model(*a, **k).float().numpy()

    def prepare(self, *a, **k):
        with self.torch.no_grad():
            return self.model.prepare(*a, **k)


class _MLX:
    def __init__(self):
        import mlx.core as mx

        from oxigaf_mlx.unet import load_unet

        self.mx, self.model = mx, load_unet(FOLDER)

    def arr(self, a):
        return self.mx.array(np.ascontiguousarray(a))

    def call(self, *a, **k):
        return np.array(self.model(*a, **k).astype(self.mx.float32))

    def prepare(self, *a, **k):
        return self.model.prepare(*a, **k)


@pytest.fixture(scope="module", params=BACKENDS)
def unet(request):
    return _Torch() if request.param == "torch" else _MLX()


@pytest.mark.parametrize("shared", [True, False], ids=["shared-per-group", "per-frame"])
def test_cached_call_equals_plain_call(unet, shared):
    rng = np.random.default_rng(3)
    a = {k: unet.arr(v) for k, v in _args(rng, shared).items()}
    cache = unet.prepare(a["context"], a["camera"], F, a["ip"])
    for t in (999, 421):  # the same cache serves every step
        x = unet.arr(rng.standard_normal((B * F, 4, H, H), np.float32))
        ts = unet.arr(np.full(B * F, float(t), np.float32))
        plain = unet.call(x, ts, a["context"], a["camera"], F, a["ip"], a["ip_img"])
        cached = unet.call(x, ts, num_frames=F, ip_img=a["ip_img"], cache=cache)
        assert rel_l2(cached, plain) <= 1e-6
    # the cache carries the conditioning: another camera must change the output
    other = unet.prepare(a["context"], unet.arr(rng.standard_normal((B * F, 16), np.float32)), F, a["ip"])
    moved = unet.call(x, ts, num_frames=F, ip_img=a["ip_img"], cache=other)
    assert rel_l2(moved, cached) > 1e-3


def test_mismatched_cache_is_refused(unet):
    rng = np.random.default_rng(4)
    a = {k: unet.arr(v) for k, v in _args(rng, True).items()}
    cache = unet.prepare(a["context"], a["camera"], F, a["ip"])
    x = unet.arr(rng.standard_normal((B * F, 4, H, H), np.float32))
    with pytest.raises(InputError, match="num_frames"):
        unet.call(x, 500.0, num_frames=B * F, cache=cache)
    with pytest.raises(InputError, match="not both"):
        unet.call(x, 500.0, a["context"], num_frames=F, cache=cache)
