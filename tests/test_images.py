"""oxigaf.images: input loading, CLIP preprocessing (vs transformers), the VAE input (vs the
ImageDream reference's encode_image_latents), to_uint8 and make_grid."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from oxigaf.errors import ConfigError, InputError, ModelLoadError, NumericsError
from oxigaf.images import CLIPPreprocessor, load_image, make_grid, to_uint8, vae_input

from conftest import FIXTURES

FEATURE_EXTRACTOR = FIXTURES / "imagedream_e2e" / "model" / "feature_extractor"
INPUT_PNG = FIXTURES / "imagedream_e2e" / "input.png"


def _photo(h, w, seed=0):
    """A uint8 RGB image with smooth structure and noise, so resampling errors would show."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [
            127 + 100 * np.sin(x / max(w, 1) * 7.0 + y / max(h, 1) * 3.0),
            127 + 100 * np.cos(y / max(h, 1) * 9.0),
            255 * (x + y) / max(h + w, 1),
        ],
        axis=-1,
    )
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- load_image: modes


def test_rgb_passes_through_unchanged():
    arr = _photo(20, 30)
    for src in (arr, Image.fromarray(arr)):
        out = load_image(src)
        assert out.mode == "RGB" and out.size == (30, 20)
        np.testing.assert_array_equal(np.asarray(out), arr)


def test_gray_modes_become_equal_channels():
    gray = np.arange(0, 240, dtype=np.uint8).reshape(12, 20)
    want = np.repeat(gray[..., None], 3, axis=-1)
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(gray))), want)  # L
    np.testing.assert_array_equal(np.asarray(load_image(gray)), want)  # (H, W)
    np.testing.assert_array_equal(np.asarray(load_image(gray[..., None])), want)  # (H, W, 1)
    one_bit = Image.fromarray(gray > 100).convert("1")
    np.testing.assert_array_equal(np.asarray(load_image(one_bit))[..., 0], np.where(gray > 100, 255, 0))


def test_alpha_is_composited_onto_background():
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., :3] = (200, 50, 10)
    rgba[:, :2, 3] = 255  # opaque
    rgba[:, 2:4, 3] = 0  # transparent
    rgba[:, 4:, 3] = 128  # half
    for src in (rgba, Image.fromarray(rgba, "RGBA")):
        out = np.asarray(load_image(src)).astype(int)
        assert (out[:, :2] == (200, 50, 10)).all()
        assert (out[:, 2:4] == 255).all()  # white by default
        assert np.abs(out[:, 4:] - np.round(0.502 * np.array([200, 50, 10]) + 0.498 * 255)).max() <= 1
        black = np.asarray(load_image(src, background=(0, 0, 0)))
        assert (black[:, 2:4] == 0).all() and (black[:, :2] == (200, 50, 10)).all()
    la = Image.fromarray(np.stack([np.full((3, 3), 40, np.uint8), np.full((3, 3), 0, np.uint8)], -1), "LA")
    assert (np.asarray(load_image(la, background=(10, 20, 30))) == (10, 20, 30)).all()
    la_arr = np.zeros((2, 2, 2), np.float32)  # float LA, fully transparent
    assert (np.asarray(load_image(la_arr, background=(10, 20, 30))) == (10, 20, 30)).all()


def test_palette_with_and_without_transparency():
    pal = Image.new("P", (8, 8))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pixels = np.zeros((8, 8), np.uint8)
    pixels[:, 4:] = 1
    pal.putdata(pixels.ravel().tolist())
    out = np.asarray(load_image(pal))
    assert (out[:, :4] == (255, 0, 0)).all() and (out[:, 4:] == (0, 0, 255)).all()
    pal.info["transparency"] = 1
    out = np.asarray(load_image(pal, background=(0, 255, 0)))
    assert (out[:, :4] == (255, 0, 0)).all() and (out[:, 4:] == (0, 255, 0)).all()


