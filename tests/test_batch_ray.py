"""``oxigaf batch --engine ray``: the same manifest and seeds give the same views and statuses as
the local engine. Skipped when ray is not installed (pip install 'oxigaf[ray]').

One Ray cluster per test session (each start costs seconds): 4 logical CPUs whatever the
machine has, so actors with fractional CPUs leave Ray Data's own tasks room to run.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.data")

from test_batch import GEN_ARGS, assert_same_views, make_photos, small_model, views_of, write_csv_manifest  # noqa: E402

from oxigaf.batch import BatchSettings, run_batch  # noqa: E402
from oxigaf.batch.engines.ray import cpus_per_worker  # noqa: E402
from oxigaf.cli import main  # noqa: E402
from oxigaf.config import DiffusionConfig  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # Without this, ray.init writes an auth token under $HOME.
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("raybatch")
    model = small_model(root / "imagedream64")
    photos = make_photos(root / "data")
    return {"root": root, "model": model, "manifest": write_csv_manifest(root / "data"), "photos": photos}


def _records(out):
    return {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def test_ray_engine_writes_the_same_views_and_statuses_as_local(ray_cluster, data, capsys):
    common = [str(data["manifest"]), "--model", str(data["model"]), "--batch-size", "2", *GEN_ARGS]
    local_out, ray_out = data["root"] / "local", data["root"] / "ray"
    assert main(["batch", *common, "-o", str(local_out)]) == 1
    assert main(["batch", *common, "-o", str(ray_out), "--engine", "ray", "--workers", "2"]) == 1
    assert "3 ok, 2 failed" in capsys.readouterr().err
    local, remote = _records(local_out), _records(ray_out)
    assert set(remote) == {"a", "b", "c", "bad", "miss"}
    for item_id, record in local.items():
        other = remote[item_id]
        assert (other["status"], other["settings_hash"], other["seed"]) == (
            record["status"], record["settings_hash"], record["seed"])
        if record["status"] == "ok":
            assert other["output"] == str(ray_out / item_id)
            assert_same_views(views_of(ray_out / item_id), views_of(local_out / item_id))
        else:
            assert other["error"] == record["error"]
    assert "bad.png" in remote["bad"]["error"] and "nothere.png" in remote["miss"]["error"]
    assert sorted(p.name for p in ray_out.iterdir()) == ["a", "b", "c", "results.jsonl"]
    # Resume works across engines: the local engine finds nothing left to do but the failures.
    settings = BatchSettings(model=str(data["model"]), backend="torch",
                             config=DiffusionConfig(num_inference_steps=2, guidance_scale=1.0))
    summary = run_batch(data["manifest"], ray_out, settings, progress=False)
    assert (summary.ok, summary.failed, summary.skipped) == (0, 2, 3)


def test_ray_unknown_model_is_a_usage_error(ray_cluster, data, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["batch", str(data["manifest"]), "-o", str(out), "--model", str(tmp_path / "nope"), "--engine", "ray",
               *GEN_ARGS])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "nope" in err
    assert not out.exists()


def test_workers_leave_ray_data_a_cpu():
    assert cpus_per_worker(4, 2) == 1.0
    assert cpus_per_worker(4, 4) == 0.75
    assert cpus_per_worker(2, 1) == 1.0
    assert cpus_per_worker(1, 2) == 0.25
    assert np.isclose(cpus_per_worker(64, 8), 1.0)
