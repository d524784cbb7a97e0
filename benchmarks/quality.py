"""Novel-view quality of the shipped toy model on held-out toy heads, against baselines.

    python benchmarks/quality.py --subjects 8 --seed 2000000 [--json PATH] [--sweep] [--backends torch,mlx]
        [--model DIR] [--plot PNG] [--views PNG]

For each held-out subject (seeds ``S .. S+N-1``, outside ``toys.TRAIN_SEED_RANGE``) the front
view is the input; the model generates the input's own view (azimuth 0, scored apart under
``input_view``) with the trained azimuths (90, 180, 270) or with unseen ones (45, 135, 225), at
the library's default settings (``DiffusionConfig()``: 50 DDIM steps, guidance 5). PSNR and SSIM
against ``toys.render``'s ground truth. Baselines: the input copied to every view; the leave-one-out mean of the other
held-out subjects' ground truth at that camera; the same architecture with random weights.
``--sweep`` adds steps 10/25/50, guidance 1/3/5 and the upsampler (none, bilinear) on the first
backend. Torch and MLX run side by side, with their largest per-pixel difference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "backends" / "torch", ROOT / "backends" / "mlx"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from PIL import Image  # noqa: E402

from oxigaf import DiffusionConfig, Pipeline, toys  # noqa: E402
from oxigaf.cameras import CameraParams  # noqa: E402
from oxigaf.images import to_uint8  # noqa: E402

TRAINED = (90.0, 180.0, 270.0)
UNSEEN = (45.0, 135.0, 225.0)


def ssim(a, b) -> float:
    try:
        from skimage.metrics import structural_similarity
    except ImportError:  # the same definition in numpy
        return toys.ssim(a, b)
    return float(structural_similarity(a, b, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


def metrics(pred: np.ndarray, truth: np.ndarray) -> dict:
    return {"psnr": [toys.psnr(p, t) for p, t in zip(pred, truth, strict=True)],
            "ssim": [ssim(p, t) for p, t in zip(pred, truth, strict=True)]}


def random_model(model: Path, seed: int = 0) -> Path:
    """A copy of the toy model whose UNet has random weights (same architecture, same recipe as the demo's)."""
    from safetensors.numpy import load_file, save_file

    from oxigaf.synthetic import random_weights

    dst = Path(tempfile.mkdtemp(prefix="oxigaf-random-")) / "model"
    shutil.copytree(model, dst)
    f = dst / "unet" / "diffusion_pytorch_model.safetensors"
    shapes = {k: list(v.shape) for k, v in load_file(str(f)).items()}
    save_file(random_weights(shapes, seed), str(f))
    return dst


def summarise(rows: list[dict]) -> dict:
    out = {}
    for key in ("psnr", "ssim"):
        vals = np.array([r[key] for r in rows])  # (subjects, views)
        out[key] = float(vals.mean())
        out[f"{key}_per_view"] = vals.mean(0).round(4).tolist()
    return out


def run(args) -> dict:
    seeds = list(range(args.seed, args.seed + args.subjects))
    lo, hi = toys.TRAIN_SEED_RANGE
    if any(lo <= s < hi for s in seeds):
        raise SystemExit(f"--seed {args.seed}: seeds {lo}..{hi - 1} are the training subjects; pick held-out ones")
    size = 64
    groups = {"trained": [CameraParams(a) for a in TRAINED], "unseen": [CameraParams(a) for a in UNSEEN]}
    truth = {g: {s: toys.render(s, [CameraParams(0.0)] + cams, size)[0] for s in seeds}
             for g, cams in groups.items()}
    fronts = {s: truth["trained"][s][0] for s in seeds}
    report: dict = {"subjects": seeds, "settings": "DiffusionConfig() defaults (50 steps, guidance 5)",
                    "results": {}, "input_view": {}}

    for g, cams in groups.items():
        base_copy, base_mean = [], []
        for s in seeds:
            gt = truth[g][s][1:]
            base_copy.append(metrics(np.repeat(fronts[s][None], len(cams), 0), gt))
            others = np.mean([truth[g][o][1:] for o in seeds if o != s], axis=0)
            base_mean.append(metrics(others, gt))
        report["results"][f"{g}/copy input"] = summarise(base_copy)
        report["results"][f"{g}/leave-one-out mean"] = summarise(base_mean)

    def evaluate(label, pipe, config_kw=None, keep=None):
        for g, cams in groups.items():
            rows = []
            fronts_out = []
            for s in seeds:
                photo = Image.fromarray(to_uint8(fronts[s]))
                # Azimuth 0 (the input's own view) is generated too, as with the default cameras:
                # the model was trained on 4 views plus the reference; it is scored apart.
                out = pipe.generate(photo, cameras=[CameraParams(0.0)] + cams, progress=False, **(config_kw or {}))
                images = out.images if out.images.shape[1] == size else _down(out.images, size)
                rows.append(metrics(images[1:], truth[g][s][1:]))
                fronts_out.append(metrics(images[:1], truth[g][s][:1]))
                if keep is not None:
                    keep[(g, s)] = images[1:]
            report["results"][f"{g}/{label}"] = summarise(rows)
            report["input_view"][f"{g}/{label}"] = summarise(fronts_out)
            print(f"{g:8s} {label:32s} PSNR {report['results'][f'{g}/{label}']['psnr']:.2f} dB "
                  f"SSIM {report['results'][f'{g}/{label}']['ssim']:.3f}", flush=True)

    model = args.model or toys.model_path()
    views = {}
    backends = [b for b in args.backends.split(",") if b]
    for b in backends:
        t0 = time.time()
        pipe = Pipeline.from_pretrained(model, backend=b, config=DiffusionConfig())
        views[b] = {}
        evaluate(f"toy model ({b})", pipe, keep=views[b])
        report["results"][f"seconds/{b}"] = time.time() - t0
    if len(backends) == 2:
        a, c = backends
        report["max_abs_diff_torch_mlx"] = float(max(np.abs(views[a][k] - views[c][k]).max() for k in views[a]))
        print(f"largest per-pixel difference {a} vs {c}: {report['max_abs_diff_torch_mlx']:.4f}")
    if args.views:
        side_by_side(views, truth, seeds[0], args.views)
    rnd = random_model(model)
    evaluate("random weights", Pipeline.from_pretrained(rnd, backend=backends[0]))
    shutil.rmtree(rnd.parent, ignore_errors=True)
    if args.sweep:
        pipe = Pipeline.from_pretrained(model, backend=backends[0])
        for steps in (10, 25):
            evaluate(f"steps {steps}", pipe, {"num_inference_steps": steps})
        for guidance in (1.0, 3.0):
            evaluate(f"guidance {guidance:g}", pipe, {"guidance_scale": guidance})
        up = Pipeline.from_pretrained(model, backend=backends[0], upsampler="bilinear")
        evaluate("bilinear upsampler (128 px, compared at 64)", up)
    best = max(report["results"][f"trained/{k}"]["psnr"] for k in ("copy input", "leave-one-out mean"))
    for b in backends:
        gain = report["results"][f"trained/toy model ({b})"]["psnr"] - best
        report[f"gain_over_best_baseline_db/{b}"] = gain
        print(f"{b}: toy model vs best baseline at trained azimuths: {gain:+.2f} dB")
    return report


def _down(images: np.ndarray, size: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(to_uint8(v)).resize((size, size), Image.BILINEAR), np.float32) / 255
                     for v in images])