def test_cmyk_and_high_bit_depth_modes():
    cmyk = Image.new("CMYK", (5, 5), (0, 255, 255, 0))  # red
    assert (np.asarray(load_image(cmyk)) == (255, 0, 0)).all()

    sixteen = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    i16 = Image.fromarray(sixteen)
    assert i16.mode.startswith("I;16")
    np.testing.assert_array_equal(np.asarray(load_image(i16))[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(np.asarray(load_image(sixteen))[0, :, 0], [0, 1, 128, 255])  # uint16 array

    i32 = Image.fromarray(np.array([[0, 100, 200, 255]], dtype=np.int32), "I")
    np.testing.assert_array_equal(np.asarray(load_image(i32))[0, :, 0], [0, 100, 200, 255])
    i32_16bit = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), "I")
    np.testing.assert_array_equal(np.asarray(load_image(i32_16bit))[0, :, 0], [0, 255])

    f = Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32), "F")
    np.testing.assert_array_equal(np.asarray(load_image(f))[0, :, 0], [0, 64, 128, 255])
    with pytest.raises(InputError, match="NaN"):
        load_image(Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32), "F"))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_arrays(dtype):
    arr = _photo(9, 11).astype(np.float64) / 255
    out = np.asarray(load_image(arr.astype(dtype)))
    assert np.abs(out.astype(int) - _photo(9, 11)).max() <= (1 if dtype == np.float16 else 0)
    rgba = np.concatenate([arr, np.zeros((9, 11, 1))], -1).astype(dtype)
    assert (np.asarray(load_image(rgba)) == 255).all()


def test_bool_array():
    mask = np.eye(4, dtype=bool)
    np.testing.assert_array_equal(np.asarray(load_image(mask))[..., 1], np.eye(4) * 255)


def test_paths_formats_and_exif_orientation(tmp_path):
    arr = _photo(40, 60)
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(arr).convert("RGBA").save(tmp_path / "a.webp", lossless=True)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "a.png")), arr)
    np.testing.assert_array_equal(np.asarray(load_image(str(tmp_path / "a.webp"))), arr)
    with Image.open(tmp_path / "a.jpg") as im:
        np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "a.jpg")), np.asarray(im.convert("RGB")))

    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "rot.jpg") as im:
        stored = np.asarray(im.convert("RGB"))
    upright = load_image(tmp_path / "rot.jpg")
    assert upright.size == (40, 60)
    np.testing.assert_array_equal(np.asarray(upright), np.rot90(stored, k=-1))
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "rot.jpg", exif_transpose=False)), stored)


def test_huge_images_are_downscaled(tmp_path):
    wide = Image.fromarray(_photo(30, 5000))
    out = load_image(wide)
    assert out.size == (4096, 25)  # 30 * 4096 / 5000 = 24.6
    assert load_image(wide, max_side=None).size == (5000, 30)

    Image.fromarray(_photo(1000, 2000)).save(tmp_path / "big.jpg", quality=90)
    small = load_image(tmp_path / "big.jpg", max_side=256)
    assert small.size == (256, 128)
    ref = Image.fromarray(_photo(1000, 2000)).resize((256, 128), Image.Resampling.LANCZOS)
    assert np.abs(np.asarray(small).astype(float) - np.asarray(ref)).mean() < 6

    rgba = Image.fromarray(np.dstack([_photo(64, 64), np.zeros((64, 64), np.uint8)]), "RGBA")
    assert (np.asarray(load_image(rgba, max_side=16)) == 255).all()  # transparency survives the reduce


# ---------------------------------------------------------------- load_image: errors


