"""The toy-head world: determinism, ranges, normals, poses that match the pixels, and asymmetry."""

import json

import numpy as np
import pytest

from oxigaf import toys
from oxigaf.cameras import CameraParams, default_cameras, intrinsics, transforms_json
from oxigaf.errors import InputError

SIZE = 32


@pytest.fixture(scope="module")
def orbit():
    cams = default_cameras(4)
    return cams, toys.render(3, cams, SIZE)


def test_deterministic_and_seed_dependent(orbit):
    cams, (images, normals) = orbit
    again = toys.render(3, cams, SIZE)
    assert np.array_equal(images, again[0]) and np.array_equal(normals, again[1])
    other = toys.render(4, cams, SIZE)[0]
    assert np.abs(other - images).mean() > 0.02


def test_shapes_dtypes_ranges(orbit):
    _, (images, normals) = orbit
    for arr in (images, normals):
        assert arr.shape == (4, SIZE, SIZE, 3) and arr.dtype == np.float32
        assert arr.min() >= 0.0 and arr.max() <= 1.0
    # white background in the corners
    assert np.all(images[:, 0, 0] == 1.0) and np.all(normals[:, 0, 0] == 1.0)


def test_normals_face_the_camera():
    # At the silhouette's centre the surface faces the camera: n = (0, 0, 1) in OpenGL camera axes.
    _, normals = toys.render(11, [CameraParams(180.0)], 64)
    n = normals[0, 32, 32] * 2 - 1
    assert n[2] > 0.9 and abs(n[0]) < 0.3 and abs(n[1]) < 0.3
    # Unit length wherever the surface is hit (away from anti-aliased edges).
    inner = normals[0, 24:40, 24:40].reshape(-1, 3) * 2 - 1
    assert np.allclose(np.linalg.norm(inner, axis=1), 1.0, atol=0.05)


def test_pose_matches_pixels():
    """The nose tip, projected with transforms.json's pose, lands on the nose's colour."""
    subj = toys.subject(5)
    nose = subj.part("nose")
    tip = subj.to_world(np.asarray(nose.center) + np.array([nose.radii[0], 0.0, 0.0]))
    size = 64
    for cam in (CameraParams(25.0, 10.0), CameraParams(-30.0, -5.0)):
        meta = transforms_json([cam], size)
        pose = np.asarray(meta["frames"][0]["transform_matrix"])
        p = np.linalg.inv(pose) @ np.append(tip, 1.0)
        k = intrinsics(size)
        u, v = k["cx"] + k["fl_x"] * p[0] / -p[2], k["cy"] - k["fl_y"] * p[1] / -p[2]
        assert (u, v) == pytest.approx(toys.project(tip, cam, size))
        image = toys.render(5, [cam], size)[0][0]
        pixel = image[int(v), int(u)]
        # Shaded nose colour: a multiple in [ambient, 1] of the part's colour.
        ratio = pixel / np.asarray(nose.color)
        assert np.ptp(ratio) < 0.05 and toys.AMBIENT - 0.05 < ratio.mean() <= 1.0 + 1e-6


def test_front_differs_from_back_and_left_from_mirrored_right():
    images, _ = toys.render(8, [0, 180, 90, 270], 48)
    assert np.abs(images[0] - images[1]).mean() > 0.05  # face vs hair
    seeds_asym = 0
    for seed in range(8):
        im = toys.render(seed, [90, 270], 48)[0]
        if np.abs(im[0] - im[1][:, ::-1]).mean() > 0.01:
            seeds_asym += 1
    assert seeds_asym >= 6  # parting and earring sides: left is not the mirrored right


def test_bad_input():
    with pytest.raises(InputError, match="seed"):
        toys.render(-1, [0], 16)
    with pytest.raises(InputError, match="size"):
        toys.render(0, [0], 0)


def test_make_dataset_format(tmp_path):
    from PIL import Image

    root = toys.make_dataset(tmp_path / "toys", subjects=2, views_per_subject=4, size=16, seed=42)
    subjects = sorted(p.name for p in root.iterdir())
    assert subjects == ["subject_0000042", "subject_0000043"]
    meta = json.loads((root / subjects[1] / "transforms.json").read_text())
    expect = transforms_json(default_cameras(4), 16)
    assert [f["transform_matrix"] for f in meta["frames"]] == [f["transform_matrix"] for f in expect["frames"]]
    images, normals = toys.render(43, default_cameras(4), 16)
    for i, frame in enumerate(meta["frames"]):
        got = np.asarray(Image.open(root / subjects[1] / frame["file_path"]), np.float32) / 255
        assert np.abs(got - images[i]).max() <= 0.5 / 255 + 1e-6
        nm = np.asarray(Image.open(root / subjects[1] / frame["normal_file_path"]), np.float32) / 255
        assert np.abs(nm - normals[i]).max() <= 0.5 / 255 + 1e-6
    with pytest.raises(InputError, match="subjects"):
        toys.make_dataset(tmp_path / "x", subjects=0, views_per_subject=4, size=16, seed=0)


def test_model_path():
    for normals, channels in ((False, 4), (True, 8)):
        path = toys.model_path(normals=normals)
        cfg = json.loads((path / "unet" / "config.json").read_text())
        assert cfg["in_channels"] == channels and (path / "model_index.json").is_file()


# Held-out heads for the shipped model's check (the demo uses 1,000,000; the README's benchmark 2,000,000+).
QUALITY_SEEDS = (1_500_000, 1_500_001, 1_500_002)


@pytest.fixture(scope="module")
def shipped_views():
    """The shipped toy model's views of held-out heads at the library's default settings, per backend."""
    from PIL import Image

    from oxigaf import DiffusionConfig, Pipeline
    from oxigaf.images import to_uint8

    from conftest import BACKENDS

    cams = default_cameras(4)
    truth = {s: toys.render(s, cams, 64)[0] for s in QUALITY_SEEDS}
    views = {}
    for b in BACKENDS:
        pipe = Pipeline.from_pretrained(toys.model_path(), backend=b, config=DiffusionConfig())
        views[b] = {s: pipe.generate(Image.fromarray(to_uint8(truth[s][0])), cameras=cams, progress=False).images
                    for s in QUALITY_SEEDS}
    return truth, views


def test_shipped_model_beats_copying_the_input(shipped_views):
    # Novel views (azimuths 90, 180, 270) against the input copied to every view (the other
    # baseline, the leave-one-out mean, needs more heads than three), by the 1 dB bar.
    # Measured on these heads: 20.21 dB against 15.05 dB (+5.17) on both backends; the previous
    # epsilon-prediction model was 0.6 dB below copying, random weights give 7.6 dB.
    truth, views = shipped_views
    copy = np.mean([toys.psnr(truth[s][0], truth[s][i]) for s in QUALITY_SEEDS for i in (1, 2, 3)])
    for b, per_subject in views.items():
        model = np.mean([toys.psnr(per_subject[s][i], truth[s][i]) for s in QUALITY_SEEDS for i in (1, 2, 3)])
        assert model >= copy + 1.0, (b, model, copy)


def test_shipped_model_same_views_on_both_backends(shipped_views):
    _, views = shipped_views
    if len(views) < 2:
        pytest.skip("needs both backends")
    a, b = views.values()
    assert max(np.abs(a[s] - b[s]).max() for s in QUALITY_SEEDS) <= 0.02  # measured 1.5e-5
