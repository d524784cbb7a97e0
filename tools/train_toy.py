"""Train oxigaf's embedded toy model: a small ImageDream-layout pipeline for the toy-head world.

    python tools/train_toy.py all --work runs/toy            # data, VAE, UNet, normal UNet, export
    python tools/train_toy.py vae --work runs/toy            # one phase (each reuses the earlier ones)

Phases (each writes into --work and is skipped when its output is there):

1. ``data``: ``toys.make_dataset`` (subjects 0..N-1, default 1200, 4 views at azimuths 0/90/180/270, normal maps).
2. ``vae``: an ``AutoencoderKL`` (factor 8: 64 px -> 8x8x4 latents) trained from scratch on the
   views, normal maps and extra renders at random azimuths (L1 + MSE, a small KL term); its
   ``scaling_factor`` is set to 1/std of the latents. Reports reconstruction PSNR on held-out heads.
3. ``unet``: a start folder (the encoders below, the VAE, a v-prediction DDIM scheduler, the
   UNet freshly initialised, its output conv zero), then ``oxigaf train`` on the data: the front
   view as the reference (``--reference-frame 0``), the 4 views as targets, 10 % image-condition
   dropout (the unconditional branch of guidance), AdamW with warm-up, EMA weights exported.
   Resumable: a stopped run continues from its last checkpoint (every 100 steps).
4. ``normals``: ``oxigaf train --init-in-channels 8`` from the plain model (the normal latents'
   input weights start at zero, so it starts as the plain model), fine-tuned briefly.
5. ``export``: both trained folders in float16 into ``oxigaf/toy_model/imagedream`` and
   ``imagedream-normals``.

The CLIP text and image encoders are small, random and frozen: the text encoder is the demo's
tiny one, the image encoder a patch embedding + position embedding (its one transformer layer is
zero, so its penultimate states are the layer-normed embeddings: a random linear patch feature).

Everything is seeded: the same arguments give the same weights on the same machine and torch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "backends" / "torch"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from oxigaf import toys  # noqa: E402
from oxigaf.cameras import CameraParams, default_cameras  # noqa: E402
from oxigaf.config import CLIPVisionConfig, UNetConfig, VAEConfig  # noqa: E402
from oxigaf.synthetic import random_weights  # noqa: E402

DEMO = ROOT / "oxigaf" / "demo_data" / "imagedream"
SIZE = 64
VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1", "act_fn": "silu",
    "block_out_channels": [16, 32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 4, "latents_mean": None, "latents_std": None,
    "layers_per_block": 1, "mid_block_add_attention": True, "norm_num_groups": 8, "out_channels": 3,
    "sample_size": SIZE, "scaling_factor": 1.0, "shift_factor": None, "use_post_quant_conv": True,
    "use_quant_conv": True,
}
UNET_CONFIG = {
    "_class_name": "MultiViewUNetModel", "_diffusers_version": "0.25.0", "image_size": SIZE // 8,
    "in_channels": 4, "model_channels": 32, "out_channels": 4, "num_res_blocks": 1,
    "attention_resolutions": [1, 2, 4], "channel_mult": [1, 2, 2], "num_head_channels": 32,
    "context_dim": 64, "camera_dim": 16, "transformer_depth": 1, "ip_dim": 16,
}
IMAGE_ENCODER_CONFIG = {
    "architectures": ["CLIPVisionModel"], "attention_dropout": 0.0, "dtype": "float16", "hidden_act": "gelu",
    "hidden_size": 1280, "image_size": 224, "initializer_factor": 1.0, "initializer_range": 0.02,
    "intermediate_size": 64, "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
    "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 1, "patch_size": 14,
    "projection_dim": 64,
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 10 * math.log10(1.0 / max(mse, 1e-12))


# --------------------------------------------------------------------------- data


def load_subjects(data: Path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Views and normal maps of every subject folder: float32 (S, 4, 64, 64, 3) each, and seeds."""
    views, normals, seeds = [], [], []
    for sub in sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith(".")):
        meta = json.loads((sub / "transforms.json").read_text())
        views.append([np.asarray(Image.open(sub / f["file_path"]).convert("RGB")) for f in meta["frames"]])
        normals.append([np.asarray(Image.open(sub / f["normal_file_path"]).convert("RGB")) for f in meta["frames"]])
        seeds.append(int(meta["toy_seed"]))
    return (np.asarray(views, np.float32) / 255.0, np.asarray(normals, np.float32) / 255.0, seeds)


