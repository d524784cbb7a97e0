"""``oxigaf batch`` with the local engine: manifests, per-item errors, resume, interruption.

The model is the reference fixture's tiny ImageDream (tests/fixtures/imagedream_e2e/model) with
its UNet's ``image_size`` set to 8, so it works at 64 px instead of 256 px: the same weights
(convolutions and attention do not depend on the latent size), about 15x less work per item.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oxigaf.batch import (
    BatchItem,
    BatchSettings,
    expected_files,
    make_chunks,
    read_manifest,
    read_results,
    run_batch,
    run_chunk,
    settings_hash,
)
from oxigaf.cli import main
from oxigaf.config import DiffusionConfig
from oxigaf.errors import ConfigError, InputError, NumericsError
from oxigaf.images import load_image

FIXTURE_MODEL = Path(__file__).parent / "fixtures" / "imagedream_e2e" / "model"
PORTRAIT = Path(__file__).parent / "fixtures" / "imagedream_e2e" / "input.png"
GEN_ARGS = ["--steps", "2", "--guidance", "1.0", "--backend", "torch", "--quiet"]


def small_model(dst: Path) -> Path:
    """The fixture model at 64 px: weight files linked, only unet/config.json rewritten."""
    shutil.copytree(FIXTURE_MODEL, dst, copy_function=os.symlink)
    config = dst / "unet" / "config.json"
    data = json.loads(config.read_text())
    config.unlink()
    config.write_text(json.dumps({**data, "image_size": 8}))
    return dst


def make_photos(folder: Path) -> dict[str, Path]:
    """Three good photos (the portrait, mirrored, rotated), a corrupt file; ``miss`` is never written."""
    folder.mkdir(parents=True, exist_ok=True)
    portrait = Image.open(PORTRAIT).convert("RGB")
    paths = {"a": folder / "a.png", "b": folder / "b.png", "c": folder / "c.jpg", "bad": folder / "bad.png",
             "miss": folder / "nothere.png"}
    portrait.save(paths["a"])
    portrait.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(paths["b"])
    portrait.rotate(90).save(paths["c"], quality=95)
    paths["bad"].write_bytes(b"\x89PNG\r\n\x1a\n but the rest is not an image")
    return paths


def write_csv_manifest(folder: Path) -> Path:
    # c: its own seed and two azimuths ("0;180" in a CSV cell), so it cannot share a call with a/b.
    manifest = folder / "manifest.csv"
    manifest.write_text("id,image,seed,azimuths\n"
                        "a,a.png,,\n"
                        "b,b.png,,\n"
                        "bad,bad.png,,\n"
                        "miss,nothere.png,,\n"
                        "c,c.jpg,7,0;180\n")
    return manifest


def views_of(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("view_*.png"))]).astype(np.int16)


def assert_same_views(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to float rounding: batched and single calls differ by ~1e-6 in float32, which
    moves a handful of pixels by one level after the uint8 quantisation (measured: 5 of 147 456)."""
    assert a.shape == b.shape
    diff = np.abs(a - b)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return small_model(tmp_path_factory.mktemp("model") / "imagedream64")


@pytest.fixture(scope="module")
def settings(model_dir) -> BatchSettings:
    return BatchSettings(model=str(model_dir), backend="torch",
                         config=DiffusionConfig(num_inference_steps=2, guidance_scale=1.0))


@pytest.fixture(scope="module")
def pipe(settings):
    return settings.load_pipeline()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, model_dir):
    """One CLI run over good photos, a corrupt file and a missing path, 4 items per call."""
    root = tmp_path_factory.mktemp("first")
    data = root / "data"
    photos = make_photos(data)
    manifest = write_csv_manifest(data)
    out = root / "out"
    rc = main(["batch", str(manifest), "-o", str(out), "--model", str(model_dir), "--batch-size", "4", *GEN_ARGS])
    return {"rc": rc, "root": root, "data": data, "out": out, "manifest": manifest, "photos": photos}


