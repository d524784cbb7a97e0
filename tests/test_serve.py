"""``oxigaf serve``: a real server on 127.0.0.1 (the shipped toy model, torch), driven by gradio_client,
and by raw HTTP where a well-behaved client would not send the request at all."""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import uuid
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import drain, server

from oxigaf import toys
from oxigaf.errors import ConfigError, InputError
from oxigaf.images import load_image, to_uint8
from oxigaf.serve import checks
from oxigaf.serve.runs import RunStore, turntable

gradio_client = pytest.importorskip("gradio_client")
httpx = pytest.importorskip("httpx")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

STEPS = 2
MAX_UPLOAD_MB = 1
KEEP = 3


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve") / "out"
    with server(root, "--max-upload-mb", str(MAX_UPLOAD_MB), "--keep", str(KEEP), "--steps", str(STEPS)) as s:
        yield s


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def client(served, downloads):
    c = Client(served[0], verbose=False, download_files=str(downloads))
    yield c
    c.close()  # its heartbeat stream would hold the server's shutdown


@pytest.fixture(scope="module")
def pipe():
    from oxigaf.pipeline import Pipeline

    return Pipeline.from_pretrained(toys.model_path(), backend="torch")


@pytest.fixture(scope="module")
def head(served) -> Path:
    return served[1] / "examples" / "toy_head.png"


def reference(pipe, photo, azimuths, elevation, steps, guidance, ip_weight, seed):
    return pipe.generate(load_image(photo), cameras=azimuths, elevation=elevation, num_inference_steps=steps,
                         guidance_scale=guidance, seed=seed, ip_weight=ip_weight, progress=False)


def pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def assert_same_views(result, ref, azimuths):
    gallery, spin, archive = result
    assert [item["caption"] for item in gallery] == [f"azimuth {a:g}°" for a in azimuths]
    assert len(gallery) == len(ref.views)
    for item, view in zip(gallery, ref.views, strict=True):
        np.testing.assert_array_equal(pixels(item["image"]), np.asarray(view))
    with Image.open(spin) as gif:
        assert gif.format == "GIF" and gif.n_frames == len(azimuths)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels and whose data is a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def raw_call(url: str, data: list) -> dict:
    """Join the queue of /generate with ``data`` exactly as given (no client-side upload) and return
    the final message."""
    config = httpx.get(url + "config").json()
    fn = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "generate")
    session = uuid.uuid4().hex[:10]
    r = httpx.post(url + "gradio_api/queue/join",
                   json={"data": data, "fn_index": fn, "session_hash": session, "event_data": None,
                         "trigger_id": None})
    r.raise_for_status()
    with httpx.stream("GET", url + f"gradio_api/queue/data?session_hash={session}", timeout=120) as s:
        for line in s.iter_lines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("msg") == "process_completed":
                    return msg
    raise AssertionError("the queue's stream ended without a result")


# --------------------------------------------------------------------------- end to end


def test_generate_equals_pipeline(served, client, pipe, head, tmp_path):
    url, root, _ = served
    args = ("0, 90, 180, 270", 0.0, STEPS, 5.0, 1.0, 7)
    job = client.submit(handle_file(str(head)), *args, api_name="/generate")
    result = job.result(timeout=300)
    ref = reference(pipe, head, [0.0, 90.0, 180.0, 270.0], 0.0, STEPS, 5.0, 1.0, 7)
    assert_same_views(result, ref, [0, 90, 180, 270])
    # per-step progress reached the client
    steps = [u.progress_data[0].index for u in drain(job) if getattr(u, "progress_data", None)
             and u.progress_data[0].desc == "denoising"]
    assert steps == list(range(1, STEPS + 1))
    # the zip is the output folder exactly as MultiViewOutput.save writes it
    ref_folder = ref.save(tmp_path / "ref")
    with zipfile.ZipFile(result[2]) as zf:
        names = zf.namelist()
        top = {n.split("/")[0] for n in names}
        assert len(top) == 1 and next(iter(top)).startswith("oxigaf-")
        inside = sorted(n.split("/", 1)[1] for n in names)
        assert inside == sorted(p.name for p in ref_folder.iterdir())
        for i, view in enumerate(ref.views):
            data = zf.read(f"{next(iter(top))}/view_{i:02d}.png")
            np.testing.assert_array_equal(pixels(io.BytesIO(data)), np.asarray(view))
        for name in ("cameras.json", "transforms.json"):
            assert json.loads(zf.read(f"{next(iter(top))}/{name}")) == json.loads((ref_folder / name).read_text())
    # the example is the held-out toy head's front view at the model's size
    front = toys.render(toys.HELD_OUT_SEED, [0.0], pipe.native_size)[0][0]
    np.testing.assert_array_equal(pixels(head), to_uint8(front))


