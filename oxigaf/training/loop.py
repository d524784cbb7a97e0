"""The training loop: schedule, data order, logging, checkpoints, resume, export.

Everything random (which subject, reference and target frames, the timestep, the noise,
the dropout coin flips) is drawn by one numpy Generator seeded with ``seed``, in a fixed
order, and its state is saved in every checkpoint: so a run resumed from a checkpoint draws
exactly what the uninterrupted run would have, on any backend.

``OUT`` layout::

    OUT/model_index.json, vae/, text_encoder/, tokenizer/, scheduler/, [image_encoder/, feature_extractor/]
        copied from the base model
    OUT/unet/               the trained UNet (float32 safetensors; LoRA merged; EMA weights with ema_decay)
    OUT/lora/               with lora_rank: the adapter alone (see oxigaf.training.lora)
    OUT/training_log.jsonl  one JSON object per optimiser step: step (from 1), loss, lr, seconds
    OUT/checkpoints/step-00000100/   weights being trained, AdamW state, EMA, state.json (rng, step)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checkpoints import load_state, read_json, read_shapes, resolve_model
from ..config import UNetConfig, VAEConfig, check_attention
from ..errors import ConfigError, InputError, NumericsError
from ..layout import components
from ..synthetic import build_folder
from .data import MultiViewDataset
from .lora import LoRA, init_lora, lora_targets
from .objective import build_batch, draw_sample

CHECKPOINTS = "checkpoints"
LOG_NAME = "training_log.jsonl"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
INPUT_CONV = "input_blocks.0.0.weight"


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (the CLI's flags). ``steps`` optimiser steps are run per call (a resumed
    run does ``steps`` more); each step averages ``grad_accumulation`` micro-batches of
    ``batch_size`` samples. The learning rate warms up linearly over ``warmup_steps``, then stays.
    ``dtype`` bfloat16: torch autocast / MLX bfloat16 compute over float32 master weights.
    ``size``: training resolution in pixels (default: the UNet's ``image_size`` × the VAE factor).
    ``lora_rank`` 0 trains every weight; > 0 trains adapters (``lora_alpha`` default = rank).
    ``init_in_channels``: widen the UNet's input conv to this many channels (new weights zero).
    ``reference_frame``: None draws the reference frame of each sample uniformly; an index makes
    that frame of every subject the reference (e.g. 0 when frame 0 is always the front view)."""

    steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    grad_accumulation: int = 1
    ema_decay: float | None = None
    grad_checkpointing: bool = False
    dtype: str = "float32"
    seed: int = 0
    views: int = 4
    image_dropout: float = 0.1
    text_dropout: float = 0.1
    lora_rank: int = 0
    lora_alpha: float | None = None
    init_in_channels: int | None = None
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    size: int | None = None
    attention: str = "auto"
    progress: bool = True
    reference_frame: int | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accumulation", "views", "checkpoint_every", "keep_checkpoints"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer; got {v!r}")
        for name in ("warmup_steps", "lora_rank", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be a non-negative integer; got {v!r}")
        for name in ("lr", "weight_decay", "eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name} must be a finite number >= 0; got {v!r}")
        for name in ("image_dropout", "text_dropout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} must be a probability in [0, 1]; got {v!r}")
        if self.ema_decay is not None and not (isinstance(self.ema_decay, (int, float)) and 0 < self.ema_decay < 1):
            raise ConfigError(f"ema_decay must be None or in (0, 1); got {self.ema_decay!r}")
        if self.max_grad_norm is not None and not (isinstance(self.max_grad_norm, (int, float))
                                                   and self.max_grad_norm > 0):
            raise ConfigError(f"max_grad_norm must be None or > 0; got {self.max_grad_norm!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"training dtype must be float32 or bfloat16; got {self.dtype!r}")
        if self.init_in_channels is not None and (isinstance(self.init_in_channels, bool)
                                                  or not isinstance(self.init_in_channels, int)
                                                  or self.init_in_channels < 1):
            raise ConfigError(f"init_in_channels must be a positive integer; got {self.init_in_channels!r}")
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 8):
            raise ConfigError(f"size must be an integer number of pixels >= 8; got {self.size!r}")
        check_attention(self.attention)
        if self.reference_frame is not None and (isinstance(self.reference_frame, bool)
                                                 or not isinstance(self.reference_frame, int)):
            raise ConfigError(f"reference_frame must be None or a frame index; got {self.reference_frame!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimiser step ``step`` (from 1)."""
        if self.warmup_steps and step <= self.warmup_steps:
            return float(self.lr) * step / self.warmup_steps
        return float(self.lr)

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save_tensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path))


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    from ..checkpoints import read_safetensors

    return {k: np.array(v, np.float32) for k, v in read_safetensors(path).items()}