def phase_data(work: Path, subjects: int) -> None:
    data = work / "data"
    if (data / "DONE").is_file():
        return
    t0 = time.time()
    from multiprocessing import Pool

    half = subjects // 2
    with Pool(2) as pool:  # two renderers, disjoint seeds, one folder
        pool.starmap(toys.make_dataset, [(data, half, 4, SIZE, 0), (data, subjects - half, 4, SIZE, half)])
    (data / "DONE").write_text("ok")
    log(f"data: {subjects} subjects in {time.time() - t0:.0f}s")


def extra_views(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Renders at random azimuths and small elevations (training seeds), for the VAE."""
    rng = np.random.default_rng(seed)
    ims, nms = [], []
    for _ in range(count):
        cams = [CameraParams(float(rng.uniform(0, 360)), float(rng.uniform(-10, 15))) for _ in range(2)]
        im, nm = toys.render(int(rng.integers(0, toys.TRAIN_SEED_RANGE[1])), cams, SIZE)
        ims.append(im)
        nms.append(nm)
    return np.concatenate(ims), np.concatenate(nms)


# --------------------------------------------------------------------------- VAE


def build_vae():
    from oxigaf_torch.vae import VAE

    return VAE(VAEConfig.from_dict(VAE_CONFIG))


def vae_posterior(vae, x):
    m = vae.quant_conv(vae.encoder(x, "sdpa", 1024))
    mean, logvar = m.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def vae_decode(vae, z):
    return vae.decoder(vae.post_quant_conv(z), "sdpa", 1024)


def phase_vae(work: Path, steps: int, batch: int, lr: float) -> None:
    out = work / "vae.pt"
    if out.is_file():
        return
    torch.manual_seed(0)
    views, normals, _ = load_subjects(work / "data")
    ex_i, ex_n = extra_views(max(1, len(views) // 4), seed=1)
    pool = np.concatenate([views.reshape(-1, SIZE, SIZE, 3), ex_i, normals.reshape(-1, SIZE, SIZE, 3)[::2], ex_n])
    pool = torch.from_numpy(pool.transpose(0, 3, 1, 2).copy()) * 2 - 1
    held_i, held_n = toys.render(toys.HELD_OUT_SEED, default_cameras(4), SIZE)
    held = torch.from_numpy(np.concatenate([held_i, held_n]).transpose(0, 3, 1, 2).copy()) * 2 - 1
    log(f"vae: pool of {len(pool)} images")
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(pool), (batch,), generator=gen)
        x = pool[idx]
        lr_now = lr * min(1.0, step / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr_now
        mean, logvar = vae_posterior(vae, x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
        rec = vae_decode(vae, z)
        kl = 0.5 * torch.mean(mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float())
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} kl {kl.item():.2f} "
                f"({(time.time() - t0) / step:.2f}s/step)")
    vae.eval()
    with torch.no_grad():
        mean, _ = vae_posterior(vae, held)
        rec = ((vae_decode(vae, mean) + 1) / 2).clamp(0, 1).numpy()
        sample = pool[:: max(1, len(pool) // 512)]
        lat = torch.cat([vae_posterior(vae, sample[i:i + 64])[0] for i in range(0, len(sample), 64)])
    ref = ((held + 1) / 2).numpy()
    scale = float(1.0 / lat.std())
    log(f"vae: held-out PSNR images {psnr(rec[:4], ref[:4]):.2f} dB, normals {psnr(rec[4:], ref[4:]):.2f} dB; "
        f"latent std {lat.std():.3f} mean {lat.mean():.3f} -> scaling_factor {scale:.4f}")
    torch.save({"state": vae.state_dict(), "scaling_factor": scale}, out)


# --------------------------------------------------------------------------- encoders


def image_encoder_weights(seed: int = 7) -> dict[str, np.ndarray]:
    from oxigaf_torch.clip import CLIPImageEncoder

    cfg = CLIPVisionConfig.from_dict(IMAGE_ENCODER_CONFIG)
    with torch.device("meta"):
        model = CLIPImageEncoder(cfg, projection=False)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    w = random_weights(shapes, seed)
    rng = np.random.default_rng(seed + 1)
    for name in w:
        if name.startswith("encoder.layers."):
            # The one layer is the identity (zero residual branches): penultimate states are the
            # layer-normed patch + position embeddings.
            leaf = name.rsplit(".", 1)[-1]
            if "layer_norm" not in name or leaf == "bias":
                w[name] = np.zeros_like(w[name])
        elif name == "embeddings.position_embedding.weight":
            w[name] = rng.standard_normal(w[name].shape).astype(np.float32)
    return w


def build_encoders(folder: Path) -> None:
    """Text encoder (the demo's tiny one, random), image encoder (above), tokenizer, processor, scheduler."""
    from safetensors.numpy import save_file

    for comp in ("tokenizer", "feature_extractor", "scheduler", "text_encoder"):
        shutil.copytree(DEMO / comp, folder / comp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("keys.json"))
    shapes = json.loads((DEMO / "text_encoder" / "keys.json").read_text())
    save_file({k: v.astype(np.float16) for k, v in random_weights(shapes, 3).items()},
              str(folder / "text_encoder" / "model.safetensors"))
    (folder / "image_encoder").mkdir(parents=True, exist_ok=True)
    (folder / "image_encoder" / "config.json").write_text(json.dumps(IMAGE_ENCODER_CONFIG, indent=2))
    save_file({k: v.astype(np.float16) for k, v in image_encoder_weights().items()},
              str(folder / "image_encoder" / "model.safetensors"))
    shutil.copy(DEMO / "model_index.json", folder / "model_index.json")


# --------------------------------------------------------------------------- UNet


def build_unet(in_channels: int = 4):
    from oxigaf_torch.unet import MultiViewUNet

    cfg = dict(UNET_CONFIG, in_channels=in_channels)
    return MultiViewUNet(UNetConfig.from_dict(cfg))


def init_unet(unet, seed: int) -> None:
    """Default torch init, the resampler's query latents normal/sqrt(dim), the output conv zero."""
    torch.manual_seed(seed)
    for m in unet.modules():
        if hasattr(m, "reset_parameters") and m is not unet:
            m.reset_parameters()
    if hasattr(unet, "image_embed"):
        with torch.no_grad():
            unet.image_embed.latents.normal_(0, unet.context_dim ** -0.5)
    torch.nn.init.zeros_(unet.out[2].weight)
    torch.nn.init.zeros_(unet.out[2].bias)


def start_folder(work: Path) -> Path:
    """The pipeline folder ``oxigaf train`` starts from: the encoders, the trained VAE, a
    v-prediction scheduler and the freshly initialised UNet (float32)."""
    from safetensors.torch import save_file

    dst = work / "start"
    if (dst / "model_index.json").is_file():
        return dst
    tmp = work / ".start.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build_encoders(tmp)
    write_vae(work, tmp, torch.float32)
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(), indent=2))
    unet = build_unet(4)
    init_unet(unet, seed=0)
    (tmp / "unet").mkdir()
    (tmp / "unet" / "config.json").write_text(json.dumps(UNET_CONFIG, indent=2))
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()},
              str(tmp / "unet" / "diffusion_pytorch_model.safetensors"))
    tmp.rename(dst)
    log(f"start folder: {dst} (UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters)")
    return dst


