"""The ``oxigaf`` command: ``generate``, ``demo``, ``info`` and ``train``.

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
    p.add_argument("--compile", action="store_true",
                   help="compile the UNet step (torch.compile; mx.compile, with the guided DDIM step)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oxigaf", description="One photo in, consistent novel views out.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate novel views of IMAGE")
    gen.add_argument("image", nargs="?", default=None, help="input photo (omit for text-only MVDream)")
    _add_generation_args(gen, model_default=DEFAULT_MODEL)

    demo = sub.add_parser("demo", help="the toy-head model shipped in the package: views of a held-out head "
                                        "compared with its ground truth")
    demo.add_argument("image", nargs="?", default=None,
                      help="input photo (default: the front view of a held-out toy head, with ground truth)")
    _add_generation_args(demo, model_default=None)
    demo.add_argument("--subject", type=int, default=None, help="toy-head seed (default: the first held-out one)")
    demo.add_argument("--refine", action="store_true",
                      help="refine blurred, noisy renders with the normal-conditioned toy model instead")
    demo.add_argument("--strength", type=float, default=0.1,
                      help="refinement strength (with --refine; default 0.1: 5 DDIM steps from t = 100)")

    sub.add_parser("info", help="installed backends, devices and versions")

    batch = sub.add_parser("batch", help="generate views for every row of a manifest (CSV, JSONL, Parquet, a folder)",
                           description="Generate OUT/<id>/ for every item of MANIFEST and record each in "
                                       "OUT/results.jsonl; running it again resumes. Exit 1 if some item failed.")
    batch.add_argument("manifest", help="CSV / JSONL / Parquet table with id and image columns, or a folder of images")
    _add_generation_args(batch, model_default=DEFAULT_MODEL)
    batch.add_argument("--engine", default="local", choices=("local", "ray"),
                       help="local: this process; ray: a Ray cluster (pip install 'oxigaf[ray]')")
    batch.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    batch.add_argument("--workers", type=int, default=None, help="Ray actors, one Pipeline each (default 1)")
    batch.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per Ray actor (default 0)")
    batch.add_argument("--batch-size", type=int, default=1, help="items per generate call (UNet batch), default 1")
    _add_train_parser(sub)
    return parser


def _add_train_parser(sub) -> None:
    tr = sub.add_parser("train", help="train / fine-tune the multi-view UNet on a folder of subjects")
    tr.add_argument("data", help="folder of subjects (each a folder with transforms.json and its images)")
    tr.add_argument("--model", required=True, help="starting pipeline folder or hub id (ImageDream / MVDream layout)")
    tr.add_argument("-o", "--output", required=True, help="output pipeline folder (unet/, checkpoints/, log)")
    tr.add_argument("--steps", type=int, default=1000, help="optimiser steps to run (--resume: this many more)")
    tr.add_argument("--batch-size", type=int, default=1, help="samples per micro-batch (default 1)")
    tr.add_argument("--grad-accumulation", type=int, default=1, help="micro-batches per optimiser step (default 1)")
    tr.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    tr.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default 0)")
    tr.add_argument("--weight-decay", type=float, default=0.01)
    tr.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off; default 1)")
    tr.add_argument("--ema", type=float, default=None, help="EMA decay of the exported weights (e.g. 0.999)")
    tr.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: every weight)")
    tr.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    tr.add_argument("--init-in-channels", type=int, default=None,
                    help="widen the UNet input to C channels (8: normal-map conditioning; new weights zero)")
    tr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output")
    tr.add_argument("--backend", default="auto", help="torch, mlx or auto (default)")
    tr.add_argument("--device", default=None, help="backend device: cpu, cuda, cuda:1, mps, gpu")
    tr.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--views", type=int, default=4, help="target views per sample (default 4)")
    tr.add_argument("--size", type=int, default=None, help="training resolution in pixels (default: the model's)")
    tr.add_argument("--image-dropout", type=float, default=0.1, help="CFG image-condition dropout (default 0.1)")
    tr.add_argument("--text-dropout", type=float, default=0.1, help="CFG text dropout (default 0.1)")
    tr.add_argument("--reference-frame", type=int, default=None,
                    help="use this frame of every subject as the reference (default: a random frame per sample)")
    tr.add_argument("--checkpoint-every", type=int, default=500)
    tr.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    tr.add_argument("--attention", default="auto", choices=ATTENTION_MODES)
    tr.add_argument("--quiet", action="store_true", help="no progress bars")


def _train(args) -> int:
    from .training import TrainConfig, Trainer

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accumulation=args.grad_accumulation,
                      lr=args.lr, warmup_steps=args.warmup, weight_decay=args.weight_decay,
                      max_grad_norm=args.max_grad_norm or None, ema_decay=args.ema, lora_rank=args.lora_rank,
                      lora_alpha=args.lora_alpha, init_in_channels=args.init_in_channels, dtype=args.dtype,
                      seed=args.seed, views=args.views, size=args.size, image_dropout=args.image_dropout,
                      text_dropout=args.text_dropout, checkpoint_every=args.checkpoint_every,
                      grad_checkpointing=args.gradient_checkpointing, attention=args.attention,
                      reference_frame=args.reference_frame, progress=not args.quiet)
    trainer = Trainer(args.data, args.model, args.output, cfg, backend=args.backend, device=args.device,
                      resume=args.resume)
    out = trainer.train()
    print(f"trained {cfg.steps} steps; wrote {out} (unet/{', lora/' if cfg.lora_rank else ''}, "
          f"training_log.jsonl, checkpoints/)")
    return 0


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


def _batch(args) -> int:
    from .batch import BatchSettings, format_summary, run_batch

    if args.engine != "ray" and (args.address, args.workers, args.gpus_per_worker) != (None, None, None):
        raise InputError("--address, --workers and --gpus-per-worker need --engine ray")
    upsampler = None if args.upsampler in (None, "none") else args.upsampler
    settings = BatchSettings(model=args.model, upsampler=upsampler, backend=args.backend, device=args.device,
                             dtype=args.dtype, views=args.views, azimuths=args.azimuths, elevation=args.elevation,
                             steps=args.steps, guidance=args.guidance, seed=args.seed, prompt=args.prompt,
                             negative_prompt=args.negative_prompt, size=args.size, attention=args.attention,
                             low_memory=args.low_memory)
    summary = run_batch(args.manifest, args.output, settings, engine=args.engine, address=args.address,
                        workers=args.workers or 1, gpus_per_worker=args.gpus_per_worker or 0.0,
                        batch_size=args.batch_size, overwrite=args.overwrite, progress=not args.quiet)
    print(format_summary(summary), file=sys.stderr if summary.failed else sys.stdout)
    return summary.exit_code


def _demo(args) -> int:
    from . import toys
    from .demo import toy_demo, toy_refine_demo

    config = _config(args)
    out_dir = Path(args.output)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
        raise InputError(f"output folder {out_dir} is not empty; pass --overwrite")  # before any work
    kwargs = dict(subject=args.subject, backend=args.backend, device=args.device, config=config,
                  overwrite=args.overwrite, progress=not args.quiet)
    if args.refine:
        toy_refine_demo(args.output, strength=args.strength, **kwargs)
        return 0
    if args.image is not None:
        return _generate(args, str(toys.model_path()), None)
    cameras = args.azimuths if args.azimuths else None
    toy_demo(args.output, cameras=cameras, **kwargs)
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
        if args.command == "batch":
            return _batch(args)
        if args.command == "train":
            return _train(args)
        if args.command == "demo":
            return _demo(args)
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
