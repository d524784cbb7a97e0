"""oxigaf.splat: the rasterisers against a float64 brute-force renderer (tests/splat_reference.py),
torch against MLX, gradients against finite differences, each rasteriser rule, and .ply files."""

import math

import numpy as np
import pytest
from splat_reference import render_reference

from oxigaf import toys
from oxigaf.cameras import CameraParams
from oxigaf.errors import InputError
from oxigaf.splat import Gaussians, camera_matrices, load_ply, pinhole, render, save_ply

torch = pytest.importorskip("torch")
BACKENDS = ["torch", pytest.param("mlx", marks=pytest.mark.skipif(
    pytest.importorskip("importlib").util.find_spec("mlx") is None, reason="mlx not installed"))]
CAMS = [0.0, 70.0, (200.0, 20.0)]


def random_gaussians(n, seed=0, spread=0.4):
    rng = np.random.default_rng(seed)
    return Gaussians(rng.uniform(-spread, spread, (n, 3)), rng.uniform(0.02, 0.15, (n, 3)), rng.normal(size=(n, 4)),
                     rng.uniform(0.05, 0.99, n), rng.uniform(0, 1, (n, 3)))


def rel_l2(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def one(mean, scale=0.05, opacity=0.9, color=(0.0, 0.0, 0.0)):
    return Gaussians([mean], [[scale] * 3], [[1, 0, 0, 0]], [opacity], [color])


@pytest.fixture(scope="module")
def scene():
    g = random_gaussians(40)
    viewmats, k = camera_matrices(CAMS, 20)
    return g, render_reference(g.as_dict(), viewmats, k, 20)


@pytest.mark.parametrize("backend", BACKENDS)
def test_render_matches_float64_reference(scene, backend):
    g, ref = scene
    out = render(g, CAMS, 20, backend=backend)
    assert out.dtype == np.float32 and out.shape == (3, 20, 20, 3)
    assert rel_l2(out, ref) <= 1e-4


def test_torch_and_mlx_agree():
    pytest.importorskip("mlx")
    g = random_gaussians(1500, seed=1, spread=0.5)
    cams = [(a, 15.0) for a in (0, 130, 250)]
    a, b = render(g, cams, 48, backend="torch"), render(g, cams, 48, backend="mlx")
    assert rel_l2(a, b) <= 1e-4
    assert np.abs(a - 1).mean() > 0.05  # the Gaussians cover a good part of the views


def _torch_render(params, viewmats, k, size):
    from oxigaf_torch.splat import rasterize

    return rasterize(params["means"], params["scales"], params["quats"], params["opacities"], params["colors"],
                     torch.as_tensor(viewmats, dtype=params["means"].dtype), k, size, size)


def test_gradients_match_finite_differences():
    g = random_gaussians(8, seed=2, spread=0.25)
    viewmats, k = camera_matrices([10.0, (100.0, -10.0)], 12)
    weights = torch.tensor(np.random.default_rng(3).normal(size=(2, 12, 12, 3)))
    params = {n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in g.as_dict().items()}

    def loss(p):
        return float((_torch_render(p, viewmats, k, 12) * weights).sum()) if not p["means"].requires_grad else \
            (_torch_render(p, viewmats, k, 12) * weights).sum()

    loss(params).backward()
    checked = 0
    for name, index in [("means", (0, 0)), ("means", (3, 2)), ("scales", (1, 1)), ("quats", (2, 3)),
                        ("opacities", (4,)), ("colors", (5, 0)), ("means", (6, 1)), ("scales", (7, 0))]:
        eps = 1e-6
        values = []
        for sign in (1, -1):
            p = {n: t.detach().clone() for n, t in params.items()}
            p[name][index] += sign * eps
            values.append(loss(p))
        fd = (values[0] - values[1]) / (2 * eps)
        analytic = float(params[name].grad[index])
        assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-7), (name, index)
        checked += abs(fd) > 1e-4
    assert checked >= 6  # the probes are not all on flat ground


