"""The ``oxigaf`` command: ``generate``, ``demo``, ``batch``, ``train``, ``info``, ``serve`` and ``fit``.

One module per command, each with ``add_parser(subparsers)`` and ``run(args) -> int``; the flags
they share and their mapping onto ``DiffusionConfig`` live in ``options``. ``serve`` and ``fit``
come from optional extras: their modules (``oxigaf.serve``, ``oxigaf.splat.fit``, each with
``add_arguments(parser)`` and ``run(args)``) are imported only when the command runs, so
``oxigaf --help`` loads neither gradio nor a rasterizer.

Every error oxigaf raises on purpose becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import InputError, OxigafError
from . import batch, demo, generate, info, train
from .options import DEFAULT_MODEL, DEFAULT_UPSAMPLER, config_from_args

COMMANDS = (generate, demo, info, batch, train)

# name -> (module, one-line help, what to install when the module cannot be imported)
LAZY_COMMANDS = {
    "serve": ("oxigaf.serve", "a web page for generating views (Gradio)",
              "oxigaf serve needs the ui extra: pip install 'oxigaf[ui]'"),
    "fit": ("oxigaf.splat.fit", "fit 3D Gaussians to generated views, refining them with the diffusion model",
            "oxigaf fit needs the splat extra: pip install 'oxigaf[splat]'"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oxigaf", description="One photo in, consistent novel views out.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub).set_defaults(run=command.run)
    for name, (_, help_text, _) in LAZY_COMMANDS.items():
        # listed here for --help; main() hands their arguments to the module's own parser
        lazy = sub.add_parser(name, help=help_text, add_help=False)
        lazy.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _run_lazy(name: str, argv: list[str]) -> int:
    module_name, help_text, install = LAZY_COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"{install} ({exc})") from exc
    parser = argparse.ArgumentParser(prog=f"oxigaf {name}", description=help_text)
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = None if argv and argv[0] in LAZY_COMMANDS else build_parser().parse_args(argv)
    try:
        if args is None:
            return _run_lazy(argv[0], argv[1:])
        return args.run(args)
    except OxigafError as exc:
        # One line, whatever the message's layout: scripts read stderr line by line.
        message = " ".join(line.strip() for line in str(exc).splitlines()) or type(exc).__name__
        print(f"oxigaf: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("oxigaf: interrupted", file=sys.stderr)
        return 130


__all__ = ["DEFAULT_MODEL", "DEFAULT_UPSAMPLER", "build_parser", "config_from_args", "main"]
