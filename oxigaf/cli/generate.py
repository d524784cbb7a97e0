"""``oxigaf generate``: views of one photo (or a prompt), and ``--replay`` of a saved run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InputError
from .options import (
    DEFAULT_MODEL,
    add_generation_args,
    add_model_args,
    add_run_args,
    check_output_folder,
    config_from_args,
    upsampler_arg,
)

OUTPUT_HELP = "output folder (view_00.png …, grid.png, cameras.json, oxigaf.json)"


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="generate novel views of IMAGE",
                       description="Generate views of IMAGE (or of --prompt with a text-only model). With --replay "
                                   "FOLDER/oxigaf.json, run a saved generation again; flags given beside it "
                                   "override the record's values.")
    p.add_argument("image", nargs="?", default=None, help="input photo (omit for text-only MVDream)")
    add_run_args(p, output_help=OUTPUT_HELP)
    add_model_args(p)
    add_generation_args(p)
    p.add_argument("--replay", default=None, metavar="RECORD",
                   help="an oxigaf.json (or the folder holding it) to run again")
    return p


def _recorded_model(entry: dict | None, what: str) -> str | None:
    """The folder a record names when it is still there, else its hub id."""
    if entry is None:
        return None
    path = entry.get("path")
    if path and Path(path).is_dir():
        return path
    if entry.get("hub_id"):
        return entry["hub_id"]
    raise InputError(f"the recorded {what} folder {path} is gone and the record names no hub id: pass --{what}")


def _recorded_upsampler(entry: dict | None) -> str | None:
    if entry is None:
        return None
    if entry.get("kind") == "bilinear":
        return "bilinear"
    if entry.get("kind") == "latent":
        return _recorded_model(entry, "upsampler")
    raise InputError(f"the recorded run used a {entry.get('kind')!r} upsampler object: pass --upsampler")


def _settings(args, record) -> dict:
    """The generation's inputs: the typed flags, then the record's values, then the defaults."""
    from ..cameras import as_cameras
    from ..images import load_image
    from ..outputs import record_image

    config = config_from_args(args, record["config"] if record else None)
    rec = record or {}
    backend = args.backend or rec.get("backend") or "auto"
    device = args.device
    if device is None and record is not None and args.backend in (None, rec.get("backend")):
        device = rec.get("device")
    if args.image is not None:
        load_image(args.image)  # a wrong path or a corrupt file fails now, before the models load
        image = args.image
    else:
        image = record_image(record) if record else None
    if args.azimuths:
        cameras = as_cameras(args.azimuths, elevation=config.elevation)
    elif record and args.num_views is None and args.elevation is None:
        cameras = record["cameras"]
    else:
        cameras = None  # the default orbit of config.num_views at config.elevation
    return dict(
        config=config,
        model=args.model or _recorded_model(rec.get("model"), "model") or DEFAULT_MODEL,
        upsampler=upsampler_arg(args.upsampler) if args.upsampler is not None
        else _recorded_upsampler(rec.get("upsampler")),
        backend=backend,
        device=device,
        image=image,
        cameras=cameras,
        prompt=args.prompt if args.prompt is not None else rec.get("prompt", ""),
        negative_prompt=args.negative_prompt if args.negative_prompt is not None else rec.get("negative_prompt", ""),
        size=args.size if args.size is not None else rec.get("size"),
    )


def run(args, model: str | None = None) -> int:
    """Generate and save; ``model`` stands in for ``--model`` (``oxigaf demo IMAGE``: the toy model)."""
    from ..outputs import model_record, read_record
    from ..pipeline import Pipeline

    record = read_record(args.replay) if args.replay else None
    if record is not None and record.get("lora") is not None:
        raise InputError("the recorded run merged a LoRA adapter into the UNet: replay it with the Python API "
                         "(Pipeline(..., lora=...))")
    if record is not None and record.get("latents_sha256"):
        raise InputError("the recorded run started from latents its caller gave (not drawn from its seed): "
                         "replay it with the Python API (generate(..., latents=...))")
    out_dir = check_output_folder(args.output, args.overwrite)
    s = _settings(args, record)
    if model is not None:
        s["model"] = model
    pipe = Pipeline.from_pretrained(s["model"], backend=s["backend"], device=s["device"], upsampler=s["upsampler"],
                                    config=s["config"])
    if record is not None and args.model is None and model_record(pipe.model_path)["files"] != record["model"]["files"]:
        print(f"oxigaf: warning: the weight files of {pipe.model_path} differ from the record's: "
              "the views will differ", file=sys.stderr)
    out = pipe.generate(s["image"], cameras=s["cameras"], prompt=s["prompt"], negative_prompt=s["negative_prompt"],
                        seed=s["config"].seed, output_size=s["size"], progress=not args.quiet)
    out.save(out_dir, overwrite=args.overwrite)
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in out.timings.items())
    print(f"wrote {len(out.views)} views ({out.images.shape[1]}x{out.images.shape[2]}) to {out_dir} [{stages}]")
    return 0