def test_local_writes_every_good_item_and_an_error_row_per_bad_file(first_run, capsys):
    out = first_run["out"]
    assert first_run["rc"] == 1
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in records}
    assert len(records) == 5 and set(by_id) == {"a", "b", "c", "bad", "miss"}
    for item_id, views in (("a", 4), ("b", 4), ("c", 2)):
        r = by_id[item_id]
        assert r["status"] == "ok" and r["error"] is None and r["seconds"] > 0
        assert Path(r["output"]) == out / item_id
        assert sorted(p.name for p in (out / item_id).iterdir()) == sorted(expected_files(views))
    assert by_id["bad"]["status"] == "error" and "bad.png" in by_id["bad"]["error"]
    assert by_id["miss"]["status"] == "error" and "nothere.png" in by_id["miss"]["error"]
    assert by_id["bad"]["output"] is None and not (out / "bad").exists() and not (out / "miss").exists()
    assert len({r["settings_hash"] for r in records}) == 5
    # Nothing half-written: only the item folders and results.jsonl.
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "c", "results.jsonl"]


def test_cli_summary_names_the_failures(tmp_path, model_dir, pipe, capsys, monkeypatch):
    monkeypatch.setattr(BatchSettings, "load_pipeline", lambda self: pipe)  # loaded once per module
    data = tmp_path / "data"
    make_photos(data)
    (data / "m.jsonl").write_text('{"id": "bad", "image": "bad.png"}\n')
    rc = main(["batch", str(data / "m.jsonl"), "-o", str(tmp_path / "out"), "--model", str(model_dir), *GEN_ARGS])
    err = capsys.readouterr().err
    assert rc == 1
    assert "0 ok, 1 failed" in err and "bad" in err and "results.jsonl" in err


def test_views_are_those_of_generate_alone_with_the_item_seed(first_run, pipe):
    """a and b ran as one batch of 2 (seeds 0, 1: rows 0 and 1); c alone with its seed 7 and its
    two azimuths. Each must be what ``generate`` gives for that photo alone."""
    out, photos = first_run["out"], first_run["photos"]
    for item_id, seed, cameras in (("a", 0, None), ("b", 1, None), ("c", 7, [0.0, 180.0])):
        alone = pipe.generate(str(photos[item_id]), cameras=cameras, seed=seed, num_inference_steps=2,
                              guidance_scale=1.0, progress=False)
        expected = np.stack([np.asarray(v) for v in alone.views]).astype(np.int16)
        assert_same_views(views_of(out / item_id), expected)
    # The seeds really differ between items: a and b's noise is not the same.
    assert np.abs(views_of(out / "a") - views_of(out / "b")).mean() > 5


def test_each_item_records_its_own_run(first_run):
    """a and b share one generate call: each folder's oxigaf.json must still be that item's run
    alone (its seed, photo, cameras), so ``--replay`` of the folder draws its views."""
    from oxigaf.outputs import read_record

    out, data = first_run["out"], first_run["data"]
    for item_id, seed, photo, azimuths in (("a", 0, "a.png", None), ("b", 1, "b.png", None),
                                           ("c", 7, "c.jpg", [0.0, 180.0])):
        record = read_record(out / item_id)
        assert record["seed"] == seed and record["config"].seed == seed
        assert record["image"]["path"] == str((data / photo).absolute())
        assert (record["prompt"], record["negative_prompt"]) == ("", "")
        assert record["config"].num_inference_steps == 2 and record["config"].guidance_scale == 1.0
        cams = record["cameras"]
        assert len(cams) == (len(azimuths) if azimuths else 4) == record["config"].num_views
        if azimuths:
            assert [c.azimuth for c in cams] == azimuths
        assert (out / item_id / "input.png").is_file()


def test_generation_flags_reach_each_items_record(tmp_path, model_dir):
    """Every generation flag of ``oxigaf generate`` applies to a batch and is recorded per item."""
    from oxigaf.cli import build_parser
    from oxigaf.cli.batch import settings_from_args
    from oxigaf.outputs import read_record

    make_photos(tmp_path)
    (tmp_path / "m.csv").write_text("id,image,seed\na,a.png,\nb,b.png,5\n")
    out = tmp_path / "out"
    flags = ["--model", str(model_dir), "--ip-weight", "0.7", "--steps", "3", "--seed", "11", "--eta", "0.5",
             "--guidance", "1.0", "--backend", "torch", "--quiet"]
    assert main(["batch", str(tmp_path / "m.csv"), "-o", str(out), *flags]) == 0
    for item_id, seed in (("a", 11), ("b", 5)):
        config = read_record(out / item_id)["config"]
        assert (config.ip_weight, config.num_inference_steps, config.eta, config.seed) == (0.7, 3, 0.5, seed)
    # --compile is a generation setting like the others (not run here: compiling takes long on a CPU).
    args = build_parser().parse_args(["batch", "m.csv", "-o", "o", "--compile", "--ip-weight", "0.7", "--steps", "3"])
    config = settings_from_args(args).config
    assert (config.compile, config.ip_weight, config.num_inference_steps) == (True, 0.7, 3)


