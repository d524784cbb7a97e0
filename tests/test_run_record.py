"""The run record: ``oxigaf.json`` beside every saved output, and ``oxigaf generate --replay``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from oxigaf import DiffusionConfig, toys
from oxigaf.backend import Backend
from oxigaf.cli import main
from oxigaf.errors import InputError
from oxigaf.outputs import (
    RECORD_FORMAT,
    MultiViewOutput,
    file_sha256,
    model_record,
    read_record,
    record_image,
    run_record,
)

from conftest import BACKENDS


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class _Backend(Backend):
    name, device, dtype = "fake", "abacus", "float32"

    def versions(self):
        return {"fakelib": "1.2"}


def _pipe(model=None, upsampler=None):
    """What run_record reads of a Pipeline, without loading one."""
    return SimpleNamespace(model_path=Path(model or toys.model_path()), upsampler=upsampler, lora=None,
                           backend=_Backend())


def _output(views: int = 2, size: int = 16, record=None) -> MultiViewOutput:
    rng = np.random.default_rng(0)
    images = rng.random((views, size, size, 3)).astype(np.float32)
    pil = [Image.fromarray((v * 255).astype(np.uint8)) for v in images]
    from oxigaf.cameras import default_cameras

    return MultiViewOutput(pil, images, np.zeros((views, 4, 2, 2), np.float32), default_cameras(views), record=record)


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.jpg"
    Image.fromarray((np.random.default_rng(1).random((40, 30, 3)) * 255).astype(np.uint8)).save(path, quality=90)
    return path


def test_record_holds_what_decided_the_views(photo, tmp_path):
    config = DiffusionConfig(num_inference_steps=3, ip_weight=0.7, compile=True, eta=0.25)
    rec = run_record(_pipe(), config=config, seed=12, cameras=[0.0, 90.0], prompt="a head", negative_prompt="blur",
                     image=str(photo))
    folder = _output(record=rec).save(tmp_path / "out")
    data = json.loads((folder / "oxigaf.json").read_text())
    assert data["format"] == RECORD_FORMAT and data["oxigaf"]
    assert DiffusionConfig.from_dict(data["config"]) == config.replace(seed=12, num_views=2)
    assert (data["seed"], data["prompt"], data["negative_prompt"], data["size"]) == (12, "a head", "blur", 16)
    assert (data["backend"], data["device"], data["dtype"], data["versions"]) == (
        "fake", "abacus", "float32", {"fakelib": "1.2"})
    assert [c["azimuth"] for c in data["cameras"]] == [0.0, 90.0]
    model = toys.model_path()
    assert data["model"]["path"] == str(model.absolute()) and data["model"]["hub_id"] is None
    files = data["model"]["files"]
    assert set(files) == {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                          "text_encoder/model.safetensors", "image_encoder/model.safetensors"}
    assert all(files[name] == sha(model / name) for name in files)
    # the photo: its path and bytes' hash, and the decoded photo kept as input.png
    assert data["image"]["path"] == str(photo.absolute()) and data["image"]["sha256"] == sha(photo)
    assert data["image"]["copy_sha256"] == sha(folder / "input.png")
    from oxigaf.images import load_image

    assert np.array_equal(np.asarray(load_image(folder / "input.png")), np.asarray(load_image(photo)))
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["view_00.png", "view_01.png", "grid.png", "cameras.json", "transforms.json", "oxigaf.json", "input.png"])


def test_an_in_memory_photo_is_hashed_as_its_copy_and_text_only_runs_have_none(tmp_path):
    img = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    rec = run_record(_pipe(), config=DiffusionConfig(), seed=0, cameras=[0.0], prompt="", negative_prompt="",
                     image=img)
    folder = _output(1, record=rec).save(tmp_path / "a")
    data = json.loads((folder / "oxigaf.json").read_text())
    assert data["image"]["path"] is None and data["image"]["sha256"] == sha(folder / "input.png")
    rec = run_record(_pipe(), config=DiffusionConfig(), seed=0, cameras=[0.0], prompt="a cat", negative_prompt="",
                     image=None)
    folder = _output(1, record=rec).save(tmp_path / "b")
    assert json.loads((folder / "oxigaf.json").read_text())["image"] is None
    assert not (folder / "input.png").exists()
    assert not (_output(1).save(tmp_path / "c") / "oxigaf.json").exists()  # no record, no file


def test_a_failing_record_leaves_no_folder(tmp_path):
    bad = run_record(_pipe(), config=DiffusionConfig(), seed=0, cameras=[0.0], prompt="", negative_prompt="",
                     image=None)
    bad["prompt"] = object()  # not JSON
    with pytest.raises(TypeError):
        _output(1, record=bad).save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_file_hashes_are_cached_per_path_size_and_mtime(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 1000)
    first = file_sha256(f)
    assert first == sha(f)
    stat = f.stat()
    f.write_bytes(b"b" * 1000)  # same size, same mtime below: the cached hash comes back unread
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_sha256(f) == first
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert file_sha256(f) == sha(f) != first


def test_a_hub_snapshot_is_named_by_id_and_revision_and_its_blobs_are_not_read(tmp_path):
    repo = tmp_path / "hub" / "models--someone--tiny-dream"
    snap = repo / "snapshots" / ("ab" * 20)
    (snap / "unet").mkdir(parents=True)
    (repo / "blobs").mkdir()
    digest = "c" * 64  # the hub names an LFS blob by its SHA-256: trusted as it is
    (repo / "blobs" / digest).write_bytes(b"not really safetensors")
    (snap / "unet" / "diffusion_pytorch_model.safetensors").symlink_to(repo / "blobs" / digest)
    rec = model_record(snap)
    assert (rec["hub_id"], rec["revision"]) == ("someone/tiny-dream", "ab" * 20)
    assert rec["files"] == {"unet/diffusion_pytorch_model.safetensors": digest}


def _write_record(folder: Path, **changes) -> Path:
    rec = run_record(_pipe(), config=DiffusionConfig(), seed=0, cameras=[0.0], prompt="", negative_prompt="",
                     image=None)
    data = {**json.loads(json.dumps(rec)), **changes}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "oxigaf.json").write_text(json.dumps(data))
    return folder / "oxigaf.json"


@pytest.mark.parametrize("case,phrase", [
    ("missing", "not found"), ("garbled", "not valid JSON"), ("list", "not an oxigaf run record"),
    ("newer", "newer than this oxigaf reads"), ("nokeys", "lacks"), ("badconfig", "ip_weight"),
    ("unknownsetting", "warp_speed"), ("badseed", "seed"), ("badcameras", "camera"),
])
def test_a_bad_record_is_an_input_error_naming_the_file(tmp_path, case, phrase):
    path = tmp_path / "rec" / "oxigaf.json"
    if case == "garbled":
        path.parent.mkdir()
        path.write_text('{"format": 1, "config": ')
    elif case == "list":
        path.parent.mkdir()
        path.write_text("[1, 2]")
    elif case == "newer":
        _write_record(path.parent, format=RECORD_FORMAT + 1)
    elif case == "nokeys":
        path.parent.mkdir()
        path.write_text(json.dumps({"format": 1, "config": {}}))
    elif case == "badconfig":
        _write_record(path.parent, config={"ip_weight": "strong"})
    elif case == "unknownsetting":
        _write_record(path.parent, config={"warp_speed": 9})
    elif case == "badseed":
        _write_record(path.parent, seed=-1)
    elif case == "badcameras":
        _write_record(path.parent, cameras=[{"azimuth": 0, "elevation": 95}])
    with pytest.raises(InputError) as err:
        read_record(path)
    assert phrase in str(err.value) and str(path) in str(err.value)


def test_record_image_checks_the_copy_then_the_original(photo, tmp_path):
    rec = run_record(_pipe(), config=DiffusionConfig(), seed=0, cameras=[0.0], prompt="", negative_prompt="",
                     image=str(photo))
    folder = _output(1, record=rec).save(tmp_path / "out")
    assert record_image(read_record(folder / "oxigaf.json")) == folder / "input.png"
    (folder / "input.png").write_bytes(b"changed")
    assert record_image(read_record(folder)) == photo.absolute()
    photo.write_bytes(photo.read_bytes() + b"x")
    with pytest.raises(InputError, match="gone or changed"):
        record_image(read_record(folder))


# --------------------------------------------------------------------------- the CLI, for real

BACKEND = BACKENDS[0]
RUN = ["--model", str(toys.model_path()), "--backend", BACKEND, "--quiet"]


def _views(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("view_*.png"))]


def test_replay_draws_the_same_views_bit_for_bit(toy_photo, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    toy_photo.save(photo)
    first = tmp_path / "first"
    args = ["--steps", "2", "--azimuths", "0,100,200", "--seed", "7", "--guidance", "3", "--ip-weight", "0.8",
            "--eta", "0.5", "--prompt", "a toy head"]
    assert main(["generate", str(photo), "-o", str(first), *RUN, *args]) == 0, capsys.readouterr().err
    record = json.loads((first / "oxigaf.json").read_text())
    assert (record["seed"], record["config"]["ip_weight"], record["config"]["eta"], record["prompt"]) == (
        7, 0.8, 0.5, "a toy head")
    assert [c["azimuth"] for c in record["cameras"]] == [0.0, 100.0, 200.0]
    photo.unlink()  # the replay reads the folder's copy of the input
    again = tmp_path / "again"
    assert main(["generate", "--replay", str(first / "oxigaf.json"), "-o", str(again), "--quiet"]) == 0, \
        capsys.readouterr().err
    a, b = _views(first), _views(again)
    assert len(a) == 3 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    replayed = json.loads((again / "oxigaf.json").read_text())
    assert replayed["config"] == record["config"] and replayed["cameras"] == record["cameras"]
    assert replayed["image"]["copy_sha256"] == record["image"]["copy_sha256"]
    # a flag typed beside --replay wins, and the record says so
    other = tmp_path / "other"
    assert main(["generate", "--replay", str(first), "-o", str(other), "--seed", "8", "--quiet"]) == 0
    assert json.loads((other / "oxigaf.json").read_text())["seed"] == 8
    assert not all(np.array_equal(x, y) for x, y in zip(a, _views(other), strict=True))


def test_replay_refuses_a_bad_record_in_one_line(tmp_path, capsys):
    (tmp_path / "oxigaf.json").write_text('{"format": 99}')
    assert main(["generate", "--replay", str(tmp_path / "oxigaf.json"), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "format 99" in err and "upgrade oxigaf" in err


def test_batch_writes_a_record_per_item_with_the_typed_settings(toy_photo, tmp_path, monkeypatch, capsys):
    if BACKEND == "torch":  # --compile is recorded; a stand-in keeps torch.compile from compiling
        import torch

        monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    photos = tmp_path / "photos"
    photos.mkdir()
    toy_photo.save(photos / "a.png")
    toy_photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photos / "b.png")
    (tmp_path / "m.csv").write_text("id,image,seed\na,photos/a.png,\nb,photos/b.png,21\n")
    out = tmp_path / "out"
    rc = main(["batch", str(tmp_path / "m.csv"), "-o", str(out), "--compile", "--ip-weight", "0.7", "--steps", "3",
               "--seed", "5", "--views", "2", *RUN])
    assert rc == 0, capsys.readouterr().err
    for item, seed in (("a", 5), ("b", 21)):
        rec = json.loads((out / item / "oxigaf.json").read_text())
        cfg = rec["config"]
        assert (cfg["compile"], cfg["ip_weight"], cfg["num_inference_steps"], cfg["num_views"]) == (True, 0.7, 3, 2)
        assert rec["seed"] == cfg["seed"] == seed
        assert rec["image"]["path"] == str((photos / f"{item}.png").absolute())
        assert rec["image"]["sha256"] == sha(photos / f"{item}.png")
        assert (out / item / "input.png").is_file()
    # an item's record replays to that item's views
    shutil.rmtree(photos)
    assert main(["generate", "--replay", str(out / "b"), "-o", str(tmp_path / "b-again"), "--quiet"]) == 0
    assert all(np.array_equal(x, y) for x, y in zip(_views(out / "b"), _views(tmp_path / "b-again"), strict=True))


def test_given_latents_are_recorded_and_such_a_run_is_not_replayed_from_the_record(tmp_path, capsys):
    noise = np.random.default_rng(3).standard_normal((2, 4, 2, 2)).astype(np.float32)
    rec = run_record(_pipe(), config=DiffusionConfig(), seed=0, cameras=[0.0], prompt="", negative_prompt="",
                     image=None, latents=noise)
    assert rec["latents_sha256"] == hashlib.sha256(noise.tobytes()).hexdigest()
    assert "latents_sha256" not in run_record(_pipe(), config=DiffusionConfig(), seed=0, cameras=[0.0], prompt="",
                                              negative_prompt="", image=None)
    folder = _output(1, record=rec).save(tmp_path / "given")
    assert main(["generate", "--replay", str(folder), "-o", str(tmp_path / "o")]) == 2
    assert "latents its caller gave" in capsys.readouterr().err


def test_replay_warns_when_the_recorded_weights_changed(toy_photo, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(toys.model_path(), model)
    photo = tmp_path / "photo.png"
    toy_photo.save(photo)
    args = ["--model", str(model), "--backend", BACKEND, "--steps", "1", "--quiet"]
    assert main(["generate", str(photo), "-o", str(tmp_path / "a"), *args]) == 0
    capsys.readouterr()
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    name = sorted(state)[0]
    state[name] = state[name] * 2
    save_file(state, str(weights))
    assert main(["generate", "--replay", str(tmp_path / "a"), "-o", str(tmp_path / "b"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "differ from the record" in err
    assert json.loads((tmp_path / "b" / "oxigaf.json").read_text())["model"]["files"][
        "vae/diffusion_pytorch_model.safetensors"] == sha(weights)
