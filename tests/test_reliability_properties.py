"""Property tests: cameras stay proper rotations for every angle in range; whatever bytes the
checkpoint reader or the image loader is given, it returns data or raises the oxigaf error,
never another exception and never a hang (each example has a deadline)."""

import io
import json
import math
import struct
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.numpy import save

from oxigaf.cameras import CameraParams, as_cameras, camera_vectors
from oxigaf.checkpoints import load_state, read_safetensors, read_shapes
from oxigaf.errors import InputError, ModelLoadError
from oxigaf.images import load_image

# Generous: each example takes milliseconds; a loop or a giant allocation takes far longer.
DEADLINE = timedelta(seconds=5)
FAST = settings(max_examples=150, deadline=DEADLINE, suppress_health_check=[HealthCheck.function_scoped_fixture])

azimuths = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
elevations = st.floats(min_value=-90.0, max_value=90.0, exclude_min=True, exclude_max=True)
distances = st.floats(min_value=1e-3, max_value=1e3)


# --------------------------------------------------------------------------------- cameras


def _check_rotation(r: np.ndarray, atol: float) -> None:
    assert np.isfinite(r).all()
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=atol)
    assert abs(np.linalg.det(r) - 1.0) < atol * 3  # a rotation, not a reflection


@FAST
@given(azimuths, elevations)
def test_camera_vector_is_a_finite_orthonormal_rotation(az, el):
    v = CameraParams(az, el).vector()
    assert v.dtype == np.float32 and v.shape == (16,)
    m = v.reshape(4, 4).astype(np.float64)
    _check_rotation(m[:3, :3], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(m[:3, 3]), 1.0, atol=1e-5)  # unit translation
    np.testing.assert_array_equal(m[3], [0, 0, 0, 1])


@FAST
@given(azimuths, elevations, distances)
def test_exported_poses_are_rotations_at_the_distance(az, el, dist):
    cam = CameraParams(az, el, dist)
    for m in (cam.opengl_c2w(), cam.opencv_c2w()):
        _check_rotation(m[:3, :3], atol=1e-9)
        assert math.isclose(np.linalg.norm(m[:3, 3]), dist, rel_tol=1e-9)
    # The camera looks at the subject: OpenCV's +z (forward) points from the camera to the origin.
    m = cam.opencv_c2w()
    np.testing.assert_allclose(m[:3, 2], -m[:3, 3] / dist, atol=1e-9)


@FAST
@given(st.lists(st.one_of(azimuths, st.tuples(azimuths, elevations)), min_size=1, max_size=8))
def test_camera_lists_give_finite_vectors(cams):
    vecs = camera_vectors(as_cameras(cams))
    assert vecs.shape == (len(cams), 16) and np.isfinite(vecs).all()


@FAST
@given(st.sampled_from(["azimuth", "elevation", "distance"]), st.sampled_from([math.nan, math.inf, -math.inf]))
def test_non_finite_camera_values_are_input_errors(field, bad):
    values = {"azimuth": 0.0, "elevation": 0.0, "distance": 2.0, field: bad}
    with pytest.raises(InputError, match=field):
        CameraParams(**values)


@FAST
@given(azimuths, st.one_of(st.floats(min_value=90.0), st.floats(max_value=-90.0)))
def test_elevation_outside_the_open_range_is_an_input_error(az, el):
    with pytest.raises(InputError, match="elevation"):
        CameraParams(az, el)


# -------------------------------------------------------------------------- checkpoint reader


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("scratch")


def _read_or_model_error(path) -> None:
    """``read_safetensors`` either returns arrays matching its header or raises ModelLoadError."""
    try:
        state = read_safetensors(path)
    except ModelLoadError as exc:
        assert str(path.name) in str(exc)
        return
    assert isinstance(state, dict)
    for name, arr in state.items():
        assert isinstance(name, str) and isinstance(arr, np.ndarray)
        np.array(arr, copy=True)  # the data is really there (memory-mapped reads stay in the file)


def _valid_file() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    buf.write(save({
        "a.weight": rng.standard_normal((3, 4)).astype(np.float16),
        "a.bias": rng.standard_normal(4).astype(np.float32),
        "steps": np.arange(5, dtype=np.int64),
        "empty": np.zeros((0, 3), np.float32),
    }, metadata={"format": "pt"}))
    return buf.getvalue()


VALID = _valid_file()
HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]


@FAST
@given(st.binary(max_size=600))
def test_random_bytes_are_model_load_errors(scratch, data):
    path = scratch / "random.safetensors"
    path.write_bytes(data)
    _read_or_model_error(path)


@FAST
@given(st.binary(max_size=400))
def test_random_header_behind_a_valid_length_is_a_model_load_error(scratch, body):
    path = scratch / "lengthed.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    _read_or_model_error(path)


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=4))
entries = st.fixed_dictionaries({}, optional={
    "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8", "f32"]), json_scalars),
    "shape": st.one_of(st.lists(st.one_of(st.integers(-3, 2**66), json_scalars), max_size=4), json_scalars),
    "data_offsets": st.one_of(st.lists(st.one_of(st.integers(-8, 2**65), json_scalars), max_size=3), json_scalars),
})


