"""Winograd F(4x4, 3x3) and im2col-GEMM convolutions (oxigaf_torch.fast.winograd) against float64
convolutions and, in the whole UNet, against the reference ImageDream fixture."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from test_unet_torch import TOL, _case, _run  # noqa: E402

from oxigaf_torch.fast import winograd  # noqa: E402
from oxigaf_torch.unet import load_unet  # noqa: E402

from conftest import rel_l2  # noqa: E402

# Measured: 2.7e-6 to 3.4e-6 from 24 to 2560 channels (float32 direct convolution: 1e-6).
CONV_TOL = 1e-5


def _direct64(x, w, b):
    return F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 24, 40, 16, 16), (2, 40, 24, 8, 12)])
def test_conv3x3_equals_convolution(layout, bias, shape):
    n, cin, cout, h, w = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, h, w, generator=g).contiguous(memory_format=layout)
    weight = torch.randn(cout, cin, 3, 3, generator=g) / (9 * cin) ** 0.5
    b = torch.randn(cout, generator=g) if bias else None
    out = winograd.conv3x3(x, winograd.transform_kernel(weight), b)
    assert out.is_contiguous(memory_format=layout)
    assert rel_l2(out.numpy(), _direct64(x, weight, b).numpy()) <= CONV_TOL


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
def test_conv3x3_gemm_equals_convolution(dtype, layout, stride, bias):
    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    x = torch.randn(3, 40, 7, 6, generator=g).to(dt).contiguous(memory_format=layout)
    weight = (torch.randn(24, 40, 3, 3, generator=g) / 360 ** 0.5).to(dt)
    b = torch.randn(24, generator=g).to(dt) if bias else None
    for w in (weight, weight.contiguous(memory_format=torch.channels_last)):
        out = winograd.conv3x3_gemm(x, w, b, stride)
        assert out.dtype == dt and out.is_contiguous(memory_format=layout)
        ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride=stride, padding=1)
        if dtype == "float32":  # measured 3e-7
            assert rel_l2(out.numpy(), ref.numpy()) <= 1e-6
        else:  # bfloat16: oneDNN's direct convolution rounds the same way (both measured 1.7e-3)
            direct = F.conv2d(x, w, b, stride=stride, padding=1)
            err, direct_err = (rel_l2(y.double().numpy(), ref.numpy()) for y in (out, direct))
            assert err <= 1.1 * direct_err and err <= 3e-3


def test_gemm_applies_on_small_maps_only():
    conv = winograd.FastConv2d(320, 320, 3, padding=1)
    down = winograd.FastConv2d(320, 320, 3, stride=2, padding=1)
    with torch.no_grad():
        for dt in (torch.float32, torch.bfloat16):
            conv.to(dt), down.to(dt)
            assert conv.gemm_applies(torch.randn(1, 320, 8, 8, dtype=dt))
            assert not conv.gemm_applies(torch.randn(1, 320, 16, 8, dtype=dt))  # above GEMM_MAX_SIZE
            assert down.gemm_applies(torch.randn(1, 320, 16, 16, dtype=dt))  # an 8x8 output
            assert not down.gemm_applies(torch.randn(1, 320, 32, 32, dtype=dt))
        conv.half()
        assert not conv.gemm_applies(torch.randn(1, 320, 4, 4, dtype=torch.float16))  # not measured
        assert not winograd.FastConv2d(64, 64, 3, padding=1).gemm_applies(torch.randn(1, 64, 4, 4))  # narrow
    conv.float()
    assert not conv.gemm_applies(torch.randn(1, 320, 4, 4))  # autograd on: the plain convolution


def _wide_enough(monkeypatch, channels=1, size=4, keep=8):
    monkeypatch.setattr(winograd, "MIN_CHANNELS", channels)
    monkeypatch.setattr(winograd, "MIN_CHANNELS_LAST", channels)
    monkeypatch.setattr(winograd, "MIN_SIZE", size)
    monkeypatch.setattr(winograd, "KEEP_SIZE", keep)


def _counting(monkeypatch):
    calls = []
    real = winograd.conv3x3
    monkeypatch.setattr(winograd, "conv3x3", lambda x, k, b: calls.append(x.shape[-1]) or real(x, k, b))
    return calls


def test_kept_kernel_follows_weight_changes(monkeypatch):
    _wide_enough(monkeypatch)
    conv = winograd.FastConv2d(16, 16, 3, padding=1).requires_grad_(False)
    conv.winograd = True
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        first = conv(x)
        assert rel_l2(first.numpy(), _direct64(x, conv.weight, conv.bias).numpy()) <= CONV_TOL
        kept = conv._winograd_kernel
        conv.weight.mul_(2.0)  # in place: same storage, new version
        second = conv(x)
        assert conv._winograd_kernel is not kept
        assert rel_l2(second.numpy(), _direct64(x, conv.weight, conv.bias).numpy()) <= CONV_TOL
        conv.weight = torch.nn.Parameter(torch.randn(16, 16, 3, 3) / 12, requires_grad=False)  # replaced
        third = conv(x)
        assert rel_l2(third.numpy(), _direct64(x, conv.weight, conv.bias).numpy()) <= CONV_TOL


def test_small_maps_make_the_kernel_per_call(monkeypatch):
    _wide_enough(monkeypatch, keep=16)
    conv = winograd.FastConv2d(16, 24, 3, padding=1).requires_grad_(False)
    conv.winograd = True
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        out = conv(x)
    assert not hasattr(conv, "_winograd_kernel")
    assert rel_l2(out.numpy(), _direct64(x, conv.weight, conv.bias).numpy()) <= CONV_TOL


def test_weight_layout_follows_the_path(monkeypatch):
    """The direct path on channels-last maps gets a channels-last weight (oneDNN would reorder a
    standard one on every call), the per-call kernel a standard one; each call stays exact."""
    _wide_enough(monkeypatch, size=8, keep=16)
    conv = winograd.FastConv2d(16, 24, 3, padding=1).requires_grad_(False)
    conv.winograd = True
    g = torch.Generator().manual_seed(1)
    small = torch.randn(2, 16, 4, 4, generator=g).contiguous(memory_format=torch.channels_last)
    mid = torch.randn(2, 16, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    large = torch.randn(2, 16, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for x, layout in ((small, torch.channels_last), (mid, torch.contiguous_format),
                          (large, torch.contiguous_format), (small, torch.channels_last), (large, torch.channels_last)):
            out = conv(x)
            assert conv.weight.is_contiguous(memory_format=layout)
            assert rel_l2(out.numpy(), _direct64(x, conv.weight, conv.bias).numpy()) <= CONV_TOL
        conv.winograd = False  # off: the weight is left as it is
        conv(mid)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.enable_grad():
        conv.winograd = True
        conv(mid.contiguous())  # autograd on: never touched
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    with torch.inference_mode():
        conv(mid)  # the per-call kernel: the standard layout again
    assert conv.weight.is_contiguous() and not conv.weight.is_inference()
    conv.requires_grad_(True)
    conv(mid).sum().backward()  # the weight still trains
    assert conv.weight.grad is not None


def test_applies_only_where_it_is_exact_and_pays():
    conv = winograd.FastConv2d(320, 320, 3, padding=1)
    conv.winograd = True
    x = torch.randn(1, 320, 16, 16)
    with torch.no_grad():
        assert conv.applies(x)
        assert not conv.applies(torch.randn(1, 320, 18, 16))  # not a multiple of the tile
        assert not conv.applies(torch.randn(1, 320, 4, 4))  # below MIN_SIZE
        assert not conv.applies(x.double())
        assert not winograd.FastConv2d(320, 320, 3, stride=2, padding=1).applies(x)
        assert not winograd.FastConv2d(64, 64, 3, padding=1).applies(torch.randn(1, 64, 16, 16))  # narrow
        mid = winograd.FastConv2d(128, 128, 3, padding=1)  # wide enough only channels-last
        assert mid.applies(torch.randn(1, 128, 16, 16).contiguous(memory_format=torch.channels_last))
        assert not mid.applies(torch.randn(1, 128, 16, 16))
    assert not conv.applies(x)  # autograd on: the plain convolution, whose gradient torch knows


def test_unet_with_winograd_everywhere_matches_the_reference(monkeypatch):
    """Every 3x3 convolution of the tiny ImageDream UNet (stride 1) through Winograd, kept and
    per-call kernels both, against the original code's output; the calls are counted."""
    _wide_enough(monkeypatch, channels=1, size=4, keep=8)
    calls = _counting(monkeypatch)
    c = _case("imagedream_tiny")
    for channels_last in (True, False):
        calls.clear()
        model = load_unet(c["folder"], winograd_conv=True, channels_last=channels_last)
        out = _run(model, c)
        assert len(calls) > 10 and {4, 8, 16} <= set(calls)
        assert rel_l2(out, c["expected"]) <= TOL
    direct = _run(load_unet(c["folder"], winograd_conv=False), c)
    assert rel_l2(out, direct) <= 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unet_with_gemm_convolutions_matches_the_reference(monkeypatch, dtype):
    """Every 3x3 convolution of the tiny ImageDream UNet (strides 1 and 2) as one GEMM, against
    the original code's output in float32; in bfloat16 as close to it as oneDNN's convolutions."""
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "GEMM_MAX_SIZE", 64)
    calls = []
    real = winograd.conv3x3_gemm
    monkeypatch.setattr(winograd, "conv3x3_gemm", lambda x, w, b, s: calls.append(s) or real(x, w, b, s))
    c = _case("imagedream_tiny")
    model = load_unet(c["folder"], dtype=dtype, winograd_conv=False)
    out = _run(model, c)
    assert len(calls) > 10 and set(calls) == {1, 2}
    if dtype == "float32":
        assert rel_l2(out, c["expected"]) <= TOL
    else:
        monkeypatch.setattr(winograd, "GEMM_MAX_SIZE", 0)
        direct = _run(model, c)
        assert rel_l2(out, c["expected"]) <= 1.1 * rel_l2(direct, c["expected"])