def _snapshot(out: Path, ids) -> dict:
    return {(i, p.name): (p.stat().st_ino, p.stat().st_mtime_ns) for i in ids for p in (out / i).iterdir()}


def test_rerun_rewrites_no_finished_item_and_retries_a_mended_one(first_run, model_dir, pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(BatchSettings, "load_pipeline", lambda self: pipe)  # loaded once per module
    # Work on a copy: the folder moved elsewhere resumes too (paths in the hash are the manifest's).
    root = tmp_path / "copy"
    shutil.copytree(first_run["root"], root)
    out, manifest = root / "out", root / "data" / "manifest.csv"
    before = _snapshot(out, "abc")
    lines_before = (out / "results.jsonl").read_text().splitlines()
    shutil.copy(first_run["photos"]["a"], root / "data" / "bad.png")  # mend the corrupt file
    rc = main(["batch", str(manifest), "-o", str(out), "--model", str(model_dir), "--batch-size", "4", *GEN_ARGS])
    assert rc == 1  # "miss" still fails
    assert _snapshot(out, "abc") == before
    lines = (out / "results.jsonl").read_text().splitlines()
    assert lines[: len(lines_before)] == lines_before
    new = [json.loads(line) for line in lines[len(lines_before):]]
    assert sorted((r["id"], r["status"]) for r in new) == [("bad", "ok"), ("miss", "error")]
    assert sorted(p.name for p in (out / "bad").iterdir()) == sorted(expected_files(4))
    # And once the missing photo exists, the run is clean.
    shutil.copy(first_run["photos"]["b"], root / "data" / "nothere.png")
    assert main(["batch", str(manifest), "-o", str(out), "--model", str(model_dir), *GEN_ARGS]) == 0
    records = read_results(out / "results.jsonl")
    assert {r["status"] for r in records.values()} == {"ok"} and len(records) == 5


def test_changed_settings_rerun_the_item(first_run, settings):
    items = read_manifest(first_run["manifest"], settings)
    a = items[0]
    base = settings_hash(settings, a)
    config = settings.config
    for changed in (replace(settings, config=config.replace(num_inference_steps=3)),
                    replace(settings, config=config.replace(ip_weight=0.7)),
                    replace(settings, config=config.replace(eta=0.5)),
                    replace(settings, config=config.replace(dtype="bfloat16")),
                    replace(settings, config=config.replace(vae_tile_size=64)),
                    replace(settings, negative_prompt="blurry"),
                    replace(settings, size=512)):
        assert settings_hash(changed, a) != base
    assert settings_hash(settings, BatchItem(**{**a.to_dict(), "seed": a.seed + 1})) != base
    # How the work runs does not change the views: backend, device, low_memory, compile and the
    # attention kernel are not hashed (the last two change numbers by float rounding only).
    same = replace(settings, backend="mlx", device="cpu",
                   config=config.replace(low_memory=True, compile=True, attention="naive", attention_chunk_size=64))
    assert settings_hash(same, a) == base
    # The defaults that every item overrides (seed, elevation) enter through the item only.
    assert settings_hash(replace(settings, config=config.replace(seed=5)), a) == base


def test_settings_travel_as_plain_data(settings):
    s = replace(settings, azimuths=(0, 90.0), prompt="a hat", size=256,
                config=settings.config.replace(ip_weight=0.7, compile=True, seed=3))
    data = json.loads(json.dumps(s.to_dict()))  # what a Ray worker receives
    assert BatchSettings.from_dict(data) == s
    assert s.config.num_views == 2  # azimuths decide the view count
    with pytest.raises(ConfigError, match="size"):
        BatchSettings(model="m", size=0)
    with pytest.raises(ConfigError, match="config"):
        BatchSettings(model="m", config={"num_views": 4})


def test_interrupted_run_keeps_finished_items_and_resumes(tmp_path, settings, pipe, monkeypatch):
    import oxigaf.batch.chunk as chunk

    data = tmp_path / "data"
    make_photos(data)
    manifest = data / "m.csv"
    manifest.write_text("id,image\na,a.png\nb,b.png\nc,c.jpg\n")
    out = tmp_path / "out"
    monkeypatch.setattr(BatchSettings, "load_pipeline", lambda self: pipe)
    real = chunk._generate
    calls = []

    def interrupted(p, items, s):
        calls.append(items[0].id)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while b is being generated
        return real(p, items, s)

    monkeypatch.setattr(chunk, "_generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_batch(manifest, out, settings, progress=False)
    assert [json.loads(line)["id"] for line in (out / "results.jsonl").read_text().splitlines()] == ["a"]
    assert sorted(p.name for p in out.iterdir()) == ["a", "results.jsonl"]
    # What a killed (not interrupted) process leaves: a torn last line and a temporary folder.
    with open(out / "results.jsonl", "a") as fh:
        fh.write('{"id": "b", "stat')
    (out / ".b.x1y2z3").mkdir()
    (out / ".b.x1y2z3" / "view_00.png").write_bytes(b"half")
    monkeypatch.setattr(chunk, "_generate", real)
    summary = run_batch(manifest, out, settings, progress=False)
    assert (summary.ok, summary.failed, summary.skipped) == (2, 0, 1)
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "c", "results.jsonl"]
    assert set(read_results(out / "results.jsonl")) == {"a", "b", "c"}


# -- a batch with one bad item falls back to one at a time (a stub pipeline, no model) ----------


class _StubOutput:
    record = None

    def __init__(self, seed):
        self.seed = seed

    def save(self, folder, overwrite=False):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "seed.txt").write_text(str(self.seed))
        return folder