@FAST
@given(st.dictionaries(st.text(max_size=6), st.one_of(entries, json_scalars), max_size=4),
       st.binary(max_size=64))
def test_malformed_header_entries_are_model_load_errors(scratch, header, data):
    raw = json.dumps(header).encode()
    path = scratch / "header.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    _read_or_model_error(path)


@FAST
@given(st.integers(min_value=0, max_value=len(VALID) - 1))
def test_truncated_file_is_a_model_load_error(scratch, cut):
    path = scratch / "cut.safetensors"
    path.write_bytes(VALID[:cut])
    with pytest.raises(ModelLoadError, match="cut.safetensors"):
        read_safetensors(path)


@FAST
@given(st.lists(st.tuples(st.integers(0, HEADER_END - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_flipped_header_bytes_never_escape(scratch, flips):
    data = bytearray(VALID)
    for pos, value in flips:
        data[pos] = value
    path = scratch / "flipped.safetensors"
    path.write_bytes(bytes(data))
    _read_or_model_error(path)


@FAST
@given(st.integers(0, 2**64 - 1))
def test_any_header_length_is_handled(scratch, n):
    path = scratch / "length.safetensors"
    path.write_bytes(struct.pack("<Q", n) + VALID[8:])
    _read_or_model_error(path)


@FAST
@given(st.binary(max_size=300))
def test_load_state_on_a_folder_of_garbage(scratch, data):
    folder = scratch / "garbage"
    folder.mkdir(exist_ok=True)
    (folder / "model.safetensors").write_bytes(data)
    try:
        load_state(folder)
    except ModelLoadError:
        pass


def test_valid_file_still_reads(scratch):
    # The mutations above start from a file the reader accepts; the header-only reader agrees.
    (scratch / "ok").mkdir()
    path = scratch / "ok" / "model.safetensors"
    path.write_bytes(VALID)
    state = read_safetensors(path)
    assert set(state) == {"a.weight", "a.bias", "steps", "empty"} and state["empty"].shape == (0, 3)
    assert read_shapes(scratch / "ok") == {k: v.shape for k, v in state.items()}


def test_hostile_shapes_are_named(scratch):
    # Shapes whose element count overflows int64, negative dimensions, offsets out of order.
    cases = {
        "overflow": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]},
        "negative": {"dtype": "F32", "shape": [-1], "data_offsets": [4, 0]},
        "float_dim": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]},
        "infinite": {"dtype": "F32", "shape": [1], "data_offsets": [0, math.inf]},
        "bool_dim": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
    }
    for name, entry in cases.items():
        raw = json.dumps({name: entry}).encode()  # inf is written as Infinity, which json accepts
        path = scratch / f"{name}.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
        with pytest.raises(ModelLoadError, match=name):
            read_safetensors(path)


def test_deeply_nested_header_is_a_model_load_error(scratch):
    raw = b"[" * 100_000 + b"]" * 100_000
    path = scratch / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(ModelLoadError, match="deep.safetensors"):
        read_safetensors(path)


# ----------------------------------------------------------------------------------- images


def _encoded(fmt: str, **kw) -> bytes:
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (12, 9, 3), dtype=np.uint8))
    if fmt == "GIF":
        img = img.quantize(8)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


# Pillow warns about some of what it reads (bad TIFF tags, odd EXIF, a flipped size byte that
# claims ~100 M pixels); only exceptions matter here.
pytestmark_images = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")

FORMATS = {fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")}


def _load_or_input_error(path) -> None:
    try:
        img = load_image(path)
    except InputError as exc:
        assert path.name in str(exc)
        return
    assert img.mode == "RGB" and img.width > 0 and img.height > 0


@pytestmark_images
@FAST
@given(st.binary(max_size=2048))
def test_random_bytes_as_an_image_are_input_errors(scratch, data):
    path = scratch / "random.png"
    path.write_bytes(data)
    with pytest.raises(InputError, match="random.png"):
        load_image(path)


@pytestmark_images
@FAST
@given(st.sampled_from(sorted(FORMATS)), st.data())
def test_truncated_images_never_escape(scratch, fmt, data):
    blob = FORMATS[fmt]
    cut = data.draw(st.integers(0, len(blob) - 1))
    path = scratch / f"cut.{fmt.lower()}"
    path.write_bytes(blob[:cut])
    _load_or_input_error(path)


@pytestmark_images
@settings(max_examples=300, deadline=DEADLINE)
@given(st.sampled_from(sorted(FORMATS)), st.data())
def test_corrupted_images_never_escape(scratch, fmt, data):
    blob = bytearray(FORMATS[fmt])
    # Headers are where a decoder's assumptions live: bias flips towards the first 64 bytes.
    positions = st.one_of(st.integers(0, min(63, len(blob) - 1)), st.integers(0, len(blob) - 1))
    for pos, value in data.draw(st.lists(st.tuples(positions, st.integers(0, 255)), min_size=1, max_size=4)):
        blob[pos] = value
    assume(bytes(blob) != FORMATS[fmt])
    path = scratch / f"flipped.{fmt.lower()}"
    path.write_bytes(bytes(blob))
    _load_or_input_error(path)
