"""The embedded default: a tiny random-weight ImageDream model and latent upsampler.

With no real weights on the machine, ``oxigaf demo`` still runs the whole path: it builds,
deterministically from the manifests in ``demo_data/`` (configs, tokenizer files, tensor
names and shapes), a tiny model in the published folder layouts under the user cache, then
generates from it. Its views are noise: it proves the machinery, not the model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from . import synthetic

DATA = Path(__file__).parent / "demo_data"
# Bump when the manifests or the weight recipe change, so stale caches are rebuilt.
VERSION = "2"


def cache_dir() -> Path:
    root = os.environ.get("OXIGAF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "oxigaf")
    return Path(root)


def bundled_portrait() -> Path:
    """A public-domain portrait (NASA), 256×256."""
    return DATA / "portrait.png"


def random_weights(shapes: dict[str, list[int]], seed: int) -> dict[str, np.ndarray]:
    """The demo's recipe (``synthetic.random_weights``): norm scales exactly 1, biases 0, matrices
    normal with std 1/sqrt(fan_in), float16."""
    return synthetic.random_weights(shapes, seed, norm_scale_std=0.0, bias_std=0.0)


def _build(src: Path, dst: Path, weight_names: dict[str, str], seed: int) -> None:
    from safetensors.numpy import save_file

    def fill(tmp: Path) -> None:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("keys.json", "*.png"))
        for i, (component, filename) in enumerate(sorted(weight_names.items())):
            shapes = json.loads((src / component / "keys.json").read_text())
            save_file(random_weights(shapes, seed + i), str(tmp / component / filename))
        (tmp / "OXIGAF_DEMO_VERSION").write_text(VERSION)

    synthetic.build_folder(dst, fill)


def tiny_model(root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Folders of the tiny ImageDream model and tiny sd-x2-style upscaler (built once)."""
    root = Path(root) if root is not None else cache_dir() / "tiny-random"
    model, upscaler = root / "imagedream", root / "upscaler"
    for dst, src, names, seed in (
        (model, DATA / "imagedream", {"unet": "diffusion_pytorch_model.safetensors",
                                       "vae": "diffusion_pytorch_model.safetensors",
                                       "text_encoder": "model.safetensors", "image_encoder": "model.safetensors"}, 0),
        (upscaler, DATA / "upscaler", {"unet": "diffusion_pytorch_model.safetensors",
                                        "text_encoder": "model.safetensors"}, 100),
    ):
        marker = dst / "OXIGAF_DEMO_VERSION"
        if not (marker.is_file() and marker.read_text() == VERSION):
            _build(src, dst, names, seed)
    return model, upscaler


# --------------------------------------------------------------------------- the toy-world demo