class _StubPipeline:
    """Fails (as a NaN would) on any call that contains the all-red photo."""

    def __init__(self):
        self.calls = []

    def generate(self, images, *, seed, **kwargs):
        self.calls.append((len(images), seed))
        if any(load_image(im).getpixel((0, 0)) == (255, 0, 0) for im in images):
            raise NumericsError("NaN or Inf in the latents at denoising step 1/2")
        return [_StubOutput(seed + i) for i in range(len(images))]


def _items(folder: Path, colours, seed0=10) -> list[BatchItem]:
    items = []
    for i, colour in enumerate(colours):
        path = folder / f"p{i}.png"
        Image.new("RGB", (16, 16), colour).save(path)
        items.append(BatchItem(f"p{i}", str(path), path.name, seed0 + i, "", None, 0.0, i))
    return items


def test_a_failing_item_in_a_batch_runs_the_others_alone(tmp_path):
    items = _items(tmp_path, ["gray", "gray", "red", "gray"])
    stub = _StubPipeline()
    records = list(run_chunk(stub, items, BatchSettings(model=""), tmp_path / "out"))
    assert stub.calls == [(4, 10), (1, 10), (1, 11), (1, 12), (1, 13)]
    assert [(r["id"], r["status"]) for r in records] == [("p0", "ok"), ("p1", "ok"), ("p2", "error"), ("p3", "ok")]
    assert "p2.png" in records[2]["error"] and "NaN" in records[2]["error"]
    for item in (items[0], items[1], items[3]):  # each alone got its own seed
        assert (tmp_path / "out" / item.id / "seed.txt").read_text() == str(item.seed)


def test_an_output_recorded_for_another_item_is_that_items_error(tmp_path):
    """A run record must belong to its item: a record naming another seed or photo is refused, not saved."""
    items = _items(tmp_path, ["gray", "gray"])

    class _WrongRecords(_StubPipeline):
        def generate(self, images, *, seed, **kwargs):
            outputs = super().generate(images, seed=seed, **kwargs)
            for output in outputs:  # both claim the first item's seed and photo
                output.record = {"seed": seed, "prompt": "", "image": {"path": str(Path(images[0]).absolute())},
                                 "cameras": [{"azimuth": 0.0, "elevation": 0.0}]}
            return outputs

    records = list(run_chunk(_WrongRecords(), items, BatchSettings(model=""), tmp_path / "out"))
    assert [(r["id"], r["status"]) for r in records] == [("p0", "ok"), ("p1", "error")]
    assert "seed 10 (the item's is 11)" in records[1]["error"] and "p0.png" in records[1]["error"]
    assert not (tmp_path / "out" / "p1").exists()