def test_fit_3d_gaussians_to_the_last_views(served, client, head, downloads, tmp_path):
    from oxigaf.plugins import get_backend
    from oxigaf.serve import fit3d
    from oxigaf.splat.ply import load_ply

    url = served[0]
    fresh = Client(url, verbose=False, download_files=str(downloads))
    with pytest.raises(AppError, match="generate views first"):  # a new page has no views yet
        fresh.predict(200, 3, api_name="/fit")
    fresh.close()
    result = client.predict(handle_file(str(head)), "0, 90, 180, 270", 0.0, STEPS, 5.0, 1.0, 7, api_name="/generate")
    with pytest.raises(AppError, match=r"gaussians must be an integer in \[100, 20000\]; got 50"):
        client.predict(50, 3, api_name="/fit")
    model, ply = client.predict(200, 3, api_name="/fit")
    fitted = load_ply(ply)
    assert len(fitted) == 200 and Path(model).suffix == ".ply"
    # the same fit, run here on the views the zip holds
    with zipfile.ZipFile(result[2]) as zf:
        zf.extractall(tmp_path)
    folder = next(tmp_path.glob("oxigaf-*"))
    mine = load_ply(fit3d.fit(folder, 200, 3, get_backend("torch")))
    for name, value in mine.raw().items():
        np.testing.assert_array_equal(fitted.raw()[name], value, err_msg=name)


def test_four_clients_at_once(served, pipe, head, downloads):
    url, root, _ = served
    asks = [("0, 180", 0.0, 5.0, 1.0, 11), ("0, 90, 180, 270", 10.0, 3.0, 0.5, 12), ("45", -10.0, 7.5, 1.0, 13),
            ("0 120 240", 20.0, 5.0, 2.0, 14)]
    clients = [Client(url, verbose=False, download_files=str(downloads)) for _ in asks]
    start = threading.Barrier(len(asks))
    jobs = [None] * len(asks)

    def submit(i):
        az, el, g, ipw, seed = asks[i]
        start.wait()
        jobs[i] = clients[i].submit(handle_file(str(head)), az, el, STEPS, g, ipw, seed, api_name="/generate")

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(asks))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [job.result(timeout=600) for job in jobs]
    elapsed = time.monotonic() - t0
    for c in clients:
        c.close()
    assert elapsed < 600
    spans, ranks = [], []
    for job, result, (az, el, g, ipw, seed) in zip(jobs, results, asks, strict=True):
        azimuths = checks.azimuths(az)
        assert_same_views(result, reference(pipe, head, azimuths, el, STEPS, g, ipw, seed), azimuths)
        updates = drain(job)
        ranks += [u.rank for u in updates if getattr(u, "rank", None) is not None]
        times = [u.time for u in updates if getattr(u, "progress_data", None)
                 and u.progress_data[0].desc == "denoising"]
        spans.append((min(times), max(times)))
    # ip_weight reached the pipeline: the request with 2.0 differs from the same request with 1.0
    az, el, g, ipw, seed = asks[3]
    unweighted = reference(pipe, head, checks.azimuths(az), el, STEPS, g, 1.0, seed)
    assert not np.array_equal(pixels(results[3][0][0]["image"]), np.asarray(unweighted.views[0]))
    # one request at a time: no two requests' denoising overlaps, and the later ones waited in line
    spans.sort()
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:], strict=False)), spans
    assert max(ranks) >= 1
    # each request got its own folder; only the newest KEEP are kept, and no temporary one is left
    left = sorted((root / "runs").iterdir())
    assert len(left) == KEEP and not any(p.name.startswith(".") for p in left)


# --------------------------------------------------------------------------- bad input