def comparison_image(generated, truth, reference):
    """``comparison.png``: one column per view, generated above ground truth, the input on the left."""
    from PIL import Image

    from .images import to_uint8

    gen, gt, ref = to_uint8(np.asarray(generated)), to_uint8(np.asarray(truth)), to_uint8(np.asarray(reference))
    v, h, w, _ = gen.shape
    sheet = np.full((2 * h, (v + 1) * w + 4, 3), 255, np.uint8)
    sheet[h // 2:h // 2 + h, :w] = ref
    for i in range(v):
        x = w + 4 + i * w
        sheet[:h, x:x + w] = gen[i]
        sheet[h:, x:x + w] = gt[i]
    return Image.fromarray(sheet).resize((sheet.shape[1] * 4, sheet.shape[0] * 4), Image.NEAREST)


def toy_demo(output, *, subject: int | None = None, backend: str = "auto", device: str | None = None,
             config=None, cameras=None, overwrite: bool = False, progress: bool = True, out=print):
    """Render a held-out toy head's front view, generate views with the shipped toy model, compare.

    Writes the pipeline's usual outputs (the views, their cameras, ``oxigaf.json`` and the input as
    ``input.png``) plus ``comparison.png`` and ``ground_truth_XX.png`` into ``output``; prints PSNR
    and SSIM per view; returns ``(MultiViewOutput, metrics)``.
    """
    from PIL import Image

    from . import toys
    from .cameras import as_cameras
    from .config import DiffusionConfig
    from .images import to_uint8
    from .pipeline import Pipeline

    config = config or DiffusionConfig()
    seed = toys.HELD_OUT_SEED if subject is None else subject
    pipe = Pipeline.from_pretrained(toys.model_path(), backend=backend, device=device, config=config)
    size = pipe.native_size
    cams = as_cameras(cameras, config.num_views, config.elevation)
    truth = toys.render(seed, cams, size)[0]
    front = toys.render(seed, [0.0], size)[0][0]
    photo = Image.fromarray(to_uint8(front))
    result = pipe.generate(photo, cameras=cams, progress=progress)
    folder = result.save(output, overwrite=overwrite)
    for i, gt in enumerate(truth):
        Image.fromarray(to_uint8(gt)).save(folder / f"ground_truth_{i:02d}.png")
    comparison_image(result.images, truth, front).save(folder / "comparison.png")
    metrics = []
    for i, cam in enumerate(cams):
        m = {"azimuth": float(cam.azimuth), "psnr": toys.psnr(result.images[i], truth[i]),
             "ssim": toys.ssim(result.images[i], truth[i])}
        metrics.append(m)
        out(f"view {i} (azimuth {cam.azimuth:g}): PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}")
    out(f"mean: PSNR {np.mean([m['psnr'] for m in metrics]):.2f} dB, SSIM {np.mean([m['ssim'] for m in metrics]):.3f}"
        f" (toy head {seed}, held out from training) -> {folder / 'comparison.png'}")
    return result, metrics


def toy_refine_demo(output, *, subject: int | None = None, backend: str = "auto", device: str | None = None,
                    config=None, strength: float = 0.1, overwrite: bool = False, progress: bool = True, out=print):
    """Degrade (blur + noise) renders of a held-out toy head and refine them with the normal-conditioned
    toy model (``Pipeline.refine`` with the renders' normal maps); prints PSNR before and after."""
    from PIL import Image, ImageFilter

    from . import toys
    from .cameras import default_cameras
    from .config import DiffusionConfig
    from .images import to_uint8
    from .pipeline import Pipeline

    config = config or DiffusionConfig()
    seed = toys.HELD_OUT_SEED if subject is None else subject
    pipe = Pipeline.from_pretrained(toys.model_path(normals=True), backend=backend, device=device, config=config)
    size = pipe.native_size
    cams = default_cameras(config.num_views, config.elevation)
    truth, normals = toys.render(seed, cams, size)
    front, front_normal = (a[0] for a in toys.render(seed, [0.0], size))
    rng = np.random.default_rng(seed)
    degraded = []
    for view in truth:
        blurred = np.asarray(Image.fromarray(to_uint8(view)).filter(ImageFilter.GaussianBlur(1.5)), np.float32) / 255
        degraded.append(np.clip(blurred + rng.normal(0, 0.05, blurred.shape), 0, 1).astype(np.float32))
    degraded = np.stack(degraded)
    photo = Image.fromarray(to_uint8(front))
    maps = [Image.fromarray(to_uint8(n)) for n in normals] + [Image.fromarray(to_uint8(front_normal))]
    result = pipe.refine(list(degraded), photo, cams, strength=strength, normals=maps, seed=config.seed,
                         progress=progress)
    folder = result.save(output, overwrite=overwrite)
    comparison_image(np.concatenate([degraded, result.images], axis=1), np.concatenate([truth, truth], axis=1),
                     np.concatenate([front, front], axis=0)).save(folder / "comparison.png")
    before = [toys.psnr(d, t) for d, t in zip(degraded, truth, strict=True)]
    after = [toys.psnr(r, t) for r, t in zip(result.images, truth, strict=True)]
    for i, cam in enumerate(cams):
        out(f"view {i} (azimuth {cam.azimuth:g}): PSNR degraded {before[i]:.2f} dB -> refined {after[i]:.2f} dB")
    out(f"mean: {np.mean(before):.2f} dB -> {np.mean(after):.2f} dB (strength {strength}) -> {folder}")
    return result, before, after
