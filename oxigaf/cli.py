"""The ``oxigaf`` command: ``generate``, ``demo`` and ``info``.

Every error oxigaf raises on purpose becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

from .config import ATTENTION_MODES, DTYPES, DiffusionConfig
from .errors import InputError, OxigafError

DEFAULT_MODEL = "ashawkey/imagedream-ipmv-diffusers"
DEFAULT_UPSAMPLER = "stabilityai/sd-x2-latent-upscaler"


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _add_generation_args(p: argparse.ArgumentParser, *, model_default: str | None) -> None:
    p.add_argument("-o", "--output", required=True, help="output folder (view_00.png …, grid.png, cameras.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    if model_default is not None:
        p.add_argument("--model", default=model_default, help=f"model folder or hub id (default {model_default})")
        p.add_argument("--upsampler", default=None,
                       help=f"none, 'bilinear', or an sd-x2 folder / hub id (e.g. {DEFAULT_UPSAMPLER}) for 512 px")
    p.add_argument("--backend", default="auto", help="mlx, torch or auto (default)")
    p.add_argument("--device", default=None, help="backend device: cpu, cuda, cuda:1, mps, gpu")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--views", type=int, default=4, help="number of views (default 4)")
    p.add_argument("--azimuths", type=_floats, default=None,
                   help="comma-separated azimuths in degrees (0 = input view; overrides --views)")
    p.add_argument("--elevation", type=float, default=0.0, help="camera elevation in degrees (default 0)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance, 1.0-20.0 (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="", help="text prompt (required for text-only MVDream)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--size", type=int, default=None, help="output size: 256, or 512 with an upsampler")
    p.add_argument("--attention", default="auto", choices=ATTENTION_MODES)
    p.add_argument("--low-memory", action="store_true", help="release models as soon as they are no longer needed")
    p.add_argument("--compile", action="store_true", help="compile the UNet step (torch.compile; slow first steps)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oxigaf", description="One photo in, consistent novel views out.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate novel views of IMAGE")
    gen.add_argument("image", nargs="?", default=None, help="input photo (omit for text-only MVDream)")
    _add_generation_args(gen, model_default=DEFAULT_MODEL)

    demo = sub.add_parser("demo", help="run the whole path on a tiny random-weight model (views are noise)")
    demo.add_argument("image", nargs="?", default=None, help="input photo (default: the bundled example portrait)")
    _add_generation_args(demo, model_default=None)
    demo.set_defaults(steps=4, upsample=True)

    sub.add_parser("info", help="installed backends, devices and versions")
    return parser


def _config(args) -> DiffusionConfig:
    views = len(args.azimuths) if args.azimuths else args.views
    return DiffusionConfig(num_views=views, num_inference_steps=args.steps, guidance_scale=args.guidance,
                           dtype=args.dtype, attention=args.attention, elevation=args.elevation, seed=args.seed,
                           low_memory=args.low_memory, compile=args.compile)


def _generate(args, model: str, upsampler) -> int:
    from .cameras import as_cameras
    from .images import load_image
    from .pipeline import Pipeline

    config = _config(args)
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
        # Checked before loading anything: a refused run should be cheap.
        raise InputError(f"output folder {out_dir} is not empty; pass --overwrite")
    # The input is read before the models too: a wrong path or a corrupt file should fail in a moment.
    image = load_image(args.image) if args.image is not None else None
    cameras = as_cameras(args.azimuths, elevation=args.elevation) if args.azimuths else None
    pipe = Pipeline.from_pretrained(model, backend=args.backend, device=args.device, upsampler=upsampler,
                                    config=config)
    out = pipe.generate(image, cameras=cameras, prompt=args.prompt, negative_prompt=args.negative_prompt,
                        output_size=args.size, progress=not args.quiet)
    out.save(out_dir, overwrite=args.overwrite)
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in out.timings.items())
    print(f"wrote {len(out.views)} views ({out.images.shape[1]}x{out.images.shape[2]}) to {out_dir} [{stages}]")
    return 0


def _info() -> int:
    from . import __version__, plugins

    print(f"oxigaf {__version__}, Python {platform.python_version()} on {platform.system()} {platform.machine()}")
    for name, spec in sorted(plugins.backend_specs().items()):
        why = spec.available()
        if why is not None:
            print(f"  {name}: not available ({why}); install with pip install '{spec.extra}'")
            continue
        backend = plugins.get_backend(name)
        print(f"  {name}: available, default device {backend.device}; {_versions(name)}")
    return 0


def _versions(name: str) -> str:
    if name == "torch":
        import torch

        devices = ["cpu"] + (["cuda"] * torch.cuda.is_available()) + (["mps"] * torch.backends.mps.is_available())
        return f"torch {torch.__version__}, devices {', '.join(devices)}"
    if name == "mlx":
        import mlx.core as mx

        return f"mlx {getattr(mx, '__version__', '?')}, default device {mx.default_device()}"
    return ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            return _info()
        if args.command == "demo":
            from .demo import bundled_portrait, tiny_model

            model, upsampler = tiny_model()
            args.image = args.image or str(bundled_portrait())
            print("demo: tiny random-weight model — the views are noise; this shows the whole path runs.",
                  file=sys.stderr)
            return _generate(args, str(model), str(upsampler))
        upsampler = None if args.upsampler in (None, "none") else args.upsampler
        return _generate(args, args.model, upsampler)
    except OxigafError as exc:
        # One line, whatever the message's layout: scripts read stderr line by line.
        message = " ".join(line.strip() for line in str(exc).splitlines()) or type(exc).__name__
        print(f"oxigaf: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("oxigaf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