def test_input_errors_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match="folder"):
        load_image(tmp_path)
    (tmp_path / "fake.png").write_text("this is not an image")
    with pytest.raises(InputError, match="not an image"):
        load_image(tmp_path / "fake.png")
    buf = io.BytesIO()
    Image.fromarray(_photo(64, 64)).save(buf, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(InputError, match="decode"):
        load_image(tmp_path / "truncated.png")
    with pytest.raises(InputError, match="zero-sized"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(InputError, match="zero-sized"):
        load_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(InputError, match="shape"):
        load_image(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(InputError, match="shape"):
        load_image(np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(InputError, match="channels must come last"):
        load_image(np.zeros((3, 32, 32), np.float32))
    with pytest.raises(InputError, match="dtype"):
        load_image(np.zeros((4, 4, 3), np.int32))
    with pytest.raises(InputError, match="dtype"):
        load_image(np.zeros((4, 4), np.complex64))
    nan = np.zeros((4, 4, 3), np.float32)
    nan[1, 2, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        load_image(nan)
    with pytest.raises(InputError, match="infinite"):
        load_image(np.full((2, 2), np.inf, np.float32))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        load_image(np.full((4, 4, 3), 200.0, np.float32))
    with pytest.raises(InputError, match="cannot use a list"):
        load_image([[1, 2], [3, 4]])
    with pytest.raises(ConfigError, match="background"):
        load_image(np.zeros((2, 2, 3), np.uint8), background=(0, 0, 300))

    Image.fromarray(_photo(100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputError, match="decompression-bomb"):
        load_image(tmp_path / "bomb.png")


# ---------------------------------------------------------------- CLIP preprocessing

SIZES = [(224, 224), (256, 256), (480, 640), (640, 480), (10, 7), (7, 10), (301, 199), (37, 1000), (225, 223)]


def _reference_processor(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPImageProcessorPil.from_pretrained(str(folder))


def _old_style_folder(tmp_path):
    """The preprocessor_config.json shape on the hub for ImageDream: integer size and crop_size."""
    config = {
        "crop_size": 224,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": 224,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("shape", ["dict", "int"])
def test_clip_preprocessing_matches_transformers(tmp_path, shape):
    folder = FEATURE_EXTRACTOR if shape == "dict" else _old_style_folder(tmp_path)
    ours = CLIPPreprocessor.from_folder(folder)
    assert ours.shortest_edge == 224 and ours.crop_size == (224, 224) and ours.resample == 3
    ref = _reference_processor(folder)
    images = [Image.fromarray(_photo(h, w, seed=i)) for i, (h, w) in enumerate(SIZES)]
    got = ours(images)
    want = ref(images, return_tensors="np")["pixel_values"]
    assert got.dtype == np.float32 and got.shape == (len(SIZES), 3, 224, 224)
    assert want.shape == got.shape
    assert np.abs(got - want).max() == 0.0  # same arithmetic, bit for bit
    np.testing.assert_array_equal(ours(images[2]), want[2:3])


def test_clip_preprocessing_other_modes_match_transformers():
    ours = CLIPPreprocessor.from_folder(FEATURE_EXTRACTOR)
    ref = _reference_processor(FEATURE_EXTRACTOR)
    rgba = np.dstack([_photo(90, 130), (np.arange(90 * 130) % 256).reshape(90, 130).astype(np.uint8)])
    images = [Image.fromarray(rgba, "RGBA"), Image.fromarray(_photo(90, 130)[..., 0]), Image.fromarray(rgba, "RGBA")]
    images[2] = images[2].convert("P")
    want = ref(images, return_tensors="np")["pixel_values"]
    assert np.abs(ours(images) - want).max() == 0.0


@pytest.mark.parametrize(
    "config",
    [
        {"size": {"height": 200, "width": 180}, "crop_size": {"height": 160, "width": 170}},
        {"size": {"shortest_edge": 160}, "crop_size": {"height": 200, "width": 190}},  # crop larger: zero pad
        {"size": {"shortest_edge": 100, "longest_edge": 150}, "crop_size": 96, "resample": 2},
        {"size": 64, "crop_size": 64, "do_normalize": False, "image_mean": 0.5, "image_std": 0.5},
        {"size": 64, "do_center_crop": False, "do_rescale": False, "image_mean": [1, 2, 3], "image_std": [2, 3, 4]},
    ],
)
def test_clip_preprocessing_config_variants(tmp_path, config):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    ours = CLIPPreprocessor.from_folder(tmp_path)
    assert ours == CLIPPreprocessor.from_dict(config)
    ref = _reference_processor(tmp_path)
    sizes = [(120, 120)] if config.get("do_center_crop") is False else SIZES[:6]
    for i, (h, w) in enumerate(sizes):
        image = Image.fromarray(_photo(h, w, seed=i))
        want = ref(image, return_tensors="np")["pixel_values"]
        got = ours(image)
        assert got.shape == want.shape
        assert np.abs(got - want).max() == 0.0, (h, w)


def test_clip_preprocessing_accepts_paths_and_arrays(tmp_path):
    ours = CLIPPreprocessor.from_folder(FEATURE_EXTRACTOR)
    arr = _photo(100, 150)
    Image.fromarray(arr).save(tmp_path / "x.png")
    a = ours(arr)
    np.testing.assert_array_equal(a, ours(Image.fromarray(arr)))
    np.testing.assert_array_equal(a, ours(tmp_path / "x.png"))
    assert ours(np.stack([arr, arr])).shape == (2, 3, 224, 224)
    with pytest.raises(InputError, match="no images"):
        ours([])


def test_clip_preprocessor_config_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        CLIPPreprocessor.from_folder(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="preprocessor_config.json"):
        CLIPPreprocessor.from_folder(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{")
    with pytest.raises(ModelLoadError, match="JSON"):
        CLIPPreprocessor.from_folder(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": "big"}))
    with pytest.raises(ModelLoadError, match="size"):
        CLIPPreprocessor.from_folder(tmp_path)
    with pytest.raises(ConfigError, match="crop_size"):
        CLIPPreprocessor.from_dict({"crop_size": {"height": 0, "width": 3}})
    with pytest.raises(ConfigError, match="image_std"):
        CLIPPreprocessor.from_dict({"image_std": [1, 0, 1]})
    with pytest.raises(ConfigError, match="resample"):
        CLIPPreprocessor.from_dict({"resample": 9})


# ---------------------------------------------------------------- VAE input


def _reference_vae_input(rgb_uint8, size=256):
    """ImageDream's encode_image_latents on a float [0, 1] RGB image (kiui.read_image mode='float')."""
    torch = pytest.importorskip("torch")
    image = rgb_uint8.astype(np.float32) / 255
    image = torch.from_numpy(image).unsqueeze(0).permute(0, 3, 1, 2)
    image = 2 * image - 1
    image = torch.nn.functional.interpolate(image, (size, size), mode="bilinear", align_corners=False)
    return image.numpy()


def test_vae_input_equals_reference_on_the_fixture_input():
    arr = np.asarray(Image.open(INPUT_PNG).convert("RGB"))
    assert arr.shape == (256, 256, 3)
    got = vae_input(Image.fromarray(arr))
    assert got.dtype == np.float32 and got.shape == (1, 3, 256, 256)
    np.testing.assert_array_equal(got, _reference_vae_input(arr))
    np.testing.assert_array_equal(got, vae_input(INPUT_PNG))


@pytest.mark.parametrize("side", [512, 300, 257, 100, 7])
def test_vae_input_square_matches_reference_bilinear(side):
    arr = _photo(side, side, seed=side)
    got = vae_input(Image.fromarray(arr))
    want = _reference_vae_input(arr)
    assert got.shape == want.shape == (1, 3, 256, 256)
    assert np.abs(got - want).max() <= 1e-6
    assert got.min() >= -1 and got.max() <= 1


@pytest.mark.parametrize("hw", [(300, 200), (180, 400)])
def test_vae_input_non_square_is_centre_cropped(hw):
    h, w = hw
    arr = _photo(h, w, seed=1)
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    want = _reference_vae_input(arr[top : top + side, left : left + side], size=128)
    got = vae_input(arr, size=128)
    assert got.shape == (1, 3, 128, 128)
    assert np.abs(got - want).max() <= 1e-6


def test_vae_input_antialias_option():
    arr = _photo(1024, 1024)
    smooth = vae_input(arr, antialias=True)
    assert smooth.shape == (1, 3, 256, 256) and np.isfinite(smooth).all()
    box = arr.reshape(256, 4, 256, 4, 3).astype(np.float64).mean(axis=(1, 3)) / 255 * 2 - 1
    # Antialiased shrinking tracks a 4x4 box average more closely than the reference's point sampling.
    err_aa = np.abs(smooth[0].transpose(1, 2, 0) - box).mean()
    err_ref = np.abs(vae_input(arr)[0].transpose(1, 2, 0) - box).mean()
    assert err_aa < err_ref


# ---------------------------------------------------------------- outputs


def test_to_uint8():
    x = np.array([[[0.0, 0.5, 1.0], [-0.2, 1.3, 0.25]]], np.float32)
    np.testing.assert_array_equal(to_uint8(x), [[[0, 128, 255], [0, 255, 64]]])
    assert to_uint8(np.zeros((2, 4, 4, 3))).dtype == np.uint8
    with pytest.raises(NumericsError):
        to_uint8(np.array([np.nan]))
    with pytest.raises(InputError, match="dtype"):
        to_uint8(np.array([1, 2], np.int64))


def test_make_grid():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9), (200, 100, 0)]
    tiles = [Image.new("RGB", (64, 48), c) for c in colours]
    assert make_grid(tiles[:4]).size == (128, 96)  # 2 x 2
    assert make_grid(tiles[:4], cols=4).size == (256, 48)
    assert make_grid(tiles[:4], cols=9).size == (256, 48)
    grid = make_grid(tiles, padding=2)  # 3 columns, 2 rows
    assert grid.size == (3 * 64 + 2 * 2, 2 * 48 + 2)
    for i, c in enumerate(colours):
        r, k = divmod(i, 3)
        assert grid.getpixel((k * 66 + 32, r * 50 + 24)) == c
    assert grid.getpixel((64, 10)) == (255, 255, 255)  # padding
    floats = np.stack([np.full((8, 8, 3), v, np.float32) for v in (0.0, 1.0)])
    g = make_grid(floats, cols=2)
    assert g.size == (16, 8) and g.getpixel((0, 0)) == (0, 0, 0) and g.getpixel((15, 7)) == (255, 255, 255)
    mixed = make_grid([Image.new("RGB", (10, 10), (1, 2, 3)), Image.new("RGB", (4, 6), (7, 8, 9))])
    assert mixed.size == (20, 10) and mixed.getpixel((15, 5)) == (7, 8, 9) and mixed.getpixel((11, 0)) == (255,) * 3
    with pytest.raises(InputError):
        make_grid([])
    with pytest.raises(InputError):
        make_grid(tiles[0])
