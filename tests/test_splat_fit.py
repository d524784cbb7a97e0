"""oxigaf.splat.fit: reading posed frames, the fit, and the ``oxigaf fit`` command's outputs and errors."""

import json

import numpy as np
import pytest
from PIL import Image

from oxigaf import toys
from oxigaf.errors import NumericsError
from oxigaf.splat import Gaussians, load_ply, render
from oxigaf.splat.fit import Fitter, Frames, initial_gaussians, read_frames

pytest.importorskip("torch")
pytest.importorskip("plyfile")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("toys")
    toys.make_dataset(root, 1, views_per_subject=4, size=24, seed=toys.HELD_OUT_SEED)
    return root / f"subject_{toys.HELD_OUT_SEED:07d}"


def test_read_frames_uses_the_exported_poses(dataset):
    frames = read_frames([dataset])
    assert frames.images.shape == (4, 24, 24, 3) and frames.size == 24
    same = Frames.from_cameras(frames.images, [0.0, 90.0, 180.0, 270.0])
    np.testing.assert_allclose(frames.viewmats, same.viewmats, atol=1e-9)
    np.testing.assert_allclose(frames.intrinsics, same.intrinsics)


def test_hull_initialisation_lies_inside_the_silhouettes(dataset):
    frames = read_frames([dataset])
    g = initial_gaussians(frames, 400, seed=1)
    assert len(g) == 400 and np.allclose(g.opacities, 0.1)
    # Every point is on the subject in the front view.
    from oxigaf.splat.fit import _project

    uv, _ = _project(g.means.astype(np.float64), frames)
    pix = np.floor(uv[0]).astype(int)
    assert (frames.images[0][pix[:, 1], pix[:, 0]] < 0.97).any(-1).all()


def test_fit_lowers_the_error_on_both_backends(dataset):
    frames = read_frames([dataset])
    start = initial_gaussians(frames, 150, seed=0)
    before = np.abs(render(start, [0.0, 90.0, 180.0, 270.0], 24, backend="torch") - frames.images).mean()
    for backend in ("torch", "mlx"):
        if backend == "mlx":
            pytest.importorskip("mlx")
        fitter = Fitter(frames, start, iterations=24, backend=backend, densify=True)
        fitter.DENSIFY_EVERY = 8
        fitter.run(24)
        after = np.abs(fitter.render(frames.viewmats) - frames.images).mean()
        assert after < 0.7 * before, backend


def test_nan_loss_names_the_iteration(dataset):
    frames = read_frames([dataset])
    bad = Frames(frames.images.copy(), frames.viewmats, frames.intrinsics, frames.size, frames.names)
    bad.images[:] = np.nan
    fitter = Fitter(bad, initial_gaussians(frames, 50), iterations=5, backend="torch")
    with pytest.raises(NumericsError, match="iteration 1 "):
        fitter.run(5)


def _fit(argv):
    from oxigaf.cli import main

    return main(["fit", *argv])


def test_fit_command_writes_ply_and_orbit(dataset, tmp_path, capsys):
    out = tmp_path / "fit"
    assert _fit([str(dataset), "-o", str(out), "--gaussians", "200", "--iterations", "10", "--quiet"]) == 0
    g = load_ply(out / "point_cloud.ply")
    assert isinstance(g, Gaussians) and len(g) == 200
    with Image.open(out / "orbit.gif") as gif:
        assert gif.n_frames == 24 and gif.size == (24, 24)
    assert sorted(p.name for p in out.iterdir()) == ["orbit.gif", "point_cloud.ply"]


def test_fit_command_errors(dataset, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _fit([str(empty), "-o", str(tmp_path / "o")]) == 2
    assert "has no poses" in capsys.readouterr().err
    other = tmp_path / "other"
    toys.make_dataset(other, 1, views_per_subject=2, size=16, seed=5)
    assert _fit([str(dataset), str(other / "subject_0000005"), "-o", str(tmp_path / "o")]) == 2
    assert "mixed sizes" in capsys.readouterr().err
    assert _fit([str(dataset), "-o", str(tmp_path / "o"), "--refine", "x"]) == 2
    assert "--photo" in capsys.readouterr().err
    meta = json.loads((dataset / "transforms.json").read_text())
    nopose = tmp_path / "nopose"
    nopose.mkdir()
    meta["frames"][0].pop("transform_matrix")
    (nopose / "transforms.json").write_text(json.dumps(meta))
    assert _fit([str(nopose), "-o", str(tmp_path / "o")]) == 2
    assert "transform_matrix" in capsys.readouterr().err


def test_fit_command_keeps_the_last_good_ply_on_nan(dataset, tmp_path, capsys, monkeypatch):
    real_step = Fitter.step

    def failing(self):
        if self.iteration == 12:
            raise NumericsError(f"the fit's loss is not finite at iteration {self.iteration + 1}")
        return real_step(self)

    monkeypatch.setattr(Fitter, "step", failing)
    monkeypatch.setattr("oxigaf.splat.fit.CHECKPOINT_EVERY", 5)
    out = tmp_path / "fit"
    assert _fit([str(dataset), "-o", str(out), "--gaussians", "50", "--iterations", "20", "--quiet"]) == 2
    assert "iteration 13" in capsys.readouterr().err
    assert len(load_ply(out / "point_cloud.ply")) == 50  # the state after 10 steps
