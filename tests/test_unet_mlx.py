"""The MLX multi-view UNet against the reference fixtures, the torch backend and real manifests.

MLX on a Linux CPU is slow (its wheel's reference BLAS, for which tests/conftest.py lends it
torch's MKL, and a scalar exp), so every call here is on the tiny fixtures
(16×16 latents), models are loaded once per module, and the float16/bfloat16 and "must matter"
checks use the first batch item only (its expected output does not depend on the second item:
attention and GroupNorm never mix batch items).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from safetensors.numpy import load_file, save_file  # noqa: E402

from oxigaf.cameras import raw_camera_matrix  # noqa: E402
from oxigaf.checkpoints import manifest_shapes, write_random_checkpoint  # noqa: E402
from oxigaf.errors import InputError, ModelLoadError  # noqa: E402
from oxigaf_mlx.blas import TORCH_MKL  # noqa: E402
from oxigaf_mlx.unet import load_unet  # noqa: E402

from conftest import CHECKPOINTS, FIXTURES, rel_l2  # noqa: E402

TOL = 1e-4
# Measured against the float32 reference on the imagedream fixture's first batch item:
# float16 7.8e-4, bfloat16 6.8e-3 relative L2 (8-bit mantissa). Tolerances leave ~3× room.
DTYPE_TOL = {"float16": 3e-3, "bfloat16": 2e-2}
# Several query blocks at every attention level: 1280 tokens at 16×16 (5 views), 320 at 8×8.
CHUNK = 192


def test_mlx_runs_on_the_blas_the_conftest_lends_it():
    # Without it the suite takes more than twice as long (docs/testing.md); a torch that stopped
    # exporting MKL's sgemm_ would otherwise only show as a slow run.
    import ctypes

    import conftest

    if sys.platform != "linux" or importlib.util.find_spec("torch") is None:
        pytest.skip("the lending is for MLX's Linux wheel, from torch")
    if os.environ.get("OXIGAF_TEST_MLX_BLAS") == "reference":
        pytest.skip("OXIGAF_TEST_MLX_BLAS=reference")
    assert conftest.MLX_BLAS == TORCH_MKL, conftest.MLX_BLAS
    import torch

    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"), mode=os.RTLD_NOLOAD)
    found = ctypes.CDLL(None).sgemm_  # the symbol the global scope gives: what MLX's BLAS binds to
    assert ctypes.cast(found, ctypes.c_void_p).value == ctypes.cast(lib.sgemm_, ctypes.c_void_p).value



def test_lending_refuses_once_mlx_is_loaded():
    # MLX's BLAS binds sgemm_ when it loads, so lending after that would change nothing: it says so
    code = "import mlx.core; from oxigaf_mlx.blas import lend_torch_blas; print(lend_torch_blas())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    expected = "reference (mlx was loaded first)" if sys.platform == "linux" else "the platform's (not Linux)"
    assert out.strip() == expected

class Case:
    def __init__(self, name: str):
        self.folder = FIXTURES / "mvunet" / name / "unet"
        io = load_file(str(FIXTURES / "mvunet" / name / "io.safetensors"))
        self.frames = json.loads((FIXTURES / "mvunet" / name / "io.json").read_text())["num_frames"]
        self.io = io
        self.expected = io["expected"]
        self.models = {}

    def model(self, dtype: str = "float32"):
        if dtype not in self.models:
            self.models[dtype] = load_unet(self.folder, dtype=dtype, chunk_size=CHUNK)
        return self.models[dtype]

    def inputs(self, batch: int | None = None) -> dict:
        """The call's arguments as mx arrays, optionally only the first ``batch`` items."""
        io, f = self.io, self.frames
        n = None if batch is None else batch * f
        kw = dict(x=io["x"][:n], timesteps=io["timesteps"][:n], context=io["context"][:n], camera=io["camera"][:n])
        if "ip_per_batch" in io:
            kw["ip"] = np.repeat(io["ip_per_batch"], f, axis=0)[:n]
            kw["ip_img"] = io["ip_img"][:batch]
        return {k: mx.array(np.ascontiguousarray(v)) for k, v in kw.items()}

    def run(self, dtype="float32", batch=None, **overrides):
        """(output as float32 numpy, the arrays passed in); ``overrides`` replace inputs or add options."""
        kw = {**self.inputs(batch), **overrides}
        out = self.model(dtype)(num_frames=self.frames, **kw)
        return np.array(out.astype(mx.float32)), {k: v for k, v in kw.items() if isinstance(v, mx.array)}


