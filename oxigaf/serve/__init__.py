"""``oxigaf serve``: a Gradio page (and API) over one pipeline loaded at start.

``add_arguments(parser)`` declares the command's options and ``run(args)`` serves until
interrupted; ``python -m oxigaf.serve`` does both. With no ``--model`` it serves the toy model
shipped in the package, so it runs offline anywhere. It listens on 127.0.0.1 and makes no
public link unless ``--share`` is given; Gradio keeps its uploads and the files it serves under
the output folder, and serves files from nowhere else (see ``allowed_paths`` in ``run``).
Importing this package does not import Gradio (``pip install 'oxigaf[ui]'``): ``run`` does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..config import DTYPES, DiffusionConfig
from ..errors import ConfigError, OxigafError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_KEEP = 20
DEFAULT_QUEUE = 32


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``oxigaf serve``."""
    p.add_argument("--model", default=None,
                   help="model folder or hub id (default: the toy model shipped in the package, offline)")
    p.add_argument("--upsampler", default=None,
                   help="none, 'bilinear', or an sd-x2 latent upscaler folder / hub id for 512 px views")
    p.add_argument("--backend", default="auto", help="mlx, torch or auto (default)")
    p.add_argument("--device", default=None, help="backend device: cpu, cuda, cuda:1, mps, gpu")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--steps", type=int, default=None,
                   help="the page's starting number of denoising steps (default: DiffusionConfig's, 50)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0: every network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                   help=f"largest photo accepted, in MB (default {DEFAULT_MAX_UPLOAD_MB:g})")
    p.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    p.add_argument("--output", default=None,
                   help="folder for the requests' outputs and Gradio's files (default: a new temporary folder)")
    p.add_argument("--keep", type=int, default=DEFAULT_KEEP,
                   help=f"requests whose outputs are kept; older ones are removed (default {DEFAULT_KEEP})")
    p.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE,
                   help=f"requests allowed to wait in line; more are turned away (default {DEFAULT_QUEUE})")


def _check(args) -> None:
    from .checks import number

    if args.steps is not None:
        number(args.steps, "steps")
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 1..65535; got {args.port}")
    if not args.max_upload_mb > 0:
        raise ConfigError(f"--max-upload-mb must be > 0; got {args.max_upload_mb:g}")
    for name in ("keep", "queue_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")


def _gradio_env(root: Path) -> None:
    """Set before Gradio is imported: no analytics or version checks, and its files under ``root``."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(root / ".gradio" / "files")
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(root / ".gradio" / "examples")


def _examples(pipe, root: Path) -> list[Path]:
    """The page's examples, copied under ``root`` (the only folder it serves): the front view of a
    held-out toy head at the model's size, and the bundled portrait."""
    from PIL import Image

    from .. import toys
    from ..demo import bundled_portrait
    from ..images import to_uint8

    folder = root / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    head = folder / "toy_head.png"
    front = toys.render(toys.HELD_OUT_SEED, [0.0], pipe.native_size)[0][0]
    Image.fromarray(to_uint8(front)).save(head)
    portrait = folder / "portrait.png"
    portrait.write_bytes(bundled_portrait().read_bytes())
    return [head, portrait]


def load_pipeline(args):
    """The pipeline ``args`` name: ``--model`` or the shipped toy model."""
    from .. import toys
    from ..pipeline import Pipeline

    model = args.model if args.model is not None else toys.model_path()
    upsampler = None if args.upsampler in (None, "none") else args.upsampler
    steps = {} if args.steps is None else {"num_inference_steps": args.steps}
    pipe = Pipeline.from_pretrained(model, backend=args.backend, device=args.device, upsampler=upsampler,
                                    config=DiffusionConfig(dtype=args.dtype, **steps))
    if not pipe.image_conditioned:
        raise ConfigError(f"{model} is a text-only MVDream model; oxigaf serve needs a photo-conditioned "
                          "ImageDream model")
    return pipe


def run(args) -> int:
    """Load the model, build the page and serve it until interrupted."""
    _check(args)
    temporary = not args.output
    root = Path(tempfile.mkdtemp(prefix="oxigaf-serve-")) if temporary else Path(args.output).absolute()
    root.mkdir(parents=True, exist_ok=True)
    try:
        return _serve(args, root)
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)


def _serve(args, root: Path) -> int:
    _gradio_env(root)
    try:
        import gradio  # noqa: F401
    except ImportError as exc:
        raise OxigafError(f"oxigaf serve needs Gradio: pip install 'oxigaf[ui]' ({exc})") from exc
    from . import app
    from .runs import RunStore

    print(f"loading {args.model or 'the toy model'} ...", file=sys.stderr)
    pipe = load_pipeline(args)
    store = RunStore(root, keep=args.keep)
    max_bytes = int(args.max_upload_mb * 1e6)
    demo = app.build(pipe, store, max_upload_bytes=max_bytes, examples=_examples(pipe, root))
    demo.queue(default_concurrency_limit=1, max_size=args.queue_size)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach this machine can use the page",
              file=sys.stderr)
    print(f"outputs: {store.runs}" + ("" if args.output else " (a temporary folder, removed on exit)"),
          file=sys.stderr)
    demo.launch(
        server_name=args.host, server_port=args.port, share=bool(args.share), allowed_paths=[str(root)],
        max_file_size=max_bytes, ssr_mode=False, mcp_server=False, footer_links=["api"],
        prevent_thread_lock=True, quiet=False, show_error=True, inbrowser=False)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop closes the server as Ctrl-C does
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (above)
        print("closing the server", file=sys.stderr)
    finally:
        demo.close()  # ends the pages' event streams first, so the server need not wait for them
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="oxigaf serve", description="Serve a Gradio page: one photo in, views out.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except OxigafError as exc:
        print(f"oxigaf serve: error: {exc}", file=sys.stderr)
        return 2


__all__ = ["add_arguments", "load_pipeline", "main", "run"]
