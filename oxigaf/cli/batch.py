"""``oxigaf batch``: every row of a manifest, with every generation flag of ``oxigaf generate``."""

from __future__ import annotations

import argparse
import sys

from ..errors import InputError
from .options import DEFAULT_MODEL, add_generation_args, add_model_args, add_run_args, config_from_args, upsampler_arg

OUTPUT_HELP = "output folder: OUT/<id>/ per item (views, oxigaf.json) and OUT/results.jsonl"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("batch", help="generate views for every row of a manifest (CSV, JSONL, Parquet, a folder)",
                       description="Generate OUT/<id>/ for every item of MANIFEST and record each in "
                                   "OUT/results.jsonl; running it again resumes. Exit 1 if some item failed. "
                                   "--seed, --prompt, --azimuths and --elevation are the defaults of rows that "
                                   "do not set them (row i without a seed gets seed + i).")
    p.add_argument("manifest", help="CSV / JSONL / Parquet table with id and image columns, or a folder of images")
    add_run_args(p, output_help=OUTPUT_HELP)
    add_model_args(p)
    add_generation_args(p)
    b = p.add_argument_group("batch")
    b.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="local: this process; ray: a Ray cluster (pip install 'oxigaf[ray]')")
    b.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    b.add_argument("--workers", type=int, default=None, help="Ray actors, one Pipeline each (default 1)")
    b.add_argument("--gpus-per-worker", type=float, default=None, help="GPUs per Ray actor (default 0)")
    b.add_argument("--batch-size", type=int, default=1, help="items per generate call (UNet batch), default 1")
    return p


def settings_from_args(args):
    """The ``BatchSettings`` of a parsed ``oxigaf batch`` command line."""
    from ..batch import BatchSettings

    return BatchSettings(model=args.model or DEFAULT_MODEL, config=config_from_args(args),
                         upsampler=upsampler_arg(args.upsampler), backend=args.backend or "auto", device=args.device,
                         azimuths=tuple(args.azimuths) if args.azimuths else None, prompt=args.prompt or "",
                         negative_prompt=args.negative_prompt or "", size=args.size)


def run(args) -> int:
    from ..batch import format_summary, run_batch

    if args.engine != "ray" and (args.address, args.workers, args.gpus_per_worker) != (None, None, None):
        raise InputError("--address, --workers and --gpus-per-worker need --engine ray")
    settings = settings_from_args(args)
    summary = run_batch(args.manifest, args.output, settings, engine=args.engine, address=args.address,
                        workers=args.workers or 1, gpus_per_worker=args.gpus_per_worker or 0.0,
                        batch_size=args.batch_size, overwrite=args.overwrite, progress=not args.quiet)
    print(format_summary(summary), file=sys.stderr if summary.failed else sys.stdout)
    return summary.exit_code