@pytest.fixture(scope="module")
def cases():
    return {name: Case(name) for name in ("imagedream_tiny", "mvdream_tiny")}


@pytest.mark.parametrize("mode", ["sdpa", "chunked", "naive"])
@pytest.mark.parametrize("name", ["imagedream_tiny", "mvdream_tiny"])
def test_fixture_parity(cases, name, mode):
    case = cases[name]
    # The whole batch (2 items for ImageDream) once; the other modes on the first item, to save time.
    batch = None if mode == "sdpa" else 1
    inputs = {k: np.array(v) for k, v in case.inputs(batch).items()}
    out, kw = case.run(batch=batch, attention=mode)
    expected = case.expected[: out.shape[0]]
    assert out.shape == expected.shape
    err = rel_l2(out, expected)
    assert err <= TOL, f"{name} {mode}: rel L2 {err:.3g}"
    # The reference writes the reference latent into its input; we must not.
    for k, v in kw.items():
        np.testing.assert_array_equal(np.array(v), inputs[k], err_msg=f"{k} was modified")


@pytest.mark.parametrize(
    "name, change",
    [("imagedream_tiny", {"ip_weight": 0.0}), ("mvdream_tiny", {"camera": "zeros"})],
    ids=["ip_weight0", "camera0"],
)
def test_conditioning_matters(cases, name, change):
    case = cases[name]
    if change.get("camera") == "zeros":
        change = {"camera": mx.zeros_like(case.inputs(1)["camera"])}
    out, _ = case.run(batch=1, **change)
    n = out.shape[0]
    assert rel_l2(out, case.expected[:n]) > 10 * TOL


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision(cases, dtype):
    case = cases["imagedream_tiny"]
    model = case.model(dtype)
    assert model.dtype == getattr(mx, dtype)
    out = model(num_frames=case.frames, **case.inputs(1))
    assert out.dtype == mx.float32  # the dtype of x, whatever the compute dtype
    out = np.array(out)
    assert np.isfinite(out).all()
    err = rel_l2(out, case.expected[: case.frames])
    assert err <= DTYPE_TOL[dtype], f"{dtype}: rel L2 {err:.3g} against the float32 reference"


def test_extra_input_channels(tmp_path, cases):
    """in_channels > 4: ip_img replaces only the first 4 channels of the reference frame."""
    src = FIXTURES / "mvunet" / "imagedream_tiny" / "unet"
    config = json.loads((src / "config.json").read_text())
    config["in_channels"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = load_file(str(src / "diffusion_pytorch_model.safetensors"))
    rng = np.random.default_rng(0)
    w = state["input_blocks.0.0.weight"]
    state["input_blocks.0.0.weight"] = (rng.standard_normal((w.shape[0], 8, 3, 3)) / np.sqrt(72)).astype(np.float16)
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    model = load_unet(tmp_path, chunk_size=CHUNK)

    f, h = 2, 16
    x = rng.standard_normal((f, 8, h, h)).astype(np.float32)
    ref = rng.standard_normal((1, 4, h, h)).astype(np.float32)
    common = dict(timesteps=mx.array([500, 500]), context=mx.array(rng.standard_normal((f, 77, 64), np.float32)),
                  camera=mx.array(rng.standard_normal((f, 16), np.float32)), num_frames=f,
                  ip=mx.array(rng.standard_normal((f, 9, 1280), np.float32)))
    out = np.array(model(mx.array(x), ip_img=mx.array(ref), **common))
    placed = x.copy()
    placed[-1, :4] = ref[0]
    expected = np.array(model(mx.array(placed), **common))
    assert rel_l2(out, expected) <= 1e-6
    # The extra channels of the reference frame do matter (they were kept, not zeroed).
    zeroed = placed.copy()
    zeroed[-1, 4:] = 0
    assert rel_l2(np.array(model(mx.array(zeroed), **common)), expected) > 10 * TOL


def test_input_errors(cases):
    case = cases["imagedream_tiny"]
    model = case.model()
    kw = case.inputs(1)
    with pytest.raises(InputError, match="num_frames"):
        model(**kw, num_frames=3)
    with pytest.raises(InputError, match="needs ip"):
        model(**{**kw, "ip": None}, num_frames=case.frames)
    with pytest.raises(InputError, match="no image-prompt"):
        mv = cases["mvdream_tiny"]
        mv.model()(**mv.inputs(1), num_frames=mv.frames, ip=kw["ip"][:4])


def test_strict_loading_names_missing_tensor(tmp_path):
    src = FIXTURES / "mvunet" / "mvdream_tiny" / "unet"
    shutil.copy(src / "config.json", tmp_path / "config.json")
    state = load_file(str(src / "diffusion_pytorch_model.safetensors"))
    dropped = "middle_block.1.transformer_blocks.0.attn1.to_k.weight"
    del state[dropped]
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ModelLoadError, match="missing") as info:
        load_unet(tmp_path)
    assert dropped in str(info.value)


