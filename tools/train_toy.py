"""Train oxigaf's embedded toy model: a small ImageDream-layout pipeline for the toy-head world.

    python tools/train_toy.py all --work runs/toy            # data, VAE, UNet, normal UNet, export
    python tools/train_toy.py vae --work runs/toy            # one phase (each reuses the earlier ones)

Phases (each writes into --work and is skipped when its output is there):

1. ``data``: ``toys.make_dataset`` (subjects 0..N-1, 4 views at azimuths 0/90/180/270, normal maps).
2. ``vae``: an ``AutoencoderKL`` (factor 8: 64 px -> 8x8x4 latents) trained from scratch on the
   views, normal maps and extra renders at random azimuths (L1 + MSE, a small KL term); its
   ``scaling_factor`` is set to 1/std of the latents. Reports reconstruction PSNR on held-out heads.
3. ``unet``: the multi-view UNet from scratch with ImageDream's objective: 4 target views
   (0/90/180/270 relative to the front) and the front view as reference (its clean latent in the
   reference slot, its CLIP states as image prompt), epsilon prediction, t uniform, MSE on the
   targets, 10 % conditioning dropout (zero CLIP states and zero reference latent: the
   unconditional branch of inference); AdamW, warm-up, gradient clipping, EMA, float32 (bfloat16 autocast measured
   5-10x slower on this CPU).
4. ``normals``: the normal-conditioned variant (in_channels 8): the plain UNet widened with zero
   weights for the normal latents (so it starts as the plain one), fine-tuned shortly.
5. ``export``: fp16 pipeline folders into ``oxigaf/toy_model/imagedream`` and ``imagedream-normals``.

The CLIP text and image encoders are small, random and frozen: the text encoder is the demo's
tiny one, the image encoder a patch embedding + position embedding (its one transformer layer is
zero, so its penultimate states are the layer-normed embeddings: a random linear patch feature).

Everything is seeded: the same arguments give the same weights on the same machine and torch.
``--gpu`` trains a bigger variant on a CUDA device (more steps and subjects).
"""

from __future__ import annotations

import argparse
import json
import math
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
from oxigaf.cameras import CameraParams, camera_vectors, default_cameras  # noqa: E402
from oxigaf.config import CLIPVisionConfig, UNetConfig, VAEConfig  # noqa: E402

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


