"""Cameras against the reference get_camera tables, and the public convention."""

import json
import math

import numpy as np
import pytest
from safetensors.numpy import load_file

from oxigaf.cameras import (
    CameraParams,
    as_cameras,
    camera_vector,
    camera_vectors,
    cameras_json,
    default_cameras,
    intrinsics,
    transforms_json,
)
from oxigaf.errors import InputError

from conftest import FIXTURES


def _reference_tables():
    for key, table in load_file(FIXTURES / "cameras.safetensors").items():
        n, e, a, s = key.split("_")
        yield key, int(n[1:]), float(e[1:]), float(a[1:]), float(s[1:]), table


@pytest.mark.parametrize("key,n,elev,start,span,table", list(_reference_tables()), ids=lambda v: str(v)[:20])
def test_camera_vectors_equal_reference_get_camera(key, n, elev, start, span, table):
    # Reference raw azimuths are start + i·span/n; public azimuth = raw − 90.
    cams = [CameraParams(start + i * span / n - 90.0, elev) for i in range(n)]
    np.testing.assert_allclose(camera_vectors(cams), table, atol=1e-6)


def test_default_orbit_is_public_0_90_180_270():
    cams = default_cameras(4, elevation=5.0)
    assert [c.azimuth for c in cams] == [0.0, 90.0, 180.0, 270.0]
    assert all(c.elevation == 5.0 for c in cams)


def test_public_convention_front_right_above():
    # azimuth 0 = the input view: the camera sits in front of the subject. In the model's Blender
    # world the front is raw azimuth 90, i.e. position (sin 90, ·, cos 90) -> +x in GL, and the
    # blender swap keeps x. A positive azimuth orbits to the right seen from the front.
    front = CameraParams(0.0, 0.0, 1.0).opengl_c2w()[:3, 3]
    right = CameraParams(30.0, 0.0, 1.0).opengl_c2w()[:3, 3]
    above = CameraParams(0.0, 20.0, 1.0).opengl_c2w()[:3, 3]
    np.testing.assert_allclose(front, [1.0, 0.0, 0.0], atol=1e-12)
    assert above[2] > 0  # Z up
    # Seen from the front camera, "right" is the camera's right axis.
    right_axis = CameraParams(0.0, 0.0, 1.0).opengl_c2w()[:3, 0]
    assert np.dot(right - front, right_axis) > 0


def test_distance_scales_pose_but_not_model_vector():
    near, far = CameraParams(40.0, 10.0, 1.0), CameraParams(40.0, 10.0, 3.5)
    np.testing.assert_allclose(far.opengl_c2w()[:3, 3], 3.5 * near.opengl_c2w()[:3, 3])
    np.testing.assert_array_equal(camera_vector(near), camera_vector(far))


def test_from_radians_matches_degrees():
    a = CameraParams.from_radians(math.pi / 4, math.pi / 6, 2.0)
    assert a.azimuth == pytest.approx(45.0) and a.elevation == pytest.approx(30.0)


def test_opencv_is_opengl_with_flipped_y_and_z():
    cam = CameraParams(123.0, -17.0, 2.5)
    gl, cv = cam.opengl_c2w(), cam.opencv_c2w()
    np.testing.assert_allclose(cv[:, 0], gl[:, 0])
    np.testing.assert_allclose(cv[:, 1:3], -gl[:, 1:3])
    np.testing.assert_allclose(cv[:3, 3], gl[:3, 3])
    # OpenCV looks down +z: toward the subject at the origin.
    assert np.dot(cv[:3, 2], -cv[:3, 3]) > 0


@pytest.mark.parametrize("bad", [dict(azimuth=float("nan")), dict(azimuth=0, elevation=float("inf")),
                                 dict(azimuth=0, elevation=90), dict(azimuth=0, distance=0),
                                 dict(azimuth="front")])
def test_bad_cameras_are_input_errors(bad):
    with pytest.raises(InputError) as err:
        CameraParams(**bad)
    assert any(name in str(err.value) for name in ("azimuth", "elevation", "distance"))


def test_as_cameras_accepts_shorthands():
    cams = as_cameras([0, (90, 10), CameraParams(180), {"azimuth": 270, "elevation": 5}], elevation=3)
    assert [(c.azimuth, c.elevation) for c in cams] == [(0, 3), (90, 10), (180, 0), (270, 5)]
    with pytest.raises(InputError):
        as_cameras([])
    with pytest.raises(InputError):
        as_cameras([object()])


def test_exports_are_json_and_consistent():
    cams = default_cameras(4, 5.0)
    cj = json.loads(json.dumps(cameras_json(cams, 512)))
    tj = json.loads(json.dumps(transforms_json(cams, 512)))
    k = intrinsics(512)
    assert cj["intrinsics"]["fl_x"] == pytest.approx(k["fl_x"])
    assert k["fl_x"] == pytest.approx(256 / math.tan(math.radians(20)))
    for view, frame, cam in zip(cj["views"], tj["frames"], cams, strict=True):
        np.testing.assert_allclose(frame["transform_matrix"], cam.opengl_c2w())
        np.testing.assert_allclose(view["opencv_c2w"], cam.opencv_c2w())
        assert frame["file_path"] == view["file"]