def test_strict_loading_names_unexpected_tensor(tmp_path):
    src = FIXTURES / "mvunet" / "mvdream_tiny" / "unet"
    shutil.copy(src / "config.json", tmp_path / "config.json")
    state = load_file(str(src / "diffusion_pytorch_model.safetensors"))
    state["out.1.weight"] = np.zeros(4, np.float16)
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ModelLoadError, match="out.1.weight"):
        load_unet(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("component", ["imagedream-unet", "mvdream-unet"])
def test_real_manifest_loads(tmp_path, component):
    shapes = manifest_shapes(CHECKPOINTS / component / "keys.json")
    shutil.copy(CHECKPOINTS / component / "config.json", tmp_path / "config.json")
    write_random_checkpoint(shapes, tmp_path / "diffusion_pytorch_model.safetensors", dtype=np.float16)
    model = load_unet(tmp_path, dtype="float16")
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(model.parameters()))
    assert set(params) == set(shapes)
    conv = params["input_blocks.0.0.weight"]
    o, i, kh, kw = shapes["input_blocks.0.0.weight"]
    assert tuple(conv.shape) == (o, kh, kw, i) and conv.dtype == mx.float16


def _torch_unet_available() -> bool:
    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("oxigaf_torch.unet") is not None


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
@pytest.mark.skipif(not _torch_unet_available(), reason="the torch backend has no UNet yet (oxigaf_torch.unet)")
@pytest.mark.parametrize("name", ["imagedream_tiny", "mvdream_tiny"])
def test_matches_torch_backend(cases, name):
    import torch

    import oxigaf

    case = cases[name]
    theirs = oxigaf.get_backend("torch").load_unet(case.folder)
    rng = np.random.default_rng(7)
    # Two batch items of two views: checks the per-item grouping (cameras, ip, reference slot) too.
    b, f, h = 2, 2, 16
    n = b * f
    # Real camera matrices, as the pipeline passes them. Inputs whose GroupNorm groups have a large
    # mean against their spread once exposed a float32 variance cancellation in torch's CPU
    # GroupNorm (4e-4 from a float64 run while mlx stayed within 3e-6): both norms centre first now.
    cameras = np.stack([raw_camera_matrix(a, e).reshape(16) for a, e in rng.uniform((0, -10), (360, 30), (n, 2))])
    if name == "imagedream_tiny":
        cameras[f - 1 :: f] = 0  # the reference slot
    args = dict(
        x=rng.standard_normal((n, 4, h, h), np.float32),
        timesteps=np.repeat(rng.integers(0, 1000, b), f),
        context=rng.standard_normal((n, 77, 64), np.float32),
        camera=cameras.astype(np.float32),
    )
    if name == "imagedream_tiny":
        args["ip"] = np.repeat(rng.standard_normal((b, 33, 1280), np.float32), f, axis=0)
        args["ip_img"] = rng.standard_normal((b, 4, h, h), np.float32)
    ours = np.array(case.model()(num_frames=f, **{k: mx.array(v) for k, v in args.items()}))
    with torch.no_grad():
        ref = theirs(num_frames=f, **{k: torch.from_numpy(v) for k, v in args.items()}).numpy()
    err = rel_l2(ours, ref)
    assert err <= TOL, f"mlx vs torch: rel L2 {err:.3g}"
