"""The torch multi-view UNet against the reference fixtures (ImageDream and MVDream, tiny)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors.numpy import load_file, save_file  # noqa: E402

from oxigaf.checkpoints import load_state, manifest_shapes, write_random_checkpoint  # noqa: E402
from oxigaf.errors import ConfigError, InputError, ModelLoadError  # noqa: E402
from oxigaf_torch import common  # noqa: E402
from oxigaf_torch.backend import TorchBackend  # noqa: E402
from oxigaf_torch.fast import norms  # noqa: E402
from oxigaf_torch.unet import MultiViewUNet, load_unet  # noqa: E402

from conftest import CHECKPOINTS, FIXTURES, rel_l2  # noqa: E402

TOL = 1e-4
# Measured on the two fixtures against our float32 output: float16 6.5e-4 / 5.4e-4,
# bfloat16 6.0e-3 / 5.3e-3 (relative L2). The bounds leave ~3x margin.
LOW_PRECISION_TOL = {"float16": 2e-3, "bfloat16": 2e-2}
NAMES = ("imagedream_tiny", "mvdream_tiny")
MODES = ("sdpa", "chunked", "naive")
SMALL_CHUNK = 64  # the 3D attention has 5·16·16 = 1280 tokens at the top level: 20 chunks


_MODELS: dict = {}


def _model(c):
    """One float32 model and its default output per fixture, shared by the tests that only read them."""
    key = str(c["folder"])
    if key not in _MODELS:
        model = load_unet(c["folder"])
        _MODELS[key] = (model, _run(model, c))
    return _MODELS[key]


def _case(name: str) -> dict:
    folder = FIXTURES / "mvunet" / name
    io = load_file(str(folder / "io.safetensors"))
    frames = json.loads((folder / "io.json").read_text())["num_frames"]
    args = {
        "x": io["x"], "timesteps": io["timesteps"], "context": io["context"], "camera": io["camera"],
    }
    if "ip_per_batch" in io:
        args["ip"] = np.repeat(io["ip_per_batch"], frames, axis=0)  # frame b·F+f gets item b
        args["ip_img"] = io["ip_img"]
    return {"folder": folder / "unet", "args": args, "frames": frames, "expected": io["expected"]}


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    return _case(request.param)


@pytest.fixture(scope="module")
def imagedream():
    return _case("imagedream_tiny")


@pytest.fixture(scope="module")
def mvdream():
    return _case("mvdream_tiny")


def _tensors(args: dict) -> dict:
    return {k: torch.from_numpy(np.array(v)) for k, v in args.items()}


def _run(model, c, **changes):
    frames = changes.pop("num_frames", c["frames"])
    kw = {**_tensors(c["args"]), **changes}
    with torch.no_grad():
        return model(num_frames=frames, **kw).float().numpy()


def _copy_with_state(src, dst, state):
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(dst / "diffusion_pytorch_model.safetensors"))
    return dst


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("mode", MODES)
def test_parity_with_reference(case, mode, monkeypatch):
    calls = []
    attend = common._attend

    def counting(*a, **k):
        calls.append(a[0].shape[-2])
        return attend(*a, **k)

    monkeypatch.setattr(common, "_attend", counting)
    model = load_unet(case["folder"], attention=mode, chunk_size=SMALL_CHUNK)
    out = _run(model, case)
    assert out.shape == case["expected"].shape
    assert rel_l2(out, case["expected"]) <= TOL
    if mode == "chunked":
        # several query blocks ran, none larger than the chunk
        assert max(calls) <= SMALL_CHUNK
        assert calls.count(SMALL_CHUNK) >= 20


@pytest.mark.parametrize("mode", MODES)
def test_attention_override_per_call(mvdream, mode):
    model = load_unet(mvdream["folder"], attention="auto", chunk_size=SMALL_CHUNK)
    out = _run(model, mvdream, attention=mode)
    assert rel_l2(out, mvdream["expected"]) <= TOL


def test_inputs_not_mutated(case):
    model, _ = _model(case)
    kw = _tensors(case["args"])
    before = {k: v.clone() for k, v in kw.items()}
    with torch.no_grad():
        model(num_frames=case["frames"], **kw)
    for k in kw:
        assert torch.equal(kw[k], before[k]), f"{k} was modified"


def test_changes_that_must_matter(case):
    """Each of these moves the output far beyond the tolerance, so the parity test can fail."""
    model, ref = _model(case)
    assert rel_l2(ref, case["expected"]) <= TOL
    cam0 = _run(model, case, camera=torch.zeros(case["args"]["camera"].shape))
    assert rel_l2(cam0, ref) > 10 * TOL
    # attention restricted to each view alone (num_frames=1) loses the cross-view attention
    kw = {"num_frames": 1}
    if "ip_img" in case["args"]:
        kw["ip_img"] = None  # the reference slot is only defined per group of F frames
    assert rel_l2(_run(model, case, **kw), ref) > 10 * TOL


def test_image_prompt_path(imagedream):
    model, ref = _model(imagedream)
    no_ip = _run(model, imagedream, ip_weight=0.0)
    assert rel_l2(no_ip, ref) > 10 * TOL
    # zero CLIP states still go through the resampler: not the same as ip_weight 0
    zero_ip = _run(model, imagedream, ip=torch.zeros(imagedream["args"]["ip"].shape))
    assert rel_l2(zero_ip, ref) > 10 * TOL
    assert rel_l2(zero_ip, no_ip) > 10 * TOL
    # the pixel controller: without ip_img the caller's frame F-1 is used as is ...
    assert rel_l2(_run(model, imagedream, ip_img=None), ref) > 10 * TOL
    # ... and with it, whatever the caller put in frame F-1 does not matter
    x = imagedream["args"]["x"].copy()
    x[imagedream["frames"] - 1:: imagedream["frames"]] = 123.0
    assert rel_l2(_run(model, imagedream, x=torch.from_numpy(x)), ref) <= 1e-6


def test_batch_items_are_independent(imagedream):
    """Two batch items in one call give what each gives alone (views fastest, groups of F)."""
    model, ref = _model(imagedream)
    f = imagedream["frames"]
    for b in range(2):
        part = {k: v[b * f:(b + 1) * f] if k != "ip_img" else v[b:b + 1] for k, v in imagedream["args"].items()}
        out = _run(model, {**imagedream, "args": part})
        assert rel_l2(out, ref[b * f:(b + 1) * f]) <= 1e-5


def test_timestep_forms(mvdream):
    model, ref = _model(mvdream)
    t = mvdream["args"]["timesteps"]
    assert rel_l2(_run(model, mvdream, timesteps=torch.from_numpy(t.astype(np.float32))), ref) <= 1e-6
    assert np.all(t == t[0])
    assert rel_l2(_run(model, mvdream, timesteps=torch.tensor(int(t[0]))), ref) <= 1e-6
    assert rel_l2(_run(model, mvdream, timesteps=int(t[0])), ref) <= 1e-6


def test_extra_input_channels(imagedream, tmp_path):
    """in_channels 8: the reference latent replaces only the first 4 channels of frame F-1."""
    src = imagedream["folder"]
    state = dict(load_state(src))
    w = state["input_blocks.0.0.weight"]
    rng = np.random.default_rng(0)
    extra = (rng.standard_normal((w.shape[0], 4, 3, 3)) * 0.1).astype(np.float16)
    config = json.loads((src / "config.json").read_text())
    config["in_channels"] = 8
    x = imagedream["args"]["x"]
    e = rng.standard_normal(x.shape).astype(np.float32)
    x8 = np.concatenate([x, e], axis=1)
    f = imagedream["frames"]

    # zero weights on the extra channels: exactly the 4-channel model
    folder = _copy_with_state(src, tmp_path / "zero", {**state, "input_blocks.0.0.weight":
                                                       np.concatenate([w, 0 * extra], axis=1)})
    (folder / "config.json").write_text(json.dumps(config))
    out = _run(load_unet(folder), imagedream, x=torch.from_numpy(x8))
    assert rel_l2(out, imagedream["expected"]) <= TOL

    # live extra channels: same as writing the reference into the first 4 channels by hand
    folder = _copy_with_state(src, tmp_path / "live", {**state, "input_blocks.0.0.weight":
                                                       np.concatenate([w, extra], axis=1)})
    (folder / "config.json").write_text(json.dumps(config))
    model = load_unet(folder)
    out = _run(model, imagedream, x=torch.from_numpy(x8))
    manual = x8.copy()
    manual[f - 1:: f, :4] = imagedream["args"]["ip_img"]
    assert rel_l2(out, _run(model, imagedream, x=torch.from_numpy(manual), ip_img=None)) <= 1e-6
    assert rel_l2(out, imagedream["expected"]) > 10 * TOL


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision(case, dtype):
    _, ref = _model(case)
    model = load_unet(case["folder"], dtype=dtype)
    assert model.dtype == common.torch_dtype(dtype)
    out = _run(model, case)  # float32 inputs: computed in dtype, returned as float32
    assert np.isfinite(out).all()
    assert rel_l2(out, ref) <= LOW_PRECISION_TOL[dtype]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_fast_group_norm_in_half_precision(dtype, layout):
    """The inference GroupNorm + SiLU on a half-precision map (means from a GEMM, rounded; the
    centring into a kept float32 buffer) against float64, as close as the module's path; groups
    with a mean far above their spread, where an uncentred E[x²] − E[x]² would cancel."""
    g = torch.Generator().manual_seed(0)
    norm = common.GroupNorm32(8, 64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
        norm.bias.copy_(torch.randn(64, generator=g))
    norm = norm.to(getattr(torch, dtype)).requires_grad_(False)
    offset = torch.tensor([0.0, 50.0, -300.0, 2.0, 0.0, 1e3, 0.0, 7.0]).repeat_interleave(8)[None, :, None, None]
    # 32x16 maps: the per-channel sums (up to 5e5) would overflow float16
    x = (torch.randn(2, 64, 32, 16, generator=g) + offset).to(norm.weight.dtype).contiguous(memory_format=layout)
    w, b = norm.weight.double(), norm.bias.double()
    for act in (True, False):
        ref = torch.nn.functional.group_norm(x.double(), 8, w, b, norm.eps)
        ref = torch.nn.functional.silu(ref) if act else ref
        with torch.no_grad():
            ours = norms.group_norm_act(norm, x, act, reuse=False)
            # the module's own NCHW path (a channels-last map would take the fast function too)
            module = norm(x.contiguous())
            module = torch.nn.functional.silu(module) if act else module
        assert ours.dtype == x.dtype and ours.is_contiguous(memory_format=layout)
        err, module_err = (rel_l2(y.double().numpy(), ref.numpy()) for y in (ours, module))
        assert err <= 1.05 * module_err and err <= 5e-3


def test_grad_mode_records_a_graph_only_when_something_needs_a_gradient(imagedream, monkeypatch):
    # The pipeline calls the UNet with grad mode on (the core knows nothing of torch): frozen
    # weights and plain inputs must still get the inference path, here seen by its in-place GEGLU.
    model, ref = _model(imagedream)
    from oxigaf_torch.fast import buffers

    kept, scratch = [], buffers.scratch

    def counting(use, *a, **k):
        kept.append(use)
        return scratch(use, *a, **k)

    monkeypatch.setattr(buffers, "scratch", counting)
    args = _tensors(imagedream["args"])
    out = model(num_frames=imagedream["frames"], **args)
    assert torch.is_grad_enabled() and out.grad_fn is None and "geglu" in kept
    assert rel_l2(out.numpy(), ref) <= 1e-6
    kept.clear()
    args["x"].requires_grad_(True)  # a gradient wanted: the graph is recorded, out of place
    out = model(num_frames=imagedream["frames"], **args)
    assert out.grad_fn is not None and not kept
    out.square().mean().backward()
    assert args["x"].grad is not None and torch.isfinite(args["x"].grad).all()


def test_output_dtype_follows_x(mvdream):
    _, ref = _model(mvdream)
    model = load_unet(mvdream["folder"], dtype="float16")
    low = {k: v.half() for k, v in _tensors(mvdream["args"]).items() if v.is_floating_point()}
    with torch.no_grad():
        out = model(num_frames=mvdream["frames"], **{**_tensors(mvdream["args"]), **low})
    assert out.dtype == torch.float16
    assert rel_l2(out.float().numpy(), ref) <= LOW_PRECISION_TOL["float16"]


def test_backend_loader(mvdream):
    model = TorchBackend(device="cpu").load_unet(mvdream["folder"], attention="naive")
    assert isinstance(model, MultiViewUNet) and model.attention == "naive"
    assert rel_l2(_run(model, mvdream), mvdream["expected"]) <= TOL


# --------------------------------------------------------------------------- errors


def test_bad_inputs(imagedream, mvdream):
    idm, _ = _model(imagedream)
    mvd, _ = _model(mvdream)
    with pytest.raises(InputError, match="needs ip"):
        _run(idm, imagedream, ip=None)
    with pytest.raises(InputError, match="no image-prompt"):
        _run(mvd, mvdream, ip=torch.zeros(4, 257, 1280))
    with pytest.raises(InputError, match="num_frames"):
        _run(mvd, mvdream, num_frames=3)
    with pytest.raises(InputError, match="context"):
        _run(mvd, mvdream, context=torch.zeros(4, 77, 32))
    with pytest.raises(InputError, match="camera"):
        _run(mvd, mvdream, camera=torch.zeros(4, 12))
    with pytest.raises(InputError, match="timesteps"):
        _run(mvd, mvdream, timesteps=torch.zeros(3))
    with pytest.raises(InputError, match="x must be"):
        _run(mvd, mvdream, x=torch.zeros(4, 3, 16, 16))
    with pytest.raises(InputError, match="ip_img"):
        _run(idm, imagedream, ip_img=torch.zeros(1, 4, 16, 16))
    with pytest.raises(ConfigError, match="attention"):
        _run(mvd, mvdream, attention="flash")


def test_strict_loading(mvdream, tmp_path):
    src = mvdream["folder"]
    state = dict(load_state(src))

    missing = dict(state)
    del missing["middle_block.1.transformer_blocks.0.attn1.to_k.weight"]
    with pytest.raises(ModelLoadError, match=r"missing.*middle_block\.1\.transformer_blocks\.0\.attn1\.to_k\.weight"):
        load_unet(_copy_with_state(src, tmp_path / "missing", missing))

    extra = {**state, "output_blocks.3.1.extra.weight": np.zeros((4,), np.float16)}
    with pytest.raises(ModelLoadError, match=r"unexpected.*output_blocks\.3\.1\.extra\.weight"):
        load_unet(_copy_with_state(src, tmp_path / "extra", extra))

    shaped = {**state, "time_embed.0.weight": np.zeros((256, 32), np.float16)}
    with pytest.raises(ModelLoadError, match=r"wrong shape.*time_embed\.0\.weight"):
        load_unet(_copy_with_state(src, tmp_path / "shape", shaped))

    # an ImageDream file is not an MVDream model: the image-prompt tensors are unexpected
    with pytest.raises(ModelLoadError, match=r"unexpected.*image_embed\.latents"):
        load_unet(_copy_with_state(src, tmp_path / "ip", {
            **state, **{k: v for k, v in load_state(FIXTURES / "mvunet/imagedream_tiny/unet").items()
                        if k.startswith("image_embed.")}}))


# --------------------------------------------------------------------------- real shapes


@pytest.mark.slow
@pytest.mark.parametrize("component", ["imagedream-unet", "mvdream-unet"])
def test_real_checkpoint_shapes_load(component, tmp_path):
    manifest = CHECKPOINTS / component
    shapes = manifest_shapes(manifest / "keys.json")
    folder = tmp_path / "unet"
    folder.mkdir()
    shutil.copy(manifest / "config.json", folder / "config.json")
    write_random_checkpoint(shapes, folder / "diffusion_pytorch_model.safetensors", seed=0, dtype=np.float16)
    model = load_unet(folder, dtype="float16")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == shapes
    assert all(p.device.type == "cpu" and p.dtype == torch.float16 for p in model.parameters())
    del model


def test_one_switch_turns_the_speed_ups_off(imagedream, monkeypatch):
    """``fast=False`` and ``OXIGAF_TORCH_FAST=0`` load the plain network (no module swapped, no
    wrapper), and it gives the reference's output, as the sped-up model does."""
    from oxigaf_torch import fast

    model, fast_out = _model(imagedream)
    assert type(model).__name__ == "FastMultiViewUNet"
    monkeypatch.setenv(fast.ENV, "0")
    plain_env = load_unet(imagedream["folder"])
    monkeypatch.delenv(fast.ENV)
    plain = load_unet(imagedream["folder"], fast=False)
    for m in (plain, plain_env):
        assert {type(mod).__module__ for mod in m.modules()}.isdisjoint({"oxigaf_torch.fast.unet",
                                                                          "oxigaf_torch.fast.winograd",
                                                                          "oxigaf_torch.fast.norms"})
        out = _run(m, imagedream)
        assert rel_l2(out, imagedream["expected"]) <= TOL
        assert rel_l2(out, fast_out) <= 1e-5
    assert TorchBackend(device="cpu").versions()["fast"] == "on"


def test_model_files_hold_no_speed_machinery():
    """The network files read as networks: the speed-ups live in oxigaf_torch/fast only."""
    import oxigaf_torch

    root = Path(oxigaf_torch.__file__).parent
    banned = ("buffers", "winograd", "set_grad_enabled", "is_grad_enabled", "channels_last", "records_graph",
              "compiled", "_version", "threading", ".data =", "set_flush_denormal")
    in_place = ("inplace", "add_(", "mul_(", "sub_(")  # common.attention's chunked mode works in place
    for name in ("unet.py", "vae.py", "upsampler.py", "clip.py", "resampler.py", "common.py"):
        text = (root / name).read_text()
        found = [b for b in banned + (in_place if name != "common.py" else ()) if b in text]
        assert not found, f"{name}: {found}"
