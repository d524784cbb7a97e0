"""Cameras: the public convention, the model's conditioning vectors, and pose export.

Public convention (degrees): azimuth 0 looks at the subject from the input photo's viewpoint;
positive azimuth orbits the camera to the right as seen from the front (+90 shows the
subject's left profile, 180 the back); elevation > 0 puts the camera above the subject.

The models were trained with MVDream's raw convention, where raw azimuth = public + 90: an
OpenGL look-at camera on the unit sphere at (cos e·sin a, sin e, cos e·cos a) with columns
[right, up, -forward], moved into Blender's Z-up world by a fixed axis swap and flattened
row-major to 16 numbers. Distance never reaches the model (translations are normalised); it
and the field of view matter only for exported poses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError

# The raw model azimuth of the input photo's viewpoint.
RAW_AZIMUTH_OFFSET = 90.0
DEFAULT_DISTANCE = 2.0
# Exported intrinsics assume this vertical = horizontal field of view (square views). The
# models do not fix one; 40 degrees matches a ~50 mm lens on a 36 mm sensor, close to how the
# training renders look, and is what a splatting fit should start from unless you know better.
DEFAULT_FOV_DEG = 40.0

# OpenGL world (Y up) -> Blender world (Z up), left-multiplied onto camera-to-world matrices.
_GL_TO_BLENDER = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
# OpenGL camera axes (x right, y up, looking down -z) -> OpenCV (x right, y down, looking down +z).
_GL_TO_CV_AXES = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass(frozen=True)
class CameraParams:
    """A camera on an orbit around the subject, in degrees (see the module docstring)."""

    azimuth: float
    elevation: float = 0.0
    distance: float = DEFAULT_DISTANCE

    def __post_init__(self):
        for name in ("azimuth", "elevation", "distance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.floating, np.integer)) or isinstance(value, bool):
                raise InputError(f"camera {name} must be a number; got {value!r}")
            if not math.isfinite(float(value)):
                raise InputError(f"camera {name} must be finite; got {value!r}")
        if not -90.0 < float(self.elevation) < 90.0:
            # At ±90 the look-at basis is undefined (forward is parallel to up).
            raise InputError(f"camera elevation must lie strictly between -90 and 90 degrees; got {self.elevation!r}")
        if float(self.distance) <= 0:
            raise InputError(f"camera distance must be > 0; got {self.distance!r}")

    @classmethod
    def from_radians(cls, azimuth: float, elevation: float = 0.0, distance: float = DEFAULT_DISTANCE) -> CameraParams:
        """The seed crate's convention: the same angles, in radians."""
        return cls(math.degrees(azimuth), math.degrees(elevation), distance)

    # -- matrices -------------------------------------------------------------------------

    def opengl_c2w(self) -> np.ndarray:
        """Camera-to-world (4×4, float64) in the model's Blender Z-up world, OpenGL camera axes,
        at this camera's distance from the origin."""
        m = raw_camera_matrix(float(self.azimuth) + RAW_AZIMUTH_OFFSET, float(self.elevation))
        m[:3, 3] *= float(self.distance)
        return m

    def opencv_c2w(self) -> np.ndarray:
        """Camera-to-world with OpenCV camera axes (x right, y down, z forward)."""
        return self.opengl_c2w() @ _GL_TO_CV_AXES

    def vector(self) -> np.ndarray:
        """The model's 16-float conditioning vector for this camera."""
        return camera_vector(self)


def raw_camera_matrix(raw_azimuth: float, elevation: float) -> np.ndarray:
    """MVDream's camera-to-world matrix for raw angles in degrees (Blender world, radius 1)."""
    a, e = math.radians(raw_azimuth), math.radians(elevation)
    position = np.array([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)])
    forward = -position / np.linalg.norm(position)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    up /= np.linalg.norm(up)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([right, up, -forward], axis=1)
    c2w[:3, 3] = position
    return _GL_TO_BLENDER @ c2w


def camera_vector(params: CameraParams) -> np.ndarray:
    """float32 (16,): the camera-to-world matrix with unit translation, flattened row-major."""
    m = params.opengl_c2w()
    m[:3, 3] /= np.linalg.norm(m[:3, 3])
    return m.reshape(16).astype(np.float32)