def test_load_unet_defaults(monkeypatch):
    c = _case("imagedream_tiny")
    narrow = load_unet(c["folder"])  # no layer of the fixture is wide enough: the layout stays NCHW
    assert narrow.winograd_conv and not winograd.wide_layers(narrow) and not narrow.channels_last
    _wide_enough(monkeypatch)
    on = load_unet(c["folder"])
    assert on.channels_last and all(m.winograd for m in on.modules() if isinstance(m, winograd.FastConv2d))
    off = load_unet(c["folder"], dtype="bfloat16")
    assert not any(m.winograd for m in off.modules() if isinstance(m, winograd.FastConv2d))
    assert not load_unet(c["folder"], winograd_conv=False).channels_last


def test_vae_decode_with_winograd_everywhere(monkeypatch):
    from test_vae import FIXTURE_VAE

    from oxigaf_torch.vae import load_vae

    _wide_enough(monkeypatch)
    calls = _counting(monkeypatch)
    z = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vae = load_vae(FIXTURE_VAE, winograd_conv=True)
        ours = vae.decode(z)
        assert len(calls) > 5 and vae.channels_last  # the decoder channels-last, where Winograd pays
        assert ours.is_contiguous()  # the interface stays NCHW
        direct = load_vae(FIXTURE_VAE, winograd_conv=False)
        assert not direct.channels_last
        direct = direct.decode(z).numpy()
    assert rel_l2(ours.numpy(), direct) <= 1e-5


def test_upsampler_unet_with_winograd_everywhere_matches_diffusers(monkeypatch, tmp_path):
    pytest.importorskip("diffusers")
    from test_upsampler import _make_unet, _run_ours, _run_reference, _unet_inputs

    from oxigaf_torch.backend import TorchBackend
    from oxigaf_torch.upsampler import load_upsampler_unet

    ref = _make_unet(tmp_path)
    inputs = _unet_inputs()
    _wide_enough(monkeypatch)
    calls = _counting(monkeypatch)
    with torch.no_grad():
        ours = _run_ours(TorchBackend(device="cpu"), load_upsampler_unet(tmp_path, winograd_conv=True), inputs)
    assert len(calls) > 5
    assert rel_l2(ours, _run_reference(ref, inputs)) <= TOL
