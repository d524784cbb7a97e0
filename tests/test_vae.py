"""The SD VAE (diffusers AutoencoderKL) in every installed backend, against diffusers itself.

Reference models are diffusers ``AutoencoderKL``s with small random configs whose every
parameter is re-drawn (fan-in scaled), saved in float16 with ``save_pretrained`` and loaded
back in float32, so the reference and we compute from the same float16 values.
"""

from __future__ import annotations

import importlib
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from oxigaf.checkpoints import manifest_shapes, write_random_checkpoint
from oxigaf.errors import ConfigError, InputError, ModelLoadError

from conftest import BACKENDS, CHECKPOINTS, FIXTURES, rel_l2

diffusers = pytest.importorskip("diffusers")

FIXTURE_VAE = FIXTURES / "imagedream_e2e" / "model" / "vae"
WEIGHTS = "diffusion_pytorch_model.safetensors"
TOL = 1e-4
# Tiled against untiled decoding with the small random VAE (scale factor 2), measured in
# float32, torch and mlx alike: 0.087 rel L2 at 80 px with 32 px tiles overlapping by 8 px
# (3 × 3 tiles), 0.109 at 40 × 72 px with 24 px tiles and the default 6 px overlap (2 × 4).
# Tiles normalise with their own GroupNorm statistics and see zero padding at their borders,
# so they cannot match exactly, and tiny random weights exaggerate both effects (with 128 px
# tiles on a 320 px image the same model gives 0.02).
TILED_TOL = 0.12

SMALL = dict(
    block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=32,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)