def latest_checkpoint(output: str | os.PathLike) -> Path | None:
    root = Path(output) / CHECKPOINTS
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and
                  (p / "state.json").is_file())
    return done[-1] if done else None


def widen_input(state: dict[str, np.ndarray], channels: int, where: str) -> dict[str, np.ndarray]:
    """The UNet state with its input conv taking ``channels`` inputs; the new weights are zero."""
    w = np.asarray(state[INPUT_CONV], np.float32)
    if channels < w.shape[1]:
        raise ConfigError(f"init_in_channels {channels} is fewer than the UNet's {w.shape[1]} input channels ({where})")
    out = dict(state)
    out[INPUT_CONV] = np.concatenate([w, np.zeros((w.shape[0], channels - w.shape[1]) + w.shape[2:], np.float32)],
                                     axis=1)
    return out


class Trainer:
    """Fine-tune (or train from a random start) a multi-view UNet on ``data``; write ``output``.

    ``model``: a pipeline folder or hub id in the published ImageDream / MVDream layout (its
    UNet weights are the starting point, whatever they are). ``backend``: "torch", "mlx",
    "auto" or a Backend. ``resume``: continue from the latest checkpoint in ``output``.
    Checks (data files, configs, output folder) run in the constructor; ``train()`` does the work.
    """

    def __init__(self, data: str | os.PathLike, model: str | os.PathLike, output: str | os.PathLike,
                 config: TrainConfig | None = None, *, backend="auto", device: str | None = None,
                 resume: bool = False):
        self.config = cfg = config or TrainConfig()
        self.output = Path(output)
        self.resume_from = None
        if resume:
            self.resume_from = latest_checkpoint(self.output)
            if self.resume_from is None:
                raise InputError(f"--resume: nothing to resume in {self.output} "
                                 "(no checkpoints/step-* with state.json)")
        elif self.output.exists() and (not self.output.is_dir() or any(self.output.iterdir())):
            raise InputError(f"output folder {self.output} is not empty: pass resume=True (--resume) to continue "
                             "the run in it, or choose another folder")
        self.dataset = MultiViewDataset(data, cfg.views)
        self.model_path = resolve_model(model)
        index = read_json(self.model_path / "model_index.json", "model_index.json")
        missing, self.image_conditioned = components(self.model_path, index)
        if missing:
            raise InputError(f"model folder {self.model_path} lacks the component(s) {', '.join(missing)}")
        base = UNetConfig.from_folder(self.model_path / "unet")
        self.vae_config = VAEConfig.from_folder(self.model_path / "vae")
        channels = cfg.init_in_channels or base.in_channels
        self.unet_config = dataclasses.replace(base, in_channels=channels)
        latent = self.vae_config.latent_channels
        if channels == 2 * latent:
            self.normals = True
            self.dataset.require_normals()
        elif channels == latent:
            self.normals = False
        else:
            raise ConfigError(f"the UNet takes {channels} input channels; training supports {latent} (latents) or "
                              f"{2 * latent} (latents and normal latents)")
        if self.image_conditioned != (base.ip_dim > 0):
            raise ConfigError(f"{self.model_path}: the UNet's ip_dim {base.ip_dim} does not match the folder's layout "
                              f"({'with' if self.image_conditioned else 'without'} an image encoder)")
        from ..schedulers import DDIMScheduler

        self.scheduler = DDIMScheduler.from_folder(self.model_path / "scheduler")
        self.factor = self.vae_config.downsampling_factor
        self.size = cfg.size or base.image_size * self.factor
        depth = 1 << (len(base.channel_mult) - 1)
        if self.size % (self.factor * depth):
            raise ConfigError(f"training size {self.size} px must be a multiple of {self.factor * depth} "
                              f"(VAE factor {self.factor} x UNet downsampling {depth})")
        read_shapes(self.model_path / "unet")  # a broken weight file fails here, before any encoding
        if isinstance(backend, str):
            from ..plugins import get_backend

            backend = get_backend(backend, device, "float32")
        self.backend = backend
        self.text_states: dict[str, np.ndarray] = {}
        self.trainer = None
        self.lora: dict | None = None

    # -- preparation -----------------------------------------------------------------------

    def prepare(self) -> None:
        """Encode the data (cached), the prompts, and build the trainable UNet."""
        b, cfg = self.backend, self.config
        from ..images import CLIPPreprocessor
        from ..tokenizers import CLIPTokenizer

        mp = self.model_path
        pre = CLIPPreprocessor.from_folder(mp / "feature_extractor") if self.image_conditioned else None
        self.dataset.encode(b, mp / "vae", self.size, mp / "image_encoder" if self.image_conditioned else None, pre,
                            normals=self.normals, progress=cfg.progress)
        tok = CLIPTokenizer.from_pretrained(mp / "tokenizer")
        text = b.load_text_encoder(mp / "text_encoder", dtype="float32")
        prompts = sorted({""} | {s.prompt for s in self.dataset.subjects})
        for p in prompts:
            states = text(b.asarray(tok([p])))["last_hidden_state"]
            self.text_states[p] = b.to_numpy(states).astype(np.float32)[0]
        del text
        import gc

        gc.collect()

        state = {k: np.asarray(v, np.float32) for k, v in load_state(mp / "unet").items()}
        if cfg.init_in_channels:
            state = widen_input(state, cfg.init_in_channels, str(mp / "unet"))
        self.base_state = state
        if cfg.lora_rank:
            shapes = {k: tuple(v.shape) for k, v in state.items()}
            targets = lora_targets(shapes)
            if not targets:
                raise ConfigError(f"{mp / 'unet'} has no attention projections to put LoRA adapters on")
            tensors = init_lora(shapes, targets, cfg.lora_rank, np.random.default_rng([cfg.seed, 2]))
            alpha = float(cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank)
            self.lora = {"targets": targets, "scale": alpha / cfg.lora_rank, "tensors": tensors, "alpha": alpha}
        self.trainer = b.unet_trainer(
            dataclasses.replace(self.unet_config, source=str(mp / "unet")), state, dtype=cfg.dtype, lora=self.lora,
            grad_checkpointing=cfg.grad_checkpointing, attention=cfg.attention, weight_decay=cfg.weight_decay,
            betas=tuple(cfg.betas), eps=cfg.eps, ema_decay=cfg.ema_decay,
        )

    def draw_batch(self, rng: np.random.Generator):
        cfg = self.config
        h = self.size // self.factor
        shape = (self.vae_config.latent_channels, h, h)
        draws = [draw_sample(rng, self.dataset, self.scheduler.num_train_timesteps, shape, cfg.image_dropout,
                             cfg.text_dropout, cfg.reference_frame) for _ in range(cfg.batch_size)]
        return build_batch(draws, self.dataset, self.scheduler.alphas_cumprod, self.scheduler.config.prediction_type,
                           self.text_states, image_conditioned=self.image_conditioned, normals=self.normals)

    # -- the loop --------------------------------------------------------------------------

    def train(self) -> Path:
        """Run ``config.steps`` optimiser steps, checkpointing, and export the pipeline folder."""
        cfg = self.config
        if self.trainer is None:
            self.prepare()
        self.output.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(cfg.seed)
        start = 0
        if self.resume_from is not None:
            start, rng = self._load_checkpoint(self.resume_from)
        log_path = self.output / LOG_NAME
        self._trim_log(log_path, start)
        last_good = self.resume_from
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="training", disable=None if cfg.progress else True, file=sys.stderr)
        with open(log_path, "a") as log:
            for step in range(start + 1, start + cfg.steps + 1):
                t0 = time.perf_counter()
                micro = [self.draw_batch(rng) for _ in range(cfg.grad_accumulation)]
                lr = cfg.lr_at(step)
                loss = self.trainer.step(micro, lr, cfg.max_grad_norm)
                if not math.isfinite(loss):
                    bar.close()
                    kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                    raise NumericsError(f"the training loss is NaN or Inf at step {step} (lr {lr:g}); stopped: {kept}")
                seconds = time.perf_counter() - t0
                log.write(json.dumps({"step": step, "loss": loss, "lr": lr, "seconds": seconds}) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if step % cfg.checkpoint_every == 0 or step == start + cfg.steps:
                    last_good = self._save_checkpoint(step, rng)
        bar.close()
        self.export()
        return self.output

    # -- checkpoints -----------------------------------------------------------------------

    def _save_checkpoint(self, step: int, rng: np.random.Generator) -> Path:
        root = self.output / CHECKPOINTS
        final = root / f"step-{step:08d}"

        def fill(tmp: Path) -> None:
            _save_tensors(self.trainer.trainable_state(), tmp / "trainable.safetensors")
            opt, opt_step = self.trainer.optimizer_state()
            _save_tensors(opt, tmp / "optimizer.safetensors")
            ema = self.trainer.ema_state()
            if ema is not None:
                _save_tensors(ema, tmp / "ema.safetensors")
            state = {"step": step, "optimizer_step": opt_step, "rng": rng.bit_generator.state,
                     "config": self.config.to_json(), "in_channels": self.unet_config.in_channels,
                     "lora": None if self.lora is None else {"targets": self.lora["targets"],
                                                             "alpha": self.lora["alpha"]},
                     "base_model": str(self.model_path), "backend": self.backend.name}
            (tmp / "state.json").write_text(json.dumps(state, indent=2))

        build_folder(final, fill)  # a temporary folder beside it, renamed into place
        done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
        for old in done[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _load_checkpoint(self, folder: Path) -> tuple[int, np.random.Generator]:
        state = read_json(folder / "state.json", "checkpoint state.json")
        if state.get("in_channels") != self.unet_config.in_channels:
            raise ConfigError(f"checkpoint {folder} trained a UNet with {state.get('in_channels')} input channels; "
                              f"this run's has {self.unet_config.in_channels} (pass the same --init-in-channels)")
        if (state.get("lora") is None) != (self.lora is None):
            raise ConfigError(f"checkpoint {folder} is {'a LoRA' if state.get('lora') else 'a full'} run; pass the "
                              "same --lora-rank to resume it")
        trainable = _read_tensors(folder / "trainable.safetensors")
        opt = _read_tensors(folder / "optimizer.safetensors")
        ema = _read_tensors(folder / "ema.safetensors") if (folder / "ema.safetensors").is_file() else None
        if self.lora is not None:
            self.lora["tensors"] = trainable
        self.trainer.load_state(trainable, opt, int(state["optimizer_step"]), ema)
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        return int(state["step"]), rng

    @staticmethod
    def _trim_log(path: Path, step: int) -> None:
        """Drop log lines past ``step`` (a run that died after its last checkpoint), so a resumed
        run's lines follow on; normally there are none and the file is only appended to."""
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        if len(keep) != len([ln for ln in lines if ln.strip()]):
            _write_atomic(path, "".join(ln + "\n" for ln in keep))

    # -- export ----------------------------------------------------------------------------

    def final_unet_state(self) -> dict[str, np.ndarray]:
        weights = self.trainer.ema_state() or self.trainer.trainable_state()
        if self.lora is None:
            return weights
        return LoRA(self.config.lora_rank, self.lora["alpha"], self.lora["targets"], weights).merge_into(
            self.base_state)

    def export(self) -> Path:
        """Write the pipeline folder: the base's components, ``unet/`` trained, ``lora/`` with LoRA."""
        out, mp = self.output, self.model_path
        for name in sorted(os.listdir(mp)):
            src = mp / name
            if name == "unet" or name.startswith("."):
                continue
            dst = out / name
            if src.is_dir():
                tmp = out / f".{name}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(src, tmp)
                if dst.exists():
                    shutil.rmtree(dst)
                tmp.rename(dst)
            elif name == "model_index.json":
                _write_atomic(dst, src.read_text())
        unet_cfg = read_json(mp / "unet" / "config.json", "config.json")
        unet_cfg["in_channels"] = self.unet_config.in_channels
        tmp = out / ".unet.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(unet_cfg, indent=2))
        _save_tensors(self.final_unet_state(), tmp / UNET_WEIGHTS)
        if (out / "unet").exists():
            shutil.rmtree(out / "unet")
        tmp.rename(out / "unet")
        if self.lora is not None:
            weights = self.trainer.ema_state() or self.trainer.trainable_state()
            LoRA(self.config.lora_rank, self.lora["alpha"], self.lora["targets"], weights,
                 str(self.model_path)).save(out / "lora")
        return out


def train(data, model, output, *, backend="auto", device=None, resume=False, **settings) -> Path:
    """``Trainer(data, model, output, TrainConfig(**settings), ...).train()``."""
    return Trainer(data, model, output, TrainConfig(**settings), backend=backend, device=device,
                   resume=resume).train()