def camera_vectors(cameras: list[CameraParams]) -> np.ndarray:
    """float32 (N, 16) for a list of cameras."""
    return np.stack([camera_vector(c) for c in cameras]).astype(np.float32)


def default_cameras(num_views: int = 4, elevation: float = 0.0, distance: float = DEFAULT_DISTANCE,
                    azimuth_start: float = 0.0) -> list[CameraParams]:
    """``num_views`` cameras evenly spaced in azimuth from ``azimuth_start`` (0, 90, 180, 270 for 4)."""
    if not isinstance(num_views, int) or num_views < 1:
        raise InputError(f"num_views must be an integer >= 1; got {num_views!r}")
    step = 360.0 / num_views
    return [CameraParams(azimuth_start + i * step, elevation, distance) for i in range(num_views)]


def as_cameras(cameras, num_views: int | None = None, elevation: float = 0.0) -> list[CameraParams]:
    """Accept ``None`` (default orbit), CameraParams, (az, el[, dist]) tuples or bare azimuths."""
    if cameras is None:
        return default_cameras(num_views or 4, elevation)
    if isinstance(cameras, (str, bytes, dict, CameraParams)) or not hasattr(cameras, "__iter__"):
        raise InputError(f"cameras must be a list of cameras or azimuths; got {cameras!r}")
    out = []
    for i, cam in enumerate(cameras):
        if isinstance(cam, CameraParams):
            out.append(cam)
        elif isinstance(cam, (int, float, np.floating, np.integer)) and not isinstance(cam, bool):
            out.append(CameraParams(float(cam), elevation))
        elif isinstance(cam, (tuple, list)) and 1 <= len(cam) <= 3:
            out.append(CameraParams(*cam))
        elif isinstance(cam, dict):
            unknown = sorted(set(cam) - {"azimuth", "elevation", "distance"})
            if unknown or "azimuth" not in cam:
                raise InputError(
                    f"camera {i} must have the keys azimuth[, elevation, distance]; got {sorted(cam)}"
                )
            out.append(CameraParams(**cam))
        else:
            raise InputError(
                f"camera {i} must be CameraParams, an azimuth or an (azimuth, elevation[, distance]) tuple; got {cam!r}"
            )
    if not out:
        raise InputError("cameras must name at least one view")
    return out


def intrinsics(size: int, fov_deg: float = DEFAULT_FOV_DEG) -> dict[str, float]:
    """Pinhole intrinsics of a square ``size``×``size`` view with the given field of view."""
    focal = 0.5 * size / math.tan(math.radians(fov_deg) / 2)
    return {"fl_x": focal, "fl_y": focal, "cx": size / 2, "cy": size / 2, "w": size, "h": size}


def cameras_json(cameras: list[CameraParams], size: int, fov_deg: float = DEFAULT_FOV_DEG) -> dict:
    """Poses for 3D reconstruction: both camera-axis conventions and the intrinsics."""
    k = intrinsics(size, fov_deg)
    return {
        "convention": {
            "world": "Z up (Blender), subject at the origin; azimuth 0 = input view",
            "opencv_c2w": "x right, y down, z forward",
            "opengl_c2w": "x right, y up, z backward",
        },
        "fov_deg": fov_deg,
        "intrinsics": {**k, "K": [[k["fl_x"], 0, k["cx"]], [0, k["fl_y"], k["cy"]], [0, 0, 1]]},
        "views": [
            {
                "file": f"view_{i:02d}.png",
                "azimuth": float(c.azimuth),
                "elevation": float(c.elevation),
                "distance": float(c.distance),
                "opencv_c2w": c.opencv_c2w().tolist(),
                "opengl_c2w": c.opengl_c2w().tolist(),
            }
            for i, c in enumerate(cameras)
        ],
    }


def transforms_json(cameras: list[CameraParams], size: int, fov_deg: float = DEFAULT_FOV_DEG) -> dict:
    """nerfstudio / instant-ngp ``transforms.json`` (OpenGL camera-to-world per frame)."""
    k = intrinsics(size, fov_deg)
    return {
        "camera_model": "OPENCV",
        **k,
        "camera_angle_x": math.radians(fov_deg),
        "camera_angle_y": math.radians(fov_deg),
        "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0,
        "frames": [
            {"file_path": f"view_{i:02d}.png", "transform_matrix": c.opengl_c2w().tolist()}
            for i, c in enumerate(cameras)
        ],
    }