def scheduler_config() -> dict:
    """The demo's DDIM config with v-prediction: at high noise the target is the clean latent
    itself, so the loss there teaches the model to read the reference view (with epsilon the
    reference's share of the target is sqrt(alpha_bar) ~ 0.07 at t = 999, and an 800-step
    epsilon model had learnt to ignore it)."""
    cfg = json.loads((DEMO / "scheduler" / "scheduler_config.json").read_text())
    return dict(cfg, prediction_type="v_prediction")


def oxigaf_train(work: Path, model: Path, run: Path, steps: int, args, extra: tuple = (),
                 ema: float | None = None) -> None:
    """``oxigaf train`` to ``steps`` optimiser steps in total, resuming a stopped run."""
    import subprocess

    from oxigaf.training.loop import latest_checkpoint

    done = 0
    last = latest_checkpoint(run)
    if last is not None:
        done = int(json.loads((last / "state.json").read_text())["step"])
    if done >= steps and (run / "unet" / "config.json").is_file():
        return
    cmd = [sys.executable, "-m", "oxigaf.cli", "train", str(work / "data"), "--model", str(model), "-o", str(run),
           "--steps", str(steps - done), "--batch-size", str(args.batch), "--lr", str(args.lr),
           "--warmup", str(args.warmup), "--ema", str(ema or args.ema), "--reference-frame", "0",
           "--image-dropout", "0.1", "--text-dropout", "0", "--checkpoint-every", "100",
           "--backend", "torch", "--seed", "0", "--quiet", *extra]
    if done:
        cmd.append("--resume")
    log(f"{run.name}: {' '.join(cmd[2:])}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(ROOT / "backends" / "torch"), os.environ.get("PYTHONPATH", "")]))
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env)
    log(f"{run.name}: {steps - done} steps in {time.time() - t0:.0f}s")