BAD_FILES = {
    "not an image": (b"hello, I am text", "notes.png", "is not an image"),
    "empty": (b"", "empty.png", "is empty"),
    "over 40 megapixels": (png_header_only(8000, 6000), "huge.png", "48.0 megapixels; the limit is 40"),
    "a decompression bomb": (png_header_only(30000, 30000), "bomb.png", "the limit is 40 megapixels"),
    "truncated": (png_header_only(64, 64), "cut.png", "cannot decode"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_gets_a_message(client, tmp_path, case):
    data, name, message = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(str(path)), "0", 0.0, STEPS, 5.0, 1.0, 0, api_name="/generate")


BAD_SETTINGS = {
    "no views": ({"azimuths": ""}, "azimuths is empty"),
    "views not numbers": ({"azimuths": "front, back"}, "'front' is not one"),
    "too many views": ({"azimuths": " ".join(["0"] * 17)}, "names 17 views; the most this server makes is 16"),
    "azimuth out of range": ({"azimuths": "0, 400"}, r"each azimuth must be in \[-360, 360\]"),
    "elevation": ({"elevation": 95.0}, r"elevation must be in \[-89, 89\]; got 95"),
    "steps zero": ({"steps": 0}, r"steps must be in \[1, 200\]; got 0"),
    "steps too many": ({"steps": 5000}, r"steps must be in \[1, 200\]; got 5000"),
    "steps fractional": ({"steps": 2.5}, "steps must be a whole number"),
    "guidance": ({"guidance": 50.0}, r"guidance must be in \[1, 20\]; got 50"),
    "ip_weight": ({"ip_weight": -1.0}, r"ip_weight must be in \[0, 3\]; got -1"),
    "seed negative": ({"seed": -1}, r"seed must be in \[0, 4294967295\]; got -1"),
    "seed not a number": ({"seed": "lucky"}, "seed must be an integer"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_setting_gets_a_message(client, head, case):
    changes, message = BAD_SETTINGS[case]
    args = {"azimuths": "0", "elevation": 0.0, "steps": STEPS, "guidance": 5.0, "ip_weight": 1.0, "seed": 0}
    args.update(changes)
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(str(head)), *args.values(), api_name="/generate")


def test_no_photo_gets_a_message(client):
    with pytest.raises(AppError, match="no photo"):
        client.predict(None, "0", 0.0, STEPS, 5.0, 1.0, 0, api_name="/generate")


def test_upload_over_the_limit_is_refused(served, client, tmp_path):
    url = served[0]
    big = tmp_path / "big.png"
    big.write_bytes(png_header_only(64, 64) + bytes(MAX_UPLOAD_MB * 1_000_000))
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # the client checks first
        client.predict(handle_file(str(big)), "0", 0.0, STEPS, 5.0, 1.0, 0, api_name="/generate")
    r = httpx.post(url + "gradio_api/upload", files={"files": ("big.png", big.read_bytes())})
    assert r.status_code == 413 and "maximum allowed size" in r.text
    with pytest.raises(InputError, match=r"is 1\.0 MB; the limit is 0\.5 MB"):  # the handler checks again
        checks.open_photo(big, max_bytes=500_000)


def test_animated_image_uses_its_first_frame(client, pipe, head, tmp_path):
    first = Image.open(head).convert("RGB")
    second = Image.new("RGB", first.size, (0, 200, 0))
    gif = tmp_path / "anim.gif"
    first.save(gif, save_all=True, append_images=[second], duration=100, loop=0)
    job = client.submit(handle_file(str(gif)), "0, 180", 0.0, STEPS, 5.0, 1.0, 5, api_name="/generate")
    result = job.result(timeout=300)
    logs = [u.log for u in drain(job) if getattr(u, "log", None)]
    assert ("anim.gif is animated (2 frames): its first frame is used", "warning") in logs
    with Image.open(gif) as img:
        frame0 = img.convert("RGB")
    assert_same_views(result, reference(pipe, frame0, [0.0, 180.0], 0.0, STEPS, 5.0, 1.0, 5), [0, 180])


def test_a_path_outside_the_uploads_is_refused(served):
    url, root, _ = served
    for path in ("/etc/hostname", str(root / "examples" / "toy_head.png"), str(toys.model_path() / "model_index.json"),
                 str(root / ".gradio" / "files" / ".." / ".." / ".." / "x")):
        msg = raw_call(url, [{"path": path, "meta": {"_type": "gradio.FileData"}}, "0", 0.0, STEPS, 5.0, 1.0, 0])
        assert msg["success"] is False
        assert "not uploaded by a user" in (msg["output"]["error"] or ""), msg


def test_serves_no_file_outside_its_folder(served, client, head):
    url, root, _ = served
    repo = Path(__file__).resolve().parents[1]
    for path in ("/etc/passwd", str(repo / "README.md"), str(toys.model_path() / "model_index.json"),
                 str(root / ".." / "out-server.log"), "../../../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd"):
        r = httpx.get(url + "gradio_api/file=" + path)
        assert r.status_code in (403, 404), (path, r.status_code)
    # what it serves lies under its own folder
    msg = raw_call(url, [handle_upload(url, head), "0", 0.0, STEPS, 5.0, 1.0, 0])
    assert msg["success"], msg
    files = [item["image"] for item in msg["output"]["data"][0]] + msg["output"]["data"][1:3]  # views, gif, zip
    for f in files:
        assert Path(f["path"]).resolve().is_relative_to(root.resolve()), f["path"]
        assert httpx.get(f["url"]).status_code == 200


def handle_upload(url: str, path: Path) -> dict:
    r = httpx.post(url + "gradio_api/upload", files={"files": (path.name, path.read_bytes())})
    r.raise_for_status()
    return {"path": r.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def test_still_answers_after_bad_input(served, client, pipe, head):
    result = client.predict(handle_file(str(head)), "90", 0.0, STEPS, 5.0, 1.0, 9, api_name="/generate")
    assert_same_views(result, reference(pipe, head, [90.0], 0.0, STEPS, 5.0, 1.0, 9), [90])
    assert served[2].poll() is None


# --------------------------------------------------------------------------- the parts, without a server


@pytest.mark.parametrize("args, message", [(["--port", "0"], "--port must be in 1..65535; got 0"),
                                           (["--steps", "0"], r"steps must be in \[1, 200\]; got 0"),
                                           (["--keep", "0"], "--keep must be >= 1; got 0")])
def test_bad_options_exit_2_with_a_message(args, message):
    import re
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "oxigaf.cli", "serve", *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and re.search(message, r.stderr), r.stderr


def test_checks_name_the_problem():
    assert checks.number(3.0, "steps") == 3 and isinstance(checks.number(3.0, "steps"), int)
    assert checks.number("2", "seed") == 2
    for bad in (True, None, float("nan"), float("inf"), [1]):
        with pytest.raises(ConfigError, match="guidance must be a number"):
            checks.number(bad, "guidance")
    assert checks.azimuths("0, 90 180,270") == [0.0, 90.0, 180.0, 270.0]
    with pytest.raises(ConfigError, match="azimuths must be text"):
        checks.azimuths(None)
    assert checks.even_azimuths(3) == "0, 120, 240"
    with pytest.raises(ConfigError, match="views must be an integer"):
        checks.even_azimuths(0)


def test_run_store_keeps_the_newest_and_writes_whole_folders(tmp_path):
    class Result:
        def __init__(self, fail=False):
            self.views = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(3)]
            self.cameras = [type("C", (), {"azimuth": a})() for a in (270.0, 0.0, 90.0)]
            self.fail = fail

        def save(self, folder):
            folder.mkdir()
            (folder / "view_00.png").write_bytes(b"x")
            if self.fail:
                raise OSError("disk full")
            return folder

    store = RunStore(tmp_path, keep=2)
    runs = [store.write(Result()) for _ in range(3)]
    assert [p.name for p in store.finished()] == [r.id for r in runs[1:]]
    with pytest.raises(InputError, match="disk full"):
        store.write(Result(fail=True))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [r.id for r in runs[1:]]
    with zipfile.ZipFile(runs[-1].zip) as zf:
        assert zf.namelist() == [f"oxigaf-{runs[-1].id}/view_00.png"]
    with pytest.raises(ConfigError, match="keep"):
        RunStore(tmp_path, keep=0)


def test_turntable_goes_round_in_azimuth_order(tmp_path):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    views = [Image.new("RGB", (8, 8), c) for c in colors]
    cams = [type("C", (), {"azimuth": a})() for a in (270.0, -89.5, 90.0)]  # -89.5 is 270.5 round the circle
    path = turntable(views, cams, tmp_path / "t.gif")
    with Image.open(path) as gif:
        seen = []
        for i in range(gif.n_frames):
            gif.seek(i)
            seen.append(tuple(np.asarray(gif.convert("RGB"))[0, 0]))
    assert seen == [colors[2], colors[0], colors[1]]