VARIANTS = {
    "small": {},
    # Optional pieces switched off: no quant convs, no mid-block attention.
    "bare": dict(use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False),
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter so no path is dead (diffusers zero-inits nothing here, but
    PyTorch's default init leaves norms at 1/0): fan-in scaled normals for weights, small
    normals around 1 / 0 for norm scales / shifts and biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _make_vae(folder, seed: int = 0, **overrides):
    """Save a random diffusers AutoencoderKL in float16; return it loaded back in float32."""
    model = diffusers.AutoencoderKL(**{**SMALL, **overrides})
    _randomise(model, seed)
    model.half().save_pretrained(folder, safe_serialization=True)
    return diffusers.AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def small_vae(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"vae_{request.param}")
    return folder, _make_vae(folder, **VARIANTS[request.param])


@pytest.fixture(scope="module")
def default_vae(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae_default")
    return folder, _make_vae(folder, seed=1)


def _load(backend: str, folder, **kw):
    return importlib.import_module(f"oxigaf_{backend}.vae").load_vae(folder, **kw)


def _arr(backend: str, x: np.ndarray):
    if backend == "torch":
        return torch.from_numpy(np.ascontiguousarray(x))
    import mlx.core as mx

    return mx.array(x)


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().numpy()
    import mlx.core as mx

    return np.array(x.astype(mx.float32))


def _rand(shape, seed=0, uniform=False):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, shape) if uniform else rng.standard_normal(shape)
    return x.astype(np.float32)


def _reference(ref, images=None, latents=None):
    with torch.no_grad():
        if images is not None:
            dist = ref.encode(torch.from_numpy(images)).latent_dist
            return dist.mean.numpy(), dist.logvar.numpy()
        return ref.decode(torch.from_numpy(latents)).sample.numpy()


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("backend", BACKENDS)
def test_encode_decode_match_diffusers(backend, small_vae):
    folder, ref = small_vae
    vae = _load(backend, folder)
    assert vae.scaling_factor == pytest.approx(0.18215)
    images = _rand((2, 3, 33, 24), seed=1, uniform=True)  # odd: the asymmetric pad matters
    mean, logvar = vae.encode(_arr(backend, images), return_logvar=True)
    ref_mean, ref_logvar = _reference(ref, images=images)
    assert _np(mean).shape == ref_mean.shape == (2, 4, 16, 12)
    assert rel_l2(_np(mean), ref_mean) <= TOL
    assert rel_l2(_np(logvar), ref_logvar) <= TOL
    np.testing.assert_array_equal(_np(vae.encode(_arr(backend, images))), _np(mean))

    latents = _rand((2, 4, 12, 16), seed=2)
    out = _np(vae.decode(_arr(backend, latents)))
    assert out.shape == (2, 3, 24, 32)
    assert rel_l2(out, _reference(ref, latents=latents)) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixture_vae_matches_diffusers(backend):
    ref = diffusers.AutoencoderKL.from_pretrained(FIXTURE_VAE, torch_dtype=torch.float32).eval()
    vae = _load(backend, FIXTURE_VAE)
    images = _rand((1, 3, 37, 29), seed=3, uniform=True)
    mean, logvar = vae.encode(_arr(backend, images), return_logvar=True)
    ref_mean, ref_logvar = _reference(ref, images=images)
    assert rel_l2(_np(mean), ref_mean) <= TOL
    assert rel_l2(_np(logvar), ref_logvar) <= TOL
    latents = _rand((1, 4, 6, 8), seed=4)
    assert rel_l2(_np(vae.decode(_arr(backend, latents))), _reference(ref, latents=latents)) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_logvar_is_clamped(backend, tmp_path):
    # A large quant_conv bias drives the log-variance far beyond [-30, 20] in both directions.
    model = diffusers.AutoencoderKL(**SMALL)
    _randomise(model, 5)
    with torch.no_grad():
        model.quant_conv.bias[4:6] = 500.0
        model.quant_conv.bias[6:] = -500.0
    model.half().save_pretrained(tmp_path, safe_serialization=True)
    ref = diffusers.AutoencoderKL.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    images = _rand((1, 3, 16, 16), seed=6, uniform=True)
    _, logvar = _load(backend, tmp_path).encode(_arr(backend, images), return_logvar=True)
    logvar = _np(logvar)
    assert logvar[:, :2].max() == 20.0 and logvar[:, 2:].min() == -30.0
    np.testing.assert_allclose(logvar, _reference(ref, images=images)[1], rtol=0, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_groupnorm_eps(backend, tmp_path):
    # Inputs ~1e-3 with bias-free input convs give the first GroupNorms variances ~1e-6, where
    # eps = 1e-6 (not PyTorch's 1e-5) decides the numbers.
    model = diffusers.AutoencoderKL(**SMALL)
    _randomise(model, 7)
    with torch.no_grad():
        for conv in (model.encoder.conv_in, model.decoder.conv_in, model.post_quant_conv):
            conv.bias.zero_()
    model.half().save_pretrained(tmp_path, safe_serialization=True)
    ref = diffusers.AutoencoderKL.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    vae = _load(backend, tmp_path)
    images = 1e-3 * _rand((1, 3, 16, 16), seed=8, uniform=True)
    assert rel_l2(_np(vae.encode(_arr(backend, images))), _reference(ref, images=images)[0]) <= TOL
    latents = 1e-3 * _rand((1, 4, 8, 8), seed=9)
    assert rel_l2(_np(vae.decode(_arr(backend, latents))), _reference(ref, latents=latents)) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_close_to_float32(backend, dtype, default_vae):
    folder, ref = default_vae
    vae = _load(backend, folder, dtype=dtype)
    latents = _rand((1, 4, 8, 8), seed=7)
    out = _np(vae.decode(_arr(backend, latents)))
    tol = 1e-2 if dtype == "float16" else 5e-2
    assert np.isfinite(out).all()
    assert rel_l2(out, _reference(ref, latents=latents)) <= tol


@pytest.mark.skipif(not {"torch", "mlx"} <= set(BACKENDS), reason="needs both backends")
def test_backends_agree(default_vae):
    folder, _ = default_vae
    latents = _rand((1, 4, 24, 24), seed=8)
    outs = {b: _np(_load(b, folder).decode(_arr(b, latents), tile_size=24, tile_overlap=8)) for b in BACKENDS}
    assert rel_l2(outs["mlx"], outs["torch"]) <= TOL


# --------------------------------------------------------------------------- checkpoints


def _rewrite(src, dst, change) -> None:
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(change(load_file(str(src / WEIGHTS))), str(dst / WEIGHTS))


LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _to_legacy(state):
    out = {}
    for key, value in state.items():
        for new, old in LEGACY.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        out[key] = value
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_legacy_attention_names(backend, default_vae, tmp_path):
    folder, _ = default_vae
    _rewrite(folder, tmp_path, _to_legacy)
    names = load_file(str(tmp_path / WEIGHTS))
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in names and not any(".to_q." in k for k in names)
    latents = _arr(backend, _rand((1, 4, 8, 8), seed=9))
    np.testing.assert_array_equal(_np(_load(backend, tmp_path).decode(latents)),
                                  _np(_load(backend, folder).decode(latents)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_spellings_rejected(backend, default_vae, tmp_path):
    folder, _ = default_vae
    _rewrite(folder, tmp_path, lambda s: {**s, "encoder.mid_block.attentions.0.query.weight":
                                          s["encoder.mid_block.attentions.0.to_q.weight"]})
    with pytest.raises(ModelLoadError, match=r"encoder\.mid_block\.attentions\.0\.to_q\.weight"):
        _load(backend, tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_and_unexpected_tensors_named(backend, default_vae, tmp_path):
    folder, _ = default_vae
    missing = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"
    _rewrite(folder, tmp_path, lambda s: {k: v for k, v in s.items() if k != missing})
    with pytest.raises(ModelLoadError, match=missing.replace(".", r"\.")):
        _load(backend, tmp_path)
    # A legacy name outside the table's reach is not renamed: it is reported as it is.
    stray = "decoder.mid_block.resnets.0.query.weight"
    _rewrite(folder, tmp_path, lambda s: {**s, stray: np.zeros((4,), np.float16)})
    with pytest.raises(ModelLoadError, match=stray.replace(".", r"\.")):
        _load(backend, tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsupported_config_rejected(backend, default_vae, tmp_path):
    folder, _ = default_vae
    _rewrite(folder, tmp_path, lambda s: s)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["down_block_types"] = ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="AttnDownEncoderBlock2D"):
        _load(backend, tmp_path)


# --------------------------------------------------------------------------- batching, tiling, inputs


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_equals_each_alone(backend, default_vae):
    folder, ref = default_vae
    vae = _load(backend, folder)
    latents = _rand((3, 4, 8, 8), seed=10)
    batch = _np(vae.decode(_arr(backend, latents)))
    for i in range(3):
        np.testing.assert_array_equal(batch[i:i + 1], _np(vae.decode(_arr(backend, latents[i:i + 1]))))
    assert rel_l2(batch, _reference(ref, latents=latents)) <= TOL
    images = _rand((3, 3, 16, 16), seed=11, uniform=True)
    means = _np(vae.encode(_arr(backend, images)))
    for i in range(3):
        np.testing.assert_array_equal(means[i:i + 1], _np(vae.encode(_arr(backend, images[i:i + 1]))))


def _starts(length, tile, stride):
    if length <= tile:
        return [0]
    out = list(range(0, length - tile, stride))
    return out + [length - tile]


def _tiled_reference(ref, latents, tile_px, overlap_px):
    """The tiling scheme stated independently on diffusers' own modules: the trunk (conv_in,
    mid block) on the whole latent, the rest per tile, cross-faded by
    weight(p) = min(1, (p - start + 0.5) / ramp, (end - p - 0.5) / ramp) at inner tile edges."""
    dec, f = ref.decoder, 2 ** (len(ref.config.block_out_channels) - 1)
    with torch.no_grad():
        h = dec.mid_block(dec.conv_in(ref.post_quant_conv(torch.from_numpy(latents))))
        _, _, lh, lw = h.shape
        t, o = tile_px // f, overlap_px // f
        acc = np.zeros((1, 3, lh * f, lw * f))
        wsum = np.zeros((lh * f, lw * f))

        def weights(start, size, length):
            centre = np.arange(start * f, (start + size) * f) + 0.5
            w = np.ones(size * f)
            if start > 0:
                w = np.minimum(w, (centre - start * f) / overlap_px)
            if start + size < length:
                w = np.minimum(w, ((start + size) * f - centre) / overlap_px)
            return w

        for y in _starts(lh, t, t - o):
            for x in _starts(lw, t, t - o):
                th, tw = min(t, lh), min(t, lw)
                piece = h[:, :, y:y + th, x:x + tw]
                for block in dec.up_blocks:
                    piece = block(piece)
                img = dec.conv_out(dec.conv_act(dec.conv_norm_out(piece))).numpy()
                w = np.outer(weights(y, th, lh), weights(x, tw, lw))
                acc[:, :, y * f:(y + th) * f, x * f:(x + tw) * f] += img * w
                wsum[y * f:(y + th) * f, x * f:(x + tw) * f] += w
    return acc / wsum


@pytest.fixture(scope="module")
def tiled_case(default_vae):
    """Latents and diffusers' answers for the tiled tests, computed once for every backend."""
    _, ref = default_vae
    square = _rand((1, 4, 40, 40), seed=12)  # 80 px; 32 px tiles with 8 px overlap: 3 × 3 tiles
    rect = _rand((1, 4, 20, 36), seed=13)  # 40 × 72 px; 24 px tiles, default 6 px overlap: 2 × 4 tiles
    return {
        "square": square, "rect": rect,
        "square_untiled": _reference(ref, latents=square), "square_tiled": _tiled_reference(ref, square, 32, 8),
        "rect_untiled": _reference(ref, latents=rect), "rect_tiled": _tiled_reference(ref, rect, 24, 6),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiled_decode(backend, default_vae, tiled_case):
    folder, _ = default_vae
    vae = _load(backend, folder, tile_size=32, tile_overlap=8)
    latents = _arr(backend, tiled_case["square"])
    tiled = _np(vae.decode(latents))
    untiled = _np(vae.decode(latents, tile_size=0))
    assert rel_l2(untiled, tiled_case["square_untiled"]) <= TOL
    assert rel_l2(tiled, tiled_case["square_tiled"]) <= TOL
    err = rel_l2(tiled, untiled)
    assert 0 < err <= TILED_TOL, err
    # A tile as large as the image is the untiled decode; the per-call size overrides load time.
    np.testing.assert_array_equal(_np(vae.decode(latents, tile_size=80)), untiled)
    # Non-square latents with a partial last tile and the default overlap (a quarter tile).
    out = _np(vae.decode(_arr(backend, tiled_case["rect"]), tile_size=24))
    assert out.shape == (1, 3, 40, 72)
    assert rel_l2(out, tiled_case["rect_tiled"]) <= TOL
    assert rel_l2(out, tiled_case["rect_untiled"]) <= TILED_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend, default_vae):
    folder, _ = default_vae
    vae = _load(backend, folder)
    with pytest.raises(InputError):
        vae.decode(_arr(backend, _rand((1, 3, 8, 8))))
    with pytest.raises(InputError):
        vae.encode(_arr(backend, _rand((3, 16, 16))))
    with pytest.raises(ConfigError):
        vae.decode(_arr(backend, _rand((1, 4, 8, 8))), tile_size=7)
    with pytest.raises(ConfigError):
        _load(backend, folder, tile_size=32, tile_overlap=32)
    with pytest.raises(ConfigError):
        _load(backend, folder, dtype="float64")


# --------------------------------------------------------------------------- the real layout


@pytest.mark.slow
def test_sd21_vae_manifest_loads_strictly(tmp_path):
    src = CHECKPOINTS / "sd21-vae"
    shapes = manifest_shapes(src / "keys.json")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    write_random_checkpoint(shapes, tmp_path / WEIGHTS, seed=0, dtype=np.float16)
    latents = _rand((1, 4, 4, 4), seed=14)
    outs = {}
    for backend in BACKENDS:
        vae = _load(backend, tmp_path)
        assert vae.scale_factor == 8 and vae.scaling_factor == pytest.approx(0.18215)
        outs[backend] = _np(vae.decode(_arr(backend, latents)))
        assert outs[backend].shape == (1, 3, 32, 32) and np.isfinite(outs[backend]).all()
    if len(outs) == 2:
        assert rel_l2(outs["mlx"], outs["torch"]) <= TOL
