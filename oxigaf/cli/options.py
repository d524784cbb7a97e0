"""The argument groups the commands share, and the one mapping from flags to ``DiffusionConfig``.

Every generation setting flag has ``dest`` equal to its ``DiffusionConfig`` field and a default of
None: None means "not typed", so ``config_from_args`` keeps the base config's value (the defaults,
or a replayed record's) and a typed flag always wins.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import ATTENTION_MODES, DTYPES, PREDICTION_TYPES, DiffusionConfig
from ..errors import InputError

DEFAULT_MODEL = "ashawkey/imagedream-ipmv-diffusers"
DEFAULT_UPSAMPLER = "stabilityai/sd-x2-latent-upscaler"

# DiffusionConfig field -> the flag that sets it.
CONFIG_FLAGS = {
    "dtype": "--dtype",
    "vae_dtype": "--vae-dtype",
    "num_views": "--views",
    "elevation": "--elevation",
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "seed": "--seed",
    "eta": "--eta",
    "ip_weight": "--ip-weight",
    "prediction_type": "--prediction-type",
    "attention": "--attention",
    "attention_chunk_size": "--attention-chunk-size",
    "upsampler_steps": "--upsampler-steps",
    "vae_tile_size": "--vae-tile-size",
    "low_memory": "--low-memory",
    "compile": "--compile",
}


def floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def add_run_args(p: argparse.ArgumentParser, *, output_help: str) -> None:
    """Where the result goes and what runs it: -o, --overwrite, --backend, --device, --quiet."""
    p.add_argument("-o", "--output", required=True, help=output_help)
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
    p.add_argument("--backend", default=None, help="mlx, torch or auto (default)")
    p.add_argument("--device", default=None, help="backend device: cpu, cuda, cuda:1, mps, gpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"model folder or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--upsampler", default=None,
                   help=f"none, 'bilinear', or an sd-x2 folder / hub id (e.g. {DEFAULT_UPSAMPLER}) for 512 px")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """What to generate (cameras, prompts, size) and every ``DiffusionConfig`` setting."""
    d = DiffusionConfig()
    what = p.add_argument_group("what to generate")
    what.add_argument("--azimuths", type=floats, default=None, metavar="DEG,...",
                      help="comma-separated azimuths in degrees (0 = input view; overrides --views)")
    what.add_argument("--prompt", default=None, help="text prompt (required for text-only MVDream)")
    what.add_argument("--negative-prompt", default=None)
    what.add_argument("--size", type=int, default=None, metavar="PX", help="output size: 256, or 512 with an upsampler")

    g = p.add_argument_group("generation settings (DiffusionConfig)")
    g.add_argument("--views", dest="num_views", type=int, default=None, metavar="N",
                   help=f"number of views (default {d.num_views})")
    g.add_argument("--elevation", type=float, default=None, metavar="DEG",
                   help=f"camera elevation in degrees (default {d.elevation:g})")
    g.add_argument("--steps", dest="num_inference_steps", type=int, default=None, metavar="N",
                   help=f"DDIM steps (default {d.num_inference_steps})")
    g.add_argument("--guidance", dest="guidance_scale", type=float, default=None, metavar="SCALE",
                   help=f"classifier-free guidance, 1.0-20.0 (default {d.guidance_scale:g})")
    g.add_argument("--seed", type=int, default=None, help=f"random seed (default {d.seed})")
    g.add_argument("--eta", type=float, default=None,
                   help=f"DDIM eta: 0 deterministic, 1 DDPM-like fresh noise (default {d.eta:g})")
    g.add_argument("--ip-weight", type=float, default=None, metavar="W",
                   help=f"ImageDream's identity strength: the image-prompt attention scale (default {d.ip_weight:g})")
    g.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None,
                   help="override what the scheduler predicts (default: the model's scheduler config)")
    g.add_argument("--dtype", choices=DTYPES, default=None, help=f"UNet and encoders' dtype (default {d.dtype})")
    g.add_argument("--vae-dtype", choices=DTYPES, default=None, help=f"the VAE's dtype (default {d.vae_dtype})")
    g.add_argument("--attention", choices=ATTENTION_MODES, default=None, help=f"(default {d.attention})")
    g.add_argument("--attention-chunk-size", type=int, default=None, metavar="N",
                   help=f"query block of chunked attention (default {d.attention_chunk_size})")
    g.add_argument("--upsampler-steps", type=int, default=None, metavar="N",
                   help=f"Euler steps of the sd-x2 upsampler (default {d.upsampler_steps})")
    g.add_argument("--vae-tile-size", type=int, default=None, metavar="PX",
                   help="decode in tiles of this many pixels, a multiple of 8 (default 0: never tile)")
    g.add_argument("--low-memory", action="store_true", default=None,
                   help="release models as soon as they are no longer needed")
    g.add_argument("--compile", action="store_true", default=None,
                   help="compile the UNet step (torch.compile; mx.compile, with the guided DDIM step)")


def config_from_args(args: argparse.Namespace, base: DiffusionConfig | None = None) -> DiffusionConfig:
    """``base`` (default: ``DiffusionConfig()``) with every generation flag the user typed applied.

    ``--azimuths`` sets ``num_views`` to its length. A bad value is a ``ConfigError`` naming the field.
    """
    base = base if base is not None else DiffusionConfig()
    given = vars(args)
    changes = {name: given[name] for name in CONFIG_FLAGS if given.get(name) is not None}
    if given.get("azimuths"):
        changes["num_views"] = len(given["azimuths"])
    return base.replace(**changes) if changes else base


def check_output_folder(output: str, overwrite: bool) -> Path:
    """Refuse a non-empty output folder before anything is loaded: a refused run should be cheap."""
    out_dir = Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output path {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"output folder {out_dir} is not empty; pass --overwrite")
    return out_dir


def upsampler_arg(value: str | None) -> str | None:
    return None if value in (None, "none") else value