def test_an_unreadable_photo_leaves_the_batch_split_by_consecutive_seeds(tmp_path):
    items = _items(tmp_path, ["gray"] * 4)
    Path(items[1].image).write_bytes(b"garbage")
    stub = _StubPipeline()
    records = list(run_chunk(stub, items, BatchSettings(model=""), tmp_path / "out"))
    # p1 fails on reading, before any call; p0 alone (seed 10), then p2, p3 together (11 is gone).
    assert stub.calls == [(1, 10), (2, 12)]
    assert {r["id"]: r["status"] for r in records} == {"p0": "ok", "p1": "error", "p2": "ok", "p3": "ok"}


def test_chunks_share_prompt_cameras_and_consecutive_seeds():
    def item(i, seed, prompt="", az=None):
        return BatchItem(str(i), "x.png", "x.png", seed, prompt, az, 0.0, i)

    items = [item(0, 0), item(1, 1), item(2, 2), item(3, 9), item(4, 10), item(5, 11, "hat"), item(6, 12, "hat"),
             item(7, 13, "hat", (0.0, 90.0))]
    chunks = [[it.id for it in c] for c in make_chunks(items, batch_size=2)]
    assert chunks == [["0", "1"], ["2"], ["3", "4"], ["5", "6"], ["7"]]
    assert [len(c) for c in make_chunks(items, batch_size=1)] == [1] * 8


def test_run_batch_takes_any_engine_and_makes_the_chunks_itself(tmp_path):
    from oxigaf.batch import Engine, LocalEngine, RayEngine, make_engine

    class Recorder:
        name = "recorder"

        def __init__(self):
            self.chunks = None

        def run(self, chunks, settings, out):
            self.chunks = [[item.id for item in chunk] for chunk in chunks]
            return ({"id": item.id, "status": "ok", "error": None} for chunk in chunks for item in chunk)

    assert all(isinstance(e, Engine) for e in (Recorder(), LocalEngine(), RayEngine(workers=2)))
    (tmp_path / "m.csv").write_text("id,image\na,a.png\nb,b.png\nc,c.png\n")
    engine = Recorder()
    summary = run_batch(tmp_path / "m.csv", tmp_path / "out", BatchSettings(model=""), engine=engine, batch_size=2,
                        progress=False)
    assert engine.chunks == [["a", "b"], ["c"]] and (summary.ok, summary.failed) == (3, 0)
    assert set(read_results(tmp_path / "out" / "results.jsonl")) == {"a", "b", "c"}
    with pytest.raises(ConfigError, match="engine must be one of local, ray"):
        make_engine("dask")
    with pytest.raises(ConfigError, match="named engine"):
        run_batch(tmp_path / "m.csv", tmp_path / "out", BatchSettings(model=""), engine=Recorder(), workers=2)


def test_the_batch_package_imports_no_ray():
    import subprocess
    import sys

    code = ("import sys, oxigaf.batch, oxigaf.batch.engines.ray\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'ray']\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- manifests ---------------------------------------------------------------------------------


def _expected_rows(folder: Path):
    return [("a", str(folder / "a.png"), 5, "", None, 0.0), ("b", str(folder / "b.png"), 1, "a hat", (0.0, 90.0), 10.0)]


def _as_tuples(items):
    return [(i.id, i.image, i.seed, i.prompt, i.azimuths, i.elevation) for i in items]


def test_csv_jsonl_and_parquet_manifests_read_the_same(tmp_path):
    (tmp_path / "m.csv").write_text('id,image,seed,prompt,azimuths,elevation,notes\n'
                                    'a,a.png,5,,,,extra columns are ignored\n'
                                    'b,b.png,,a hat,"0,90",10,\n')
    (tmp_path / "m.jsonl").write_text('{"id": "a", "image": "a.png", "seed": 5}\n\n'
                                      '{"id": "b", "image": "b.png", "prompt": "a hat", "azimuths": [0, 90], '
                                      '"elevation": 10}\n')
    settings = BatchSettings(model="", config=DiffusionConfig(seed=0))
    expected = _expected_rows(tmp_path)  # b without a seed: default seed + its row index 1
    assert _as_tuples(read_manifest(tmp_path / "m.csv", settings)) == expected
    assert _as_tuples(read_manifest(tmp_path / "m.jsonl", settings)) == expected
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"id": ["a", "b"], "image": ["a.png", "b.png"], "seed": [5, None], "prompt": [None, "a hat"],
                      "azimuths": [None, [0.0, 90.0]], "elevation": [None, 10.0]})
    pq.write_table(table, tmp_path / "m.parquet")
    assert _as_tuples(read_manifest(tmp_path / "m.parquet", settings)) == expected


