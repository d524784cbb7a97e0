"""Throughput of ``oxigaf batch``: images per minute, local engine against the Ray Data engine.

    python benchmarks/batch.py [--items 8] [--steps 2] [--guidance 1] [--json PATH]

Every configuration runs the same manifest (the bundled portrait and mirrored / rotated copies,
``--items`` rows) into a fresh output folder with the same model: the test fixtures' tiny random
ImageDream (tests/fixtures/imagedream_e2e/model: 256 px views, a 64-channel UNet, a 2-layer CLIP
vision tower; the views are noise, the work per item is the real pipeline's shape of work). Two
figures per configuration:

- ``end_to_end``: items / wall time of the whole ``run_batch`` call, model loading (and, for Ray,
  starting the local cluster and its actors) included;
- ``steady``: the items finished after the first ones / the time between the first and the last
  finished item (``finished`` timestamps in results.jsonl; the items saved within a second of the
  first one, the first chunk of each worker, only mark the start), i.e. what a long run converges to.

The machine is shared, so the load average at the start and end of each configuration is
recorded; compare configurations of one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "tests" / "fixtures" / "imagedream_e2e" / "model"
PORTRAIT = ROOT / "tests" / "fixtures" / "imagedream_e2e" / "input.png"

GROUP_SECONDS = 1.0
CONFIGS = [
    {"engine": "local", "batch_size": 1},
    {"engine": "local", "batch_size": 2},
    # Ray gives each actor OMP_NUM_THREADS = its CPUs (1 here); the same for the local engine:
    {"engine": "local", "batch_size": 2, "torch_threads": 1},
    {"engine": "ray", "workers": 1, "batch_size": 2},
    {"engine": "ray", "workers": 2, "batch_size": 2},
]


def _photos(folder: Path, items: int) -> Path:
    from PIL import Image

    portrait = Image.open(PORTRAIT).convert("RGB")
    variants = [portrait, portrait.transpose(Image.Transpose.FLIP_LEFT_RIGHT), portrait.rotate(5), portrait.rotate(-5)]
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["id,image"]
    for i in range(items):
        variants[i % len(variants)].save(folder / f"p{i:03d}.png")
        rows.append(f"p{i:03d},p{i:03d}.png")
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def _set_torch_threads(n: int | None) -> int | None:
    """Set torch's intra-op threads (this process only); returns the previous count."""
    if n is None:
        return None
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    return previous


def _one(manifest: Path, out: Path, settings, config: dict) -> dict:
    from oxigaf.batch import read_results, run_batch

    threads = _set_torch_threads(config.get("torch_threads"))
    load0 = os.getloadavg()[0]
    t0 = time.time()
    try:
        summary = run_batch(manifest, out, settings, engine=config["engine"], workers=config.get("workers", 1),
                            batch_size=config["batch_size"], progress=False)
    finally:
        _set_torch_threads(threads)
    wall = time.time() - t0
    finished = sorted(r["finished"] for r in read_results(out / "results.jsonl").values())
    # The first group of items saved together (the first chunk of each worker) only marks the start.
    first = sum(t <= finished[0] + GROUP_SECONDS for t in finished)
    span = finished[-1] - finished[0]
    steady = (len(finished) - first) / span * 60 if first < len(finished) and span > 0 else None
    return {**config, "ok": summary.ok, "failed": summary.failed, "wall_seconds": round(wall, 2),
            "end_to_end_images_per_minute": round(summary.ok / wall * 60, 2),
            "steady_images_per_minute": None if steady is None else round(steady, 2),
            "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--backend", default="torch")
    p.add_argument("--only", nargs="+", choices=["local", "ray"], default=["local", "ray"])
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "batch-cpu.json"))
    args = p.parse_args(argv)

    from oxigaf.batch import BatchSettings
    from oxigaf.config import DiffusionConfig

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no auth token under $HOME for a benchmark
    settings = BatchSettings(model=str(MODEL), backend=args.backend,
                             config=DiffusionConfig(num_inference_steps=args.steps, guidance_scale=args.guidance))
    work = Path(tempfile.mkdtemp(prefix="oxigaf-batch-bench-"))
    results = []
    try:
        manifest = _photos(work / "data", args.items)
        for i, config in enumerate(c for c in CONFIGS if c["engine"] in args.only):
            result = _one(manifest, work / f"out{i}", settings, config)
            results.append(result)
            print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
           "model": str(MODEL.relative_to(ROOT)), "items": args.items, "steps": args.steps,
           "guidance": args.guidance, "backend": args.backend, "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\n{'engine':8} {'workers':>7} {'batch':>5} {'threads':>7} {'end-to-end img/min':>19} "
          f"{'steady img/min':>15} {'wall s':>7} {'load':>11}")
    for r in results:
        threads = r.get("torch_threads") or ("1/actor" if r["engine"] == "ray" else "default")
        print(f"{r['engine']:8} {r.get('workers', '-'):>7} {r['batch_size']:>5} {threads:>7} "
              f"{r['end_to_end_images_per_minute']:>19} {r['steady_images_per_minute']!s:>15} "
              f"{r['wall_seconds']:>7} {r['load_average'][0]:>5}-{r['load_average'][1]:<5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