def test_mlx_gradients_match_torch():
    mx = pytest.importorskip("mlx.core")
    from oxigaf_mlx.splat import rasterize as mlx_rasterize

    g = random_gaussians(60, seed=4, spread=0.35)
    viewmats, k = camera_matrices([20.0, (160.0, 10.0)], 24)
    weights = np.random.default_rng(5).normal(size=(2, 24, 24, 3)).astype(np.float32)
    tp = {n: torch.tensor(v, requires_grad=True) for n, v in g.as_dict().items()}
    (_torch_render(tp, viewmats, k, 24) * torch.tensor(weights)).sum().backward()

    def f(p):
        out = mlx_rasterize(p["means"], p["scales"], p["quats"], p["opacities"], p["colors"],
                            mx.array(viewmats.astype(np.float32)), k, 24, 24)
        return mx.sum(out * mx.array(weights))

    grads = mx.grad(f)({n: mx.array(v) for n, v in g.as_dict().items()})
    for name in tp:
        assert rel_l2(np.array(grads[name]), tp[name].grad.numpy().astype(np.float64)) <= 1e-4, name


# --------------------------------------------------------------------------- each rule


@pytest.mark.parametrize("backend", BACKENDS)
def test_gaussian_behind_camera_or_inside_near_plane_vanishes(backend):
    cam = CameraParams(0.0)  # at (2, 0, 0) looking at the origin (the world's +X is the face)
    for x in (3.0, 2.005):  # behind the camera; 0.005 in front of it (depth < 0.01)
        out = render(one([x, 0.0, 0.0], scale=0.3), [cam], 15, backend=backend)
        assert np.array_equal(out, np.ones_like(out))
    out = render(one([1.95, 0.0, 0.0], scale=0.3), [cam], 15, backend=backend)  # depth 0.05: drawn
    assert out.min() < 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_pixel_centres_and_dilation(backend):
    # A point-like Gaussian on the optical axis of an odd-sized view sits on the middle pixel's centre
    # (cx = W/2 = 7 + 0.5); its 2D covariance is (fx·s/z)²·I + 0.3·I.
    size, s, o = 15, 1e-3, 0.5
    out = render(one([0.0, 0.0, 0.0], scale=s, opacity=o), [0.0], size, backend=backend)[0, :, :, 0]
    assert out[7, 7] == pytest.approx(1 - o, abs=1e-6)
    var = (pinhole(size)[0] * s / 2.0) ** 2 + 0.3
    expected = 1 - o * math.exp(-0.5 / var)
    for r, c in ((6, 7), (8, 7), (7, 6), (7, 8)):
        assert out[r, c] == pytest.approx(expected, abs=1e-6)
    assert o * math.exp(-0.5 * 4 / var) < 1 / 255 and out[7, 5] == 1.0  # two pixels away: alpha below 1/255


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_cap_skip_and_termination(backend):
    size = 15
    # A large opaque Gaussian: alpha capped at 0.99.
    out = render(one([0.0, 0.0, 0.0], scale=0.5, opacity=0.999, color=(0.2, 0.4, 0.6)), [0.0], size, backend=backend)
    assert out[0, 7, 7] == pytest.approx(0.99 * np.array([0.2, 0.4, 0.6]) + 0.01, abs=1e-6)
    # Opacity below 1/255: every fragment skipped.
    out = render(one([0.0, 0.0, 0.0], scale=0.5, opacity=0.0039), [0.0], size, backend=backend)
    assert np.array_equal(out, np.ones_like(out))
    # Three layers (nearest first): T = 0.01, then 2e-4, then the third would take T below 1e-4: the pixel ends
    # without it, the background still adds T = 2e-4.
    g = Gaussians([[0.2, 0, 0], [0.0, 0, 0], [-0.2, 0, 0]], [[0.5] * 3] * 3, [[1, 0, 0, 0]] * 3, [0.999, 0.98, 0.999],
                  [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    out = render(g, [0.0], size, backend=backend)[0, 7, 7]
    expected = np.array([0.99, 0.98 * 0.01, 0.0]) + 0.01 * 0.02
    np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_front_to_back_by_depth_not_by_index(backend):
    near, far = [[0.3, 0, 0], (1.0, 0.0, 0.0)], [[-0.3, 0, 0], (0.0, 0.0, 1.0)]
    for order in ((near, far), (far, near)):
        g = Gaussians([m for m, _ in order], [[0.2] * 3] * 2, [[1, 0, 0, 0]] * 2, [0.9, 0.9], [c for _, c in order])
        out = render(g, [0.0], 15, backend=backend)[0, 7, 7]
        np.testing.assert_allclose(out, [0.9 + 0.1 * 0.1, 0.1 * 0.1, 0.1 * 0.9 + 0.1 * 0.1], atol=1e-6)
    # From behind (azimuth 180), the other one is in front.
    out = render(g, [180.0], 15, backend=backend)[0, 7, 7]
    assert out[2] > out[0]


def test_world_convention_matches_exported_poses():
    cam = CameraParams(30.0, 10.0)
    point = [0.1, 0.25, 0.15]
    out = render(one(point, scale=0.005, opacity=0.9), [cam], 64, backend="torch")[0, :, :, 0]
    u, v = toys.project(point, cam, 64)
    r, c = np.unravel_index(np.argmin(out), out.shape)
    assert (c, r) == (int(u), int(v))


def test_gaussians_validate():
    with pytest.raises(InputError, match="opacities"):
        Gaussians([[0, 0, 0]], [[1, 1, 1]], [[1, 0, 0, 0]], [1.5], [[0, 0, 0]])
    with pytest.raises(InputError, match="rows"):
        Gaussians([[0, 0, 0]], [[1, 1, 1]] * 2, [[1, 0, 0, 0]], [0.5], [[0, 0, 0]])
    with pytest.raises(InputError, match="scales"):
        Gaussians([[0, 0, 0]], [[1, 0, 1]], [[1, 0, 0, 0]], [0.5], [[0, 0, 0]])
    with pytest.raises(InputError, match="shape"):
        Gaussians([[0, 0]], [[1, 1, 1]], [[1, 0, 0, 0]], [0.5], [[0, 0, 0]])
    g = random_gaussians(5)
    back = Gaussians.from_raw(g.raw())
    for name in ("means", "scales", "opacities", "colors"):
        np.testing.assert_allclose(getattr(back, name), getattr(g, name), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- .ply


def test_ply_round_trip_and_layout(tmp_path):
    plyfile = pytest.importorskip("plyfile")
    g = random_gaussians(300, seed=6)
    path = save_ply(g, tmp_path / "out" / "point_cloud.ply")
    assert sorted(p.name for p in path.parent.iterdir()) == ["point_cloud.ply"]  # no temporary left
    v = plyfile.PlyData.read(str(path))["vertex"]
    assert [p.name for p in v.properties] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
                                             "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    np.testing.assert_allclose(v["f_dc_1"], (g.colors[:, 1] - 0.5) / 0.28209479177387814, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(v["opacity"], np.log(g.opacities / (1 - g.opacities)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v["scale_2"], np.log(g.scales[:, 2]), rtol=1e-6, atol=1e-6)
    q = g.quats / np.linalg.norm(g.quats, axis=1, keepdims=True)
    np.testing.assert_allclose(np.stack([v[f"rot_{i}"] for i in range(4)], 1), q, atol=1e-6)  # w x y z
    np.testing.assert_array_equal(v["nx"], 0)
    back = load_ply(path)
    a, b = render(g, CAMS, 32, backend="torch"), render(back, CAMS, 32, backend="torch")
    assert np.abs(a - b).max() <= 1e-5


def test_ply_errors(tmp_path):
    plyfile = pytest.importorskip("plyfile")
    with pytest.raises(InputError, match="no .ply"):
        load_ply(tmp_path / "missing.ply")
    bad = tmp_path / "bad.ply"
    verts = np.zeros(2, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    plyfile.PlyData([plyfile.PlyElement.describe(verts, "vertex")]).write(str(bad))
    with pytest.raises(InputError, match="lacks the 3DGS properties"):
        load_ply(bad)
    (tmp_path / "junk.ply").write_text("not a ply")
    with pytest.raises(InputError, match="not a readable"):
        load_ply(tmp_path / "junk.ply")
    with pytest.raises(InputError, match="folder"):
        save_ply(random_gaussians(2), tmp_path)