def test_a_folder_of_images_is_a_manifest(tmp_path):
    make_photos(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    items = read_manifest(tmp_path, BatchSettings(model="", config=DiffusionConfig(seed=3)))
    assert [(i.id, Path(i.image).name, i.seed) for i in items] == [("a", "a.png", 3), ("b", "b.png", 4),
                                                                   ("bad", "bad.png", 5), ("c", "c.jpg", 6)]


def test_cli_default_seed_and_per_row_values_reach_the_items(tmp_path):
    (tmp_path / "m.csv").write_text("id,image,seed\na,a.png,\nb,b.png,\n")
    settings = BatchSettings(model="", config=DiffusionConfig(seed=100, elevation=5), azimuths=(0, 45))
    items = read_manifest(tmp_path / "m.csv", settings)
    assert [(i.seed, i.azimuths, i.elevation) for i in items] == [(100, (0.0, 45.0), 5.0), (101, (0.0, 45.0), 5.0)]


BAD_MANIFESTS = {
    "nonexistent": (None, "does not exist"),
    "unparsable.csv": ('id,image\n"a,a.png\n', "cannot be parsed as CSV"),
    "ragged.csv": ("id,image\na,a.png,extra\n", "3 fields"),
    "unparsable.jsonl": ('{"id": "a", "image": "a.png"}\n{"id": "b", \n', "line 2 cannot be parsed"),
    "unparsable.parquet": ("PAR1 this is not parquet", "unparsable.parquet"),
    "noimage.csv": ("id,photo\na,a.png\n", "no 'image' column"),
    "noid.jsonl": ('{"image": "a.png"}\n', "no 'id' column"),
    "duplicate.csv": ("id,image\na,a.png\nb,b.png\na,c.png\n", "duplicate id 'a'"),
    "badseed.csv": ("id,image,seed\na,a.png,-3\n", "seed must be a non-negative integer"),
    "slash.csv": ("id,image\n../escape,a.png\n", "cannot name a folder"),
    "manifest.txt": ("id,image\n", "unknown format"),
    "empty.csv": ("", "is empty"),
}


@pytest.mark.parametrize("name", sorted(BAD_MANIFESTS))
def test_bad_manifests_are_refused_by_name(tmp_path, capsys, name):
    content, phrase = BAD_MANIFESTS[name]
    manifest = tmp_path / name
    if content is not None:
        manifest.write_text(content)
    out = tmp_path / "out"
    rc = main(["batch", str(manifest), "-o", str(out), "--model", str(tmp_path / "no-model"), *GEN_ARGS])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("oxigaf: error: "), err
    assert name in err and phrase in err, err
    assert not out.exists()  # refused before anything was written
    with pytest.raises(InputError):
        read_manifest(manifest)


def test_out_that_is_a_file_and_unknown_model_are_usage_errors(tmp_path, capsys):
    make_photos(tmp_path)
    (tmp_path / "m.csv").write_text("id,image\na,a.png\n")
    (tmp_path / "taken").write_text("a file")
    assert main(["batch", str(tmp_path / "m.csv"), "-o", str(tmp_path / "taken"), *GEN_ARGS]) == 2
    assert "taken" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "m.csv"), "-o", str(out), "--model", str(tmp_path / "nope"), *GEN_ARGS]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err
    assert not out.exists()
    assert main(["batch", str(tmp_path / "m.csv"), "-o", str(out), "--workers", "2", *GEN_ARGS]) == 2
    assert "--engine ray" in capsys.readouterr().err