def random_weights(shapes: dict[str, list[int]], seed: int) -> dict[str, np.ndarray]:
    """Norm scales 1, biases 0, matrices normal with std 1/sqrt(fan_in) (the demo's recipe)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in sorted(shapes.items()):
        leaf = name.rsplit(".", 1)[-1]
        if len(shape) == 1 and leaf == "weight":
            out[name] = np.ones(shape, np.float32)
        elif len(shape) == 1:
            out[name] = np.zeros(shape, np.float32)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
            out[name] = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(max(fan_in, 1))
    return out


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


def encode_cache(work: Path) -> dict:
    """Latents of every view and normal map, CLIP states of every front view (float16), cached."""
    cache = work / "cache.pt"
    if cache.is_file():
        return torch.load(cache)
    from oxigaf.images import CLIPPreprocessor
    from oxigaf_torch.clip import CLIPImageEncoder
    from oxigaf_torch.common import load_weights

    views, normals, seeds = load_subjects(work / "data")
    vae = build_vae()
    ck = torch.load(work / "vae.pt")
    vae.load_state_dict(ck["state"])
    vae.eval()
    scale = ck["scaling_factor"]
    s, v = views.shape[:2]
    out = {"scale": scale, "seeds": seeds}
    with torch.no_grad():
        for key, arr in (("latents", views), ("normal_latents", normals)):
            flat = torch.from_numpy(arr.reshape(-1, SIZE, SIZE, 3).transpose(0, 3, 1, 2).copy()) * 2 - 1
            lat = torch.cat([vae_posterior(vae, flat[i:i + 256])[0] for i in range(0, len(flat), 256)]) * scale
            out[key] = lat.reshape(s, v, 4, SIZE // 8, SIZE // 8).float()
        cfg = CLIPVisionConfig.from_dict(IMAGE_ENCODER_CONFIG)
        with torch.device("meta"):
            enc = CLIPImageEncoder(cfg, projection=False)
        load_weights(enc, image_encoder_weights(), "image_encoder")
        pre = CLIPPreprocessor.from_folder(DEMO / "feature_extractor")
        clip = []
        for i in range(s):
            px = torch.from_numpy(pre(Image.fromarray(np.round(views[i, 0] * 255).astype(np.uint8))))
            clip.append(enc(px, output_hidden_states=True)["hidden_states"][-2].half())
        out["clip"] = torch.cat(clip)
    torch.save(out, cache)
    log(f"cache: {s} subjects encoded")
    return out


def diffusion_schedule() -> torch.Tensor:
    cfg = json.loads((DEMO / "scheduler" / "scheduler_config.json").read_text())
    betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, cfg["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def train_unet(work: Path, unet, steps: int, batch: int, lr: float, seed: int, normals: bool, out: Path,
               warmup: int = 50, ema_decay: float = 0.995, drop: float = 0.1, resume: dict | None = None) -> None:
    """Train to ``steps``; ``resume``: a checkpoint of this function (weights, optimiser, EMA, data order)."""
    data = encode_cache(work)
    lat, nlat, clip = data["latents"], data["normal_latents"], data["clip"]
    s = lat.shape[0]
    alphas = diffusion_schedule()
    cams = torch.from_numpy(np.concatenate([camera_vectors(default_cameras(4)), np.zeros((1, 16), np.float32)]))
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    start = 1
    if resume is not None:
        start = resume["step"] + 1
        ema = resume["ema"]
        if "state" in resume:
            unet.load_state_dict(resume["state"])
            opt.load_state_dict(resume["opt"])
            gen.set_state(resume["gen"])
        else:
            # A checkpoint that kept only the EMA weights: continue from them with a fresh optimiser.
            unet.load_state_dict(resume["ema"])
            gen.manual_seed(seed + start)
    context = torch.zeros(batch * 5, 77, UNET_CONFIG["context_dim"])
    text = text_context()
    context[:] = text
    log_f = (out.parent / f"{out.stem}_log.jsonl").open("a" if resume is not None else "w")
    t0 = time.time()
    unet.train()
    for step in range(start, steps + 1):
        idx = torch.randint(0, s, (batch,), generator=gen)
        x0 = lat[idx]  # (B, 4, 4, h, w) targets at 0/90/180/270
        ref = lat[idx, 0]  # the front view
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, len(alphas), (batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        keep = (torch.rand(batch, generator=gen) >= drop).float()
        frames = torch.cat([xt, torch.randn((batch, 1) + x0.shape[2:], generator=gen)], 1)  # ref slot: replaced
        ip_img = ref * keep.view(-1, 1, 1, 1)
        if normals:
            nm = torch.cat([nlat[idx], nlat[idx, :1]], 1)  # the views' normal latents, then the photo's
            frames = torch.cat([frames, nm], 2)
        ip = clip[idx].float() * keep.view(-1, 1, 1)
        ip = ip.repeat_interleave(5, 0)
        ts = t.repeat_interleave(5).float()
        lr_now = lr * min(1.0, (step - start + 1) / warmup if resume is not None and "state" not in resume
                          else step / warmup)
        for g in opt.param_groups:
            g["lr"] = lr_now
        eps = unet(frames.flatten(0, 1), ts, context, camera=cams.repeat(batch, 1), num_frames=5, ip=ip,
                   ip_img=ip_img)
        eps = eps.reshape(batch, 5, 4, *x0.shape[3:])[:, :4]
        loss = F.mse_loss(eps, noise)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"NaN loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for k, v in unet.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
        log_f.write(json.dumps({"step": step, "loss": loss.item(), "lr": lr_now, "seconds": time.time() - t0}) + "\n")
        if step % 25 == 0 or step == steps:
            log_f.flush()
            log(f"{out.stem} step {step}/{steps} loss {loss.item():.4f} "
                f"({(time.time() - t0) / (step - start + 1):.2f}s/step)")
        if step % 50 == 0 or step == steps:
            torch.save({"ema": ema, "step": step, "state": unet.state_dict(), "opt": opt.state_dict(),
                        "gen": gen.get_state()}, out.with_suffix(".tmp"))
            out.with_suffix(".tmp").replace(out)
    log_f.close()


_TEXT = None


def text_context() -> torch.Tensor:
    """The empty prompt's text-encoder states (the pipeline's default prompt and negative prompt)."""
    global _TEXT
    if _TEXT is None:
        from oxigaf.tokenizers import CLIPTokenizer
        from oxigaf_torch.clip import load_text_encoder

        tmp = Path(TEXT_DIR)
        enc = load_text_encoder(tmp / "text_encoder")
        ids = CLIPTokenizer.from_pretrained(tmp / "tokenizer")([""])
        _TEXT = enc(torch.from_numpy(ids))["last_hidden_state"].float()
    return _TEXT


TEXT_DIR = ""


def phase_unet(work: Path, steps: int, batch: int, lr: float) -> None:
    out = work / "unet.pt"
    resume = torch.load(out) if out.is_file() else None
    if resume is not None and resume["step"] >= steps:
        return
    unet = build_unet(4)
    init_unet(unet, seed=0)
    log(f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters"
        + (f", resuming at step {resume['step']}" if resume else ""))
    train_unet(work, unet, steps, batch, lr, seed=0, normals=False, out=out, resume=resume)


def phase_normals(work: Path, steps: int, batch: int, lr: float) -> None:
    out = work / "unet_normals.pt"
    if out.is_file() and torch.load(out)["step"] >= steps and \
            torch.load(out).get("base_step") == torch.load(work / "unet.pt")["step"]:
        return
    plain = torch.load(work / "unet.pt")["ema"]
    unet = build_unet(8)
    init_unet(unet, seed=1)
    state = dict(plain)
    w = plain["input_blocks.0.0.weight"]
    # Widened input conv: zero weights for the normal latents, so it starts as the plain model.
    state["input_blocks.0.0.weight"] = torch.cat([w, torch.zeros_like(w)], 1)
    unet.load_state_dict(state)
    train_unet(work, unet, steps, batch, lr, seed=1, normals=True, out=out, warmup=20)
    ck = torch.load(out)
    ck["base_step"] = torch.load(work / "unet.pt")["step"]
    torch.save(ck, out)


# --------------------------------------------------------------------------- export


def export(work: Path, dst: Path, normals: bool) -> None:
    from safetensors.torch import save_file

    scale = torch.load(work / "vae.pt")["scaling_factor"]
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    build_encoders(tmp)
    (tmp / "vae").mkdir()
    (tmp / "vae" / "config.json").write_text(json.dumps(dict(VAE_CONFIG, scaling_factor=round(scale, 5)), indent=2))
    vae_state = torch.load(work / "vae.pt")["state"]
    save_file({k: v.half().contiguous() for k, v in vae_state.items()},
              str(tmp / "vae" / "diffusion_pytorch_model.safetensors"))
    (tmp / "unet").mkdir()
    (tmp / "unet" / "config.json").write_text(json.dumps(dict(UNET_CONFIG, in_channels=8 if normals else 4),
                                                         indent=2))
    ema = torch.load(work / ("unet_normals.pt" if normals else "unet.pt"))["ema"]
    save_file({k: v.half().contiguous() for k, v in ema.items()},
              str(tmp / "unet" / "diffusion_pytorch_model.safetensors"))
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    log(f"export: {dst}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["data", "vae", "unet", "normals", "export", "all"])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "toy")
    ap.add_argument("--subjects", type=int, default=600)
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--vae-batch", type=int, default=8)
    ap.add_argument("--unet-steps", type=int, default=1600)
    ap.add_argument("--normal-steps", type=int, default=80)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    # One thread: on a shared, oversubscribed 2-core machine two OpenMP threads spin against each
    # other (measured 4-5x slower per step than one).
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "oxigaf" / "toy_model")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    global TEXT_DIR
    TEXT_DIR = str(args.work / "encoders")
    if not (args.work / "encoders" / "model_index.json").is_file():
        build_encoders(args.work / "encoders")
    phases = ["data", "vae", "unet", "normals", "export"] if args.phase == "all" else [args.phase]
    for ph in phases:
        if ph == "data":
            phase_data(args.work, args.subjects)
        elif ph == "vae":
            phase_vae(args.work, args.vae_steps, args.vae_batch, 1e-3)
        elif ph == "unet":
            phase_unet(args.work, args.unet_steps, args.batch, args.lr)
        elif ph == "normals":
            phase_normals(args.work, args.normal_steps, args.batch, args.lr / 3)
        elif ph == "export":
            export(args.work, args.out / "imagedream", normals=False)
            if (args.work / "unet_normals.pt").is_file():
                export(args.work, args.out / "imagedream-normals", normals=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
