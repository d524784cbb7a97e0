"""GAF's ablation in miniature, on held-out toy heads: what oxigaf's views and refinement add to a 3D fit.

Methods (all fits start alike: the frames' visual hull, the same seed, steps and Gaussians):
  input_only  fit to the input: the front photo (with --video also frames at ±15°)
  generated   the input plus the shipped toy model's generated views at azimuths 90, 180, 270
  refined     generated, then GAF's loop (oxigaf.splat.loop): renders refined by the
              normal-conditioned toy model with the subject's bare-shape template normals
Scores: PSNR and SSIM of the fitted Gaussians rendered at cameras never used for fitting
(azimuths 45, 135, 225, 315 at elevations 0 and 15) against toys.render.

  python benchmarks/gaf_loop.py --subjects 2 --seed 0 --json benchmarks/results/gaf_loop.json --out /tmp/gaf
  python benchmarks/gaf_loop.py --fit-timing --json benchmarks/results/fit_timing.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oxigaf import toys  # noqa: E402
from oxigaf.cameras import CameraParams  # noqa: E402
from oxigaf.splat import render, save_ply  # noqa: E402
from oxigaf.splat.fit import Fitter, Frames, initial_gaussians  # noqa: E402
from oxigaf.splat.loop import gaf_loop  # noqa: E402

METHODS = ("input_only", "generated", "refined")
HELD_OUT = [CameraParams(a, e) for e in (0.0, 15.0) for a in (45.0, 135.0, 225.0, 315.0)]
SIZE = 64


def input_frames(seed: int, video: bool) -> Frames:
    azimuths = [0.0, -15.0, 15.0] if video else [0.0]
    return Frames.from_cameras(toys.render(seed, azimuths, SIZE)[0], [CameraParams(a) for a in azimuths])


def fit_method(method, seed, frames, pipes, args, out_dir: Path):
    t0 = time.perf_counter()
    photo = frames.images[0]
    if method != "input_only":
        cams = [CameraParams(a) for a in (90.0, 180.0, 270.0)]
        result = pipes["generate"].generate(_pil(photo), cameras=[CameraParams(0.0)] + cams, seed=args.seed,
                                            progress=False)
        frames = frames + Frames.from_cameras(np.asarray(result.images[1:], np.float32), cams)
    start = initial_gaussians(frames, args.gaussians, args.seed)
    fitter = Fitter(frames, start, iterations=args.iterations, seed=args.seed, backend=args.backend,
                    densify=args.densify)
    if method == "refined":
        gaf_loop(fitter, None, photo, rounds=args.rounds, seed=args.seed, pipeline=pipes["refine"],
                 template=lambda c, s: toys.template_normals(seed, c, s), accumulate=args.accumulate)
    else:
        fitter.run(args.iterations)
    g = fitter.gaussians()
    seconds = time.perf_counter() - t0
    save_ply(g, out_dir / str(seed) / method / "point_cloud.ply")
    renders = render(g, HELD_OUT, SIZE, backend=args.backend)
    return g, renders, seconds, len(frames)


def _pil(image):
    from PIL import Image

    from oxigaf.images import to_uint8

    return Image.fromarray(to_uint8(image))


def picture(rows: list[np.ndarray], path: Path) -> None:
    """Rows of views (methods, then the ground truth), columns the held-out cameras; 3x nearest upscale."""
    from PIL import Image

    from oxigaf.images import to_uint8

    sheet = np.concatenate([np.concatenate(list(r), 1) for r in rows], 0)
    img = Image.fromarray(to_uint8(sheet))
    img.resize((img.width * 3, img.height * 3), Image.NEAREST).save(path)


def fit_timing(args) -> dict:
    seed = toys.HELD_OUT_SEED + args.seed
    cams = [CameraParams(a) for a in toys.training_azimuths(8)]
    frames = Frames.from_cameras(toys.render(seed, cams, SIZE)[0], cams)
    start = initial_gaussians(frames, 5000, args.seed)
    fitter = Fitter(frames, start, iterations=500, seed=args.seed, backend=args.backend)
    steps = args.timing_steps
    t0 = time.perf_counter()
    fitter.run(steps)
    seconds = time.perf_counter() - t0
    held = render(fitter.gaussians(), HELD_OUT, SIZE, backend=args.backend)
    truth = toys.render(seed, HELD_OUT, SIZE)[0]
    return {"case": "fit 8 views 64 px, 5000 Gaussians, 500 iterations", "backend": args.backend,
            "steps_timed": steps, "seconds": seconds, "seconds_per_step": seconds / steps,
            "seconds_for_500": 500 * seconds / steps, "extrapolated": steps != 500, "final_loss": fitter.loss,
            "subject": seed, "torch_threads": _threads(),
            "held_out_psnr": float(np.mean([toys.psnr(a, b) for a, b in zip(held, truth, strict=True)])),
            "load_average": os.getloadavg(), "cpu_count": os.cpu_count(), "machine": platform.processor()}


def _threads():
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="subjects are held-out toy heads HELD_OUT_SEED + seed + k")
    ap.add_argument("--json", default=None)
    ap.add_argument("--out", default="gaf_loop_out")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--gaussians", type=int, default=2000)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--densify", action="store_true")
    ap.add_argument("--accumulate", action="store_true", help="refined: keep every round's refined views")
    ap.add_argument("--video", action="store_true", help="input: the front photo and frames at ±15°")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--picture", default=None, help="write the first subject's comparison picture here")
    ap.add_argument("--fit-timing", action="store_true", help="time one fit of 8 views (64 px, 5000, 500)")
    ap.add_argument("--timing-steps", type=int, default=500,
                    help="with --fit-timing: steps actually run (fewer: the 500-step time is extrapolated)")
    args = ap.parse_args(argv)
    if args.fit_timing:
        rows = [fit_timing(args)]
    else:
        from oxigaf.pipeline import Pipeline

        methods = [m for m in args.methods.split(",") if m]
        pipes = {"generate": Pipeline.from_pretrained(toys.model_path(), backend=args.backend),
                 "refine": Pipeline.from_pretrained(toys.model_path(normals=True), backend=args.backend)}
        out_dir = Path(args.out)
        rows = []
        for k in range(args.subjects):
            seed = toys.HELD_OUT_SEED + args.seed + k
            frames = input_frames(seed, args.video)
            truth = toys.render(seed, HELD_OUT, SIZE)[0]
            pics = []
            for method in methods:
                _, renders, seconds, count = fit_method(method, seed, frames, pipes, args, out_dir)
                psnr = [toys.psnr(a, b) for a, b in zip(renders, truth, strict=True)]
                ssim = [toys.ssim(a, b) for a, b in zip(renders, truth, strict=True)]
                row = {"subject": seed, "method": method, "frames": count, "psnr": psnr, "ssim": ssim,
                       "mean_psnr": float(np.mean(psnr)), "mean_ssim": float(np.mean(ssim)), "seconds": seconds,
                       "gaussians": args.gaussians, "iterations": args.iterations, "backend": args.backend}
                rows.append(row)
                pics.append(renders)
                print(f"subject {seed} {method:10s} PSNR {row['mean_psnr']:.2f} dB SSIM {row['mean_ssim']:.3f} "
                      f"({seconds:.0f} s)", flush=True)
            if k == 0 and args.picture:
                picture(pics + [truth], Path(args.picture))
            _write(args.json, rows, args)
        for method in methods:
            sel = [r for r in rows if r["method"] == method]
            print(f"{method:10s} mean PSNR {np.mean([r['mean_psnr'] for r in sel]):.2f} dB, "
                  f"SSIM {np.mean([r['mean_ssim'] for r in sel]):.3f} over {len(sel)} subjects")
    _write(args.json, rows, args)
    if args.fit_timing:
        print(json.dumps(rows[0], indent=1))
    return 0


def _write(path, rows, args) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
