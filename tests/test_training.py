"""Training on the torch backend: data, cameras, the objective against the reference UNet, the
loop (log, checkpoints, resume), LoRA, input widening, bad inputs, and the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors.numpy import load_file  # noqa: E402
from training_helpers import make_data, make_model, make_subject  # noqa: E402

from oxigaf.cameras import CameraParams, camera_vectors, default_cameras  # noqa: E402
from oxigaf.checkpoints import load_state  # noqa: E402
from oxigaf.cli import main  # noqa: E402
from oxigaf.config import UNetConfig  # noqa: E402
from oxigaf.errors import InputError, NumericsError  # noqa: E402
from oxigaf.training import (  # noqa: E402
    Batch,
    MultiViewDataset,
    TrainConfig,
    Trainer,
    batch_loss,
    relative_camera_vectors,
)
from oxigaf.training.data import read_subject  # noqa: E402
from oxigaf.training.loop import widen_input  # noqa: E402
from oxigaf.training.objective import SampleDraw, build_batch  # noqa: E402
from oxigaf_torch.training import UNetTrainer  # noqa: E402

from conftest import FIXTURES, rel_l2  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    model = make_model(root / "model")
    data = make_data(root / "data", prompt="a toy head")
    return {"root": root, "model": model, "data": data}


@pytest.fixture(scope="module")
def prepared(world):
    """One prepared Trainer (encoded data, text states, trainable UNet) for the tests that only read it."""
    t = Trainer(world["data"], world["model"], world["root"] / "unused", TrainConfig(steps=1, progress=False),
                backend="torch")
    t.prepare()
    return t


# -- cameras -------------------------------------------------------------------------------------


def test_cameras_relative_to_the_reference_are_the_inference_cameras(tmp_path):
    azimuths = [0.0, 72.0, 144.0, 216.0, 288.0]
    sub = read_subject(make_subject(tmp_path / "s", seed=0, frames=5, elevation=10.0))
    c2ws = [f.c2w for f in sub.frames]
    for ref in range(5):
        got = relative_camera_vectors(c2ws, c2ws[ref], sub.up)
        want = camera_vectors([CameraParams(a - azimuths[ref], 10.0) for a in azimuths])
        np.testing.assert_allclose(got, want, atol=1e-6)
    # The same poses in another world (rotated, Y up as nerfstudio's default): the same vectors.
    rot = np.eye(4)
    rot[:3, :3] = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]]) @ _rotation_z(0.7)
    moved = [rot @ m for m in c2ws]
    np.testing.assert_allclose(relative_camera_vectors(moved, moved[2], rot[:3, :3] @ sub.up),
                               relative_camera_vectors(c2ws, c2ws[2], sub.up), atol=1e-6)


def test_world_up_defaults_to_the_mean_camera_up(tmp_path):
    sub = read_subject(make_subject(tmp_path / "s", seed=0, frames=4, elevation=20.0))
    np.testing.assert_allclose(sub.up, [0.0, 0.0, 1.0], atol=1e-9)


def _rotation_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


# -- the objective ---------------------------------------------------------------------------------


def test_loss_is_the_mse_of_the_reference_unet_on_the_target_views():
    folder = FIXTURES / "mvunet" / "imagedream_tiny"
    io = load_file(str(folder / "io.safetensors"))
    frames = json.loads((folder / "io.json").read_text())["num_frames"]
    batch_size, views = io["x"].shape[0] // frames, frames - 1
    expected = io["expected"].astype(np.float64).reshape((batch_size, frames) + io["x"].shape[1:])
    # a target near the reference prediction, so the loss is sensitive to the prediction's error
    noise = np.random.default_rng(0).standard_normal(expected[:, :views].shape)
    target = (expected[:, :views] + 0.1 * noise).astype(np.float32)
    batch = Batch(x=io["x"], timesteps=io["timesteps"].astype(np.float32), context=io["context"],
                  camera=io["camera"], ip=np.repeat(io["ip_per_batch"], frames, axis=0), ip_img=io["ip_img"],
                  target=target, num_frames=frames, views=views)
    state = {k: np.asarray(v, np.float32) for k, v in load_state(folder / "unet").items()}
    trainer = UNetTrainer(UNetConfig.from_folder(folder / "unet"), state)
    reference = float(np.mean((expected[:, :views] - target) ** 2))  # the reference model's prediction
    assert batch_loss(io["expected"], batch) == pytest.approx(reference, rel=1e-12)
    assert trainer.loss(batch) == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("drop_image, drop_text", [(False, False), (True, True)])
def test_batch_is_built_as_imagedream_trains(prepared, drop_image, drop_text):
    ds = prepared.dataset
    sched = prepared.scheduler
    noise = np.random.default_rng(1).standard_normal((4, 4, 8, 8), dtype=np.float32)
    draw = SampleDraw(subject=1, reference=3, targets=[0, 1, 2, 4], timestep=637, noise=noise,
                      drop_image=drop_image, drop_text=drop_text)
    for prediction in ("epsilon", "v_prediction"):
        b = build_batch([draw], ds, sched.alphas_cumprod, prediction, prepared.text_states,
                        image_conditioned=True, normals=False)
        a = sched.alphas_cumprod[637]
        x0 = ds.latents[1][[0, 1, 2, 4]]
        np.testing.assert_allclose(b.x[:4], np.sqrt(a) * x0 + np.sqrt(1 - a) * noise, rtol=1e-5, atol=1e-6)
        want = noise if prediction == "epsilon" else np.sqrt(a) * noise - np.sqrt(1 - a) * x0
        np.testing.assert_allclose(b.target[0], want, rtol=1e-5, atol=1e-6)
        assert b.num_frames == 5 and b.views == 4
        np.testing.assert_array_equal(b.timesteps, np.full(5, 637.0))
        np.testing.assert_array_equal(b.camera[4], np.zeros(16))
        np.testing.assert_allclose(b.camera[:4], ds.cameras(1, 3, [0, 1, 2, 4]))
        clip = ds.clip_states[1][3]
        np.testing.assert_array_equal(b.ip, np.broadcast_to(clip * (not drop_image), (5,) + clip.shape))
        np.testing.assert_array_equal(b.ip_img[0], ds.latents[1][3] * (not drop_image))
        text = prepared.text_states["" if drop_text else "a toy head"]
        np.testing.assert_array_equal(b.context, np.broadcast_to(text, (5,) + text.shape))
    assert not np.array_equal(prepared.text_states[""], prepared.text_states["a toy head"])


def test_data_is_encoded_as_the_pipeline_conditions(prepared, world):
    # one image encoding (oxigaf.conditioning.encode_image): a frame's cached latent and CLIP states
    # are the reference latent and CLIP states the pipeline conditions on for that photo
    from oxigaf.pipeline import Pipeline

    pipe = Pipeline(world["model"], backend="torch")
    photo = prepared.dataset.subjects[1].frames[3].image
    cond = pipe.condition(photo)
    np.testing.assert_allclose(prepared.dataset.latents[1][3], pipe.backend.to_numpy(cond.reference_latent)[0],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(prepared.dataset.clip_states[1][3], pipe.backend.to_numpy(cond.clip_states)[0],
                               rtol=1e-6, atol=1e-6)
    assert not np.allclose(prepared.dataset.latents[1][3], prepared.dataset.latents[1][2])


def test_widened_input_starts_as_the_original(prepared):
    b = prepared.draw_batch(np.random.default_rng(3))
    cfg = prepared.unet_config
    base = UNetTrainer(cfg, prepared.base_state)
    wide_state = widen_input(prepared.base_state, 8, "test")
    np.testing.assert_array_equal(wide_state["input_blocks.0.0.weight"][:, 4:], 0.0)
    wide = UNetTrainer(UNetConfig.from_dict({**_config_dict(cfg), "in_channels": 8}, "wide"), wide_state)
    extra = np.random.default_rng(4).standard_normal(b.x.shape, dtype=np.float32)
    wb = Batch(**{**vars(b), "x": np.concatenate([b.x, extra], axis=1),
                  "ip_img": np.concatenate([b.ip_img, extra[4::5]], axis=1)})
    assert rel_l2(wide.predict(wb), base.predict(b)) < 1e-6


def _config_dict(cfg) -> dict:
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "source"}


# -- the loop ---------------------------------------------------------------------------------------


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]


def test_resume_continues_exactly(world, tmp_path):
    """2 steps in one run == 1 step, then --resume 1 step: same losses, same weights, same log."""
    straight = tmp_path / "straight"
    cfg = TrainConfig(steps=2, checkpoint_every=1, image_dropout=0.5, text_dropout=0.5, lr=1e-3, progress=False)
    Trainer(world["data"], world["model"], straight, cfg, backend="torch").train()
    split = tmp_path / "split"
    args = ["train", str(world["data"]), "--model", str(world["model"]), "-o", str(split), "--steps", "1",
            "--lr", "1e-3", "--image-dropout", "0.5", "--text-dropout", "0.5", "--backend", "torch", "--quiet"]
    assert main(args) == 0
    first = (split / "training_log.jsonl").read_text()
    assert main(args + ["--resume"]) == 0
    log_a, log_b = _log(straight), _log(split)
    assert [r["step"] for r in log_b] == [1, 2] and (split / "training_log.jsonl").read_text().startswith(first)
    assert set(log_b[0]) == {"step", "loss", "lr", "seconds"}
    np.testing.assert_allclose([r["loss"] for r in log_b], [r["loss"] for r in log_a], rtol=1e-6)
    wa, wb = load_state(straight / "unet"), load_state(split / "unet")
    assert max(rel_l2(wb[k], wa[k]) for k in wa) < 1e-6
    assert max(rel_l2(wa[k], v) for k, v in load_state(world["model"] / "unet").items()) > 1e-5  # it trained
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]

    from oxigaf import Pipeline

    pipe = Pipeline.from_pretrained(split, backend="torch")
    out = pipe.generate(FIXTURES / "imagedream_e2e" / "input.png", num_inference_steps=1, guidance_scale=2.0,
                        progress=False)
    assert out.images.shape == (4, 64, 64, 3) and np.isfinite(out.images).all()


def test_lora_writes_an_adapter_the_pipeline_applies(world, tmp_path):
    out = tmp_path / "lora_run"
    assert main(["train", str(world["data"]), "--model", str(world["model"]), "-o", str(out), "--steps", "1",
                 "--lr", "1e-2", "--lora-rank", "2", "--backend", "torch", "--quiet"]) == 0
    cfg = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and "input_blocks.1.1.transformer_blocks.0.attn1.to_q" in cfg["target_modules"]
    assert "input_blocks.1.1.transformer_blocks.0.attn2.to_k_ip" in cfg["target_modules"]
    merged = load_state(out / "unet")
    base = load_state(world["model"] / "unet")
    # only the attention projections moved
    moved = sorted(k for k in base if not np.array_equal(merged[k], base[k].astype(np.float32)))
    assert moved and set(moved) <= {t + ".weight" for t in cfg["target_modules"]}

    from oxigaf import Pipeline

    pipe = Pipeline.from_pretrained(world["model"], backend="torch", lora=out / "lora")
    got = {k: v.numpy() for k, v in pipe._model("unet").state_dict().items()}
    assert max(rel_l2(got[k], merged[k]) for k in merged) < 1e-6


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(world, tmp_path):
    out = tmp_path / "nan"
    cfg = TrainConfig(steps=4, lr=1e30, max_grad_norm=None, checkpoint_every=1, progress=False)
    with pytest.raises(NumericsError, match=r"at step (\d)") as info:
        Trainer(world["data"], world["model"], out, cfg, backend="torch").train()
    step = int(info.value.args[0].split("at step ")[1].split()[0])
    assert step >= 2
    last = out / "checkpoints" / f"step-{step - 1:08d}"
    assert str(last) in str(info.value) and (last / "state.json").is_file()
    assert not (out / "checkpoints" / f"step-{step:08d}").exists()
    assert [r["step"] for r in _log(out)] == list(range(1, step))


# -- bad inputs -------------------------------------------------------------------------------------


def test_bad_data_is_refused_naming_the_problem(tmp_path, world):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="empty"):
        MultiViewDataset(empty)
    with pytest.raises(InputError, match="does not exist"):
        MultiViewDataset(tmp_path / "nowhere")

    no_tf = tmp_path / "no_tf"
    make_subject(no_tf / "a", seed=0)
    (no_tf / "b").mkdir()
    with pytest.raises(InputError, match=r"b has no transforms.json"):
        MultiViewDataset(no_tf)

    corrupt = tmp_path / "corrupt"
    make_subject(corrupt / "a", seed=0)
    (corrupt / "a" / "transforms.json").write_text("{not json")
    with pytest.raises(InputError, match="transforms.json is not valid JSON"):
        MultiViewDataset(corrupt)

    missing = tmp_path / "missing"
    make_subject(missing / "a", seed=0)
    (missing / "a" / "view_02.png").unlink()
    with pytest.raises(InputError, match="view_02.png does not exist"):
        MultiViewDataset(missing)

    unreadable = tmp_path / "unreadable"
    make_subject(unreadable / "a", seed=0)
    (unreadable / "a" / "view_01.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(InputError, match="view_01.png cannot be read"):
        MultiViewDataset(unreadable)

    few = tmp_path / "few"
    make_subject(few / "a", seed=0, frames=3)
    with pytest.raises(InputError, match="3 frame.*at least 4"):
        MultiViewDataset(few)

    with pytest.raises(InputError, match="nothing to resume"):
        Trainer(world["data"], world["model"], tmp_path / "fresh", TrainConfig(), backend="torch", resume=True)


def test_cli_refuses_a_missing_image_by_name(tmp_path, world, capsys):
    data = tmp_path / "data"
    shutil.copytree(world["data"], data, ignore=shutil.ignore_patterns(".oxigaf_cache"))
    (data / "subject_1" / "view_03.png").unlink()
    code = main(["train", str(data), "--model", str(world["model"]), "-o", str(tmp_path / "out"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "view_03.png" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_normal_maps_are_required_for_an_8_channel_unet(tmp_path, world):
    with pytest.raises(InputError, match="normal_file_path"):
        Trainer(world["data"], world["model"], tmp_path / "o", TrainConfig(init_in_channels=8), backend="torch")


def test_eight_channel_training_uses_the_normal_latents(tmp_path, world):
    data = tmp_path / "data"
    make_subject(data / "a", seed=5, frames=4, normals=True)
    cfg = TrainConfig(init_in_channels=8, steps=1, image_dropout=0.0, reference_frame=2, progress=False)
    t = Trainer(data, world["model"], tmp_path / "o", cfg, backend="torch")
    t.prepare()
    b = t.draw_batch(np.random.default_rng(0))
    lat, nl = t.dataset.latents[0], t.dataset.normal_latents[0]
    assert b.x.shape[1] == 8 and b.ip_img.shape[1] == 8
    np.testing.assert_array_equal(b.x[:4, 4:], nl[[0, 1, 2, 3]])  # 4 frames: every frame is a target
    np.testing.assert_array_equal(b.ip_img[0], np.concatenate([lat[2], nl[2]]))
    assert not np.allclose(nl, lat)
    t.train()
    assert json.loads((tmp_path / "o" / "unet" / "config.json").read_text())["in_channels"] == 8
    assert len(list((data / "a" / ".oxigaf_cache").iterdir())) == 3  # latents, normal latents, CLIP states


def test_cameras_of_default_orbit_sample(prepared):
    ds = prepared.dataset
    got = ds.cameras(0, 0, [0, 1, 2, 3])
    want = camera_vectors([CameraParams(a, 5.0) for a in (0.0, 72.0, 144.0, 216.0)])
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert len(default_cameras(5)) == len(ds.subjects[0].frames)