def phase_unet(work: Path, args) -> None:
    oxigaf_train(work, start_folder(work), work / "unet_run", args.unet_steps, args)


def phase_normals(work: Path, args) -> None:
    # The plain model widened with zero weights for the normal latents (it starts as the plain
    # model), fine-tuned briefly on the views' normal maps. A shorter EMA: with the plain run's
    # 0.998, 150 steps left 74 % of the exported weights at the starting point.
    oxigaf_train(work, work / "unet_run", work / "normals_run", args.normal_steps, args,
                 ("--init-in-channels", "8"), ema=0.99)


# --------------------------------------------------------------------------- export


def write_vae(work: Path, folder: Path, dtype) -> None:
    """``folder/vae``: the trained VAE, its scaling factor set to 1/std of its latents."""
    from safetensors.torch import save_file

    ck = torch.load(work / "vae.pt")
    (folder / "vae").mkdir()
    (folder / "vae" / "config.json").write_text(
        json.dumps(dict(VAE_CONFIG, scaling_factor=round(ck["scaling_factor"], 5)), indent=2))
    save_file({k: v.to(dtype).contiguous() for k, v in ck["state"].items()},
              str(folder / "vae" / "diffusion_pytorch_model.safetensors"))


def export(run: Path, dst: Path) -> None:
    """The pipeline folder ``oxigaf train`` wrote, in float16, without its checkpoints and log."""
    from safetensors.numpy import load_file, save_file

    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy(run / "model_index.json", tmp / "model_index.json")
    for comp in ("feature_extractor", "image_encoder", "scheduler", "text_encoder", "tokenizer", "unet", "vae"):
        shutil.copytree(run / comp, tmp / comp, ignore=shutil.ignore_patterns("*.safetensors"))
        for f in (run / comp).glob("*.safetensors"):
            save_file({k: v.astype(np.float16) for k, v in load_file(str(f)).items()}, str(tmp / comp / f.name))
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    log(f"export: {run} -> {dst}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["data", "vae", "unet", "normals", "export", "all"])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "toy")
    ap.add_argument("--subjects", type=int, default=1200)
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--vae-batch", type=int, default=8)
    ap.add_argument("--unet-steps", type=int, default=3000)
    ap.add_argument("--normal-steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.998)
    # One thread: on a shared, oversubscribed machine two OpenMP threads spin against each other
    # (docs/toy-world.md has the measurement).
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "oxigaf" / "toy_model")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    phases = ["data", "vae", "unet", "normals", "export"] if args.phase == "all" else [args.phase]
    for ph in phases:
        if ph == "data":
            phase_data(args.work, args.subjects)
        elif ph == "vae":
            phase_vae(args.work, args.vae_steps, args.vae_batch, 1e-3)
        elif ph == "unet":
            phase_unet(args.work, args)
        elif ph == "normals":
            phase_normals(args.work, args)
        elif ph == "export":
            export(args.work / "unet_run", args.out / "imagedream")
            export(args.work / "normals_run", args.out / "imagedream-normals")
    return 0


if __name__ == "__main__":
    sys.exit(main())