def print_table(report: dict) -> None:
    print("\n| cameras | method | PSNR (dB) | SSIM |\n|---|---|---|---|")
    for key, r in report["results"].items():
        if isinstance(r, dict):
            g, label = key.split("/", 1)
            print(f"| {g} | {label} | {r['psnr']:.2f} | {r['ssim']:.3f} |")


def write_atomically(path: Path, save) -> None:
    """``save(tmp)`` into a temporary name beside ``path`` (same suffix, so image writers know the
    format), then renamed over it: an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    save(tmp)
    tmp.replace(path)


def side_by_side(views: dict, truth: dict, seed: int, path: Path) -> None:
    """One subject's views: a row per backend, the ground truth below; the input on the left;
    the trained azimuths, then the unseen ones."""
    rows = [np.concatenate([views[b][("trained", seed)], views[b][("unseen", seed)]]) for b in views]
    rows.append(np.concatenate([truth["trained"][seed][1:], truth["unseen"][seed][1:]]))
    size = rows[0].shape[1]
    sheet = np.full((len(rows) * size, (rows[0].shape[0] + 1) * size + 4, 3), 255, np.uint8)
    sheet[:size, :size] = to_uint8(truth["trained"][seed][0])
    for r, row in enumerate(rows):
        for i, v in enumerate(row):
            sheet[r * size:(r + 1) * size, size + 4 + i * size:size + 4 + (i + 1) * size] = to_uint8(v)
    img = Image.fromarray(sheet).resize((sheet.shape[1] * 3, sheet.shape[0] * 3), Image.NEAREST)
    write_atomically(path, img.save)


def plot(report: dict, path: Path) -> None:
    """PSNR per method, at the trained and the unseen azimuths (bars), one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [k.split("/", 1)[1] for k in report["results"] if k.startswith("trained/")]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(methods) + 1.2))
    y = np.arange(len(methods))
    for off, group, colour in ((-0.2, "trained", "tab:blue"), (0.2, "unseen", "tab:orange")):
        vals = [report["results"].get(f"{group}/{m}", {}).get("psnr", np.nan) for m in methods]
        ax.barh(y + off, vals, height=0.4, color=colour, label=f"{group} azimuths")
    ax.set_yticks(y, methods)
    ax.invert_yaxis()
    ax.set_xlabel("novel-view PSNR (dB), higher is better")
    ax.set_title(f"toy heads held out from training: {len(report['subjects'])} subjects, "
                 f"seeds {report['subjects'][0]}..{report['subjects'][-1]}")
    ax.legend(loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--seed", type=int, default=toys.HELD_OUT_SEED + 1000)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--backends", default="torch,mlx")
    ap.add_argument("--model", type=Path, default=None, help="a pipeline folder (default: toys.model_path())")
    ap.add_argument("--sweep", action="store_true", help="steps, guidance and upsampler on the first backend")
    ap.add_argument("--plot", type=Path, default=None, help="write a bar chart of PSNR per method (PNG)")
    ap.add_argument("--views", type=Path, default=None,
                    help="write the first subject's views (a row per backend, ground truth below; PNG)")
    args = ap.parse_args(argv)
    if args.subjects < 2:
        raise SystemExit("--subjects must be >= 2 (the leave-one-out baseline needs others)")
    report = run(args)
    print_table(report)
    if args.json:
        write_atomically(args.json, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
