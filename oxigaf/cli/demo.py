"""``oxigaf demo``: the toy-head model shipped in the package, compared with its ground truth."""

from __future__ import annotations

import argparse

from .options import add_generation_args, add_run_args, check_output_folder, config_from_args

OUTPUT_HELP = "output folder (views, comparison.png, ground_truth_XX.png, oxigaf.json)"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="the toy-head model shipped in the package: views of a held-out head "
                                    "compared with its ground truth")
    p.add_argument("image", nargs="?", default=None,
                   help="input photo (default: the front view of a held-out toy head, with ground truth)")
    add_run_args(p, output_help=OUTPUT_HELP)
    add_generation_args(p)
    p.add_argument("--subject", type=int, default=None, help="toy-head seed (default: the first held-out one)")
    p.add_argument("--refine", action="store_true",
                   help="refine blurred, noisy renders with the normal-conditioned toy model instead")
    p.add_argument("--strength", type=float, default=0.1,
                   help="refinement strength (with --refine; default 0.1: 5 DDIM steps from t = 100)")
    p.set_defaults(model=None, upsampler=None, replay=None)  # what `oxigaf demo IMAGE` hands to generate
    return p


def run(args) -> int:
    from .. import toys
    from ..demo import toy_demo, toy_refine_demo
    from . import generate

    config = config_from_args(args)
    check_output_folder(args.output, args.overwrite)  # before any work
    kwargs = dict(subject=args.subject, backend=args.backend or "auto", device=args.device, config=config,
                  overwrite=args.overwrite, progress=not args.quiet)
    if args.refine:
        toy_refine_demo(args.output, strength=args.strength, **kwargs)
        return 0
    if args.image is not None:
        return generate.run(args, model=str(toys.model_path()))
    toy_demo(args.output, cameras=args.azimuths or None, **kwargs)
    return 0
