"""What only torch can do for training: the UNet's loss and gradients, AdamW, LoRA layers.

The core (``oxigaf.training``) builds every batch in numpy and owns the schedule, data order,
logging and checkpoints; this module runs one optimiser step on it. Weights are float32
masters; ``dtype="bfloat16"`` runs the forward and backward passes under ``torch.autocast``.
Tensors cross the interface as numpy arrays with the checkpoint's key names and layouts.
"""

from __future__ import annotations

import contextlib
import types

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from oxigaf.config import UNetConfig
from oxigaf.errors import ConfigError

from .common import load_weights
from .unet import MultiViewUNet


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().copy()  # never a view of a live parameter


def _lora_forward(self, x):
    base = F.linear(x, self.weight, self.bias)
    return base + self.lora_scale * F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))


def _flushes_denormals() -> bool:
    """Whether the CPU flushes float32 denormals to zero now (``torch.set_flush_denormal``)."""
    return float(torch.tensor([1e-39], dtype=torch.float32).mul(2.0)[0]) == 0.0


@contextlib.contextmanager
def flushing_denormals():
    """Float32 denormals (below 1.2e-38) flushed to zero inside, the previous setting restored
    after. Adam's second moments of small gradients fall into denormals, which x86 CPUs process
    many times slower; flushing them is what GPUs do anyway."""
    before = _flushes_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def _checkpointed(block):
    plain = block.forward

    def forward(self, x, emb, context, num_frames, call):
        return checkpoint(plain, x, emb, context, num_frames, call, use_reentrant=False)

    block.forward = types.MethodType(forward, block)


class UNetTrainer:
    """A trainable multi-view UNet with its AdamW state.

    ``state``: the UNet's weights (numpy, checkpoint names). ``lora``: None for full
    fine-tuning, else ``{"targets": [...], "scale": s, "tensors": {name: array}}`` (the base is
    then frozen and only the adapters train).
    """

    def __init__(self, config: UNetConfig, state: dict[str, np.ndarray], *, device="cpu", dtype: str = "float32",
                 lora: dict | None = None, grad_checkpointing: bool = False, attention: str = "auto",
                 weight_decay: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-8, ema_decay: float | None = None):
        if dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"training dtype must be float32 or bfloat16; got {dtype!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        with torch.device("meta"):
            model = MultiViewUNet(config)
        self.model = load_weights(model, state, config.source or "UNet state", dtype=torch.float32, device=self.device)
        self.model.attention = attention
        self.lora = lora
        if lora is None:
            self.model.requires_grad_(True)
            self.params = dict(self.model.named_parameters())
        else:
            self.params = {}
            for target in lora["targets"]:
                lin = self.model.get_submodule(target)
                for part in ("A", "B"):
                    name = f"{target}.lora_{part}.weight"
                    p = torch.nn.Parameter(torch.from_numpy(np.array(lora["tensors"][name], np.float32))
                                           .to(self.device))
                    lin.register_parameter(f"lora_{part}", p)
                    self.params[name] = p
                lin.lora_scale = float(lora["scale"])
                lin.forward = types.MethodType(_lora_forward, lin)
        self.model.train()
        if grad_checkpointing:
            for block in [*self.model.input_blocks, self.model.middle_block, *self.model.output_blocks]:
                _checkpointed(block)
        self.optimizer = torch.optim.AdamW(list(self.params.values()), lr=0.0, betas=tuple(betas), eps=eps,
                                           weight_decay=weight_decay, foreach=True)
        self.ema_decay = ema_decay
        self.ema = ({k: p.detach().clone() for k, p in self.params.items()} if ema_decay else None)

    # -- forward ---------------------------------------------------------------------------

    def _tensor(self, a):
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def _loss(self, batch) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
            out = self.model(self._tensor(batch.x), self._tensor(batch.timesteps), self._tensor(batch.context),
                             camera=self._tensor(batch.camera), num_frames=batch.num_frames,
                             ip=self._tensor(batch.ip), ip_img=self._tensor(batch.ip_img))
        b, f = batch.batch_size, batch.num_frames
        pred = out.float().reshape((b, f) + tuple(out.shape[1:]))[:, : batch.views]
        return torch.mean((pred - self._tensor(batch.target)) ** 2)

    def loss(self, batch) -> float:
        """The objective on ``batch`` with the current weights (autograd on: the training path)."""
        with flushing_denormals():
            return float(self._loss(batch).detach())

    def predict(self, batch) -> np.ndarray:
        with torch.no_grad(), flushing_denormals():
            out = self.model(self._tensor(batch.x), self._tensor(batch.timesteps), self._tensor(batch.context),
                             camera=self._tensor(batch.camera), num_frames=batch.num_frames,
                             ip=self._tensor(batch.ip), ip_img=self._tensor(batch.ip_img))
        return _numpy(out)

    # -- one optimiser step ----------------------------------------------------------------

    def step(self, micro_batches: list, lr: float, max_grad_norm: float | None = None) -> float:
        """Accumulate gradients over ``micro_batches`` (their mean loss), clip, one AdamW step.

        Returns the mean loss; a non-finite loss or gradient returns NaN and leaves the weights
        and the optimiser state untouched.
        """
        with flushing_denormals():
            return self._step(micro_batches, lr, max_grad_norm)

    def _step(self, micro_batches: list, lr: float, max_grad_norm: float | None) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        n = len(micro_batches)
        for batch in micro_batches:
            loss = self._loss(batch)
            value = float(loss.detach())
            if not np.isfinite(value):
                self.optimizer.zero_grad(set_to_none=True)
                return float("nan")
            (loss / n).backward()
            total += value
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norm = torch.sqrt(sum(torch.sum(g.float() ** 2) for g in grads)) if grads else torch.zeros(())
        if not bool(torch.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan")
        if max_grad_norm is not None and max_grad_norm > 0:
            coef = min(1.0, float(max_grad_norm) / (float(norm) + 1e-6))
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)
        for group in self.optimizer.param_groups:
            group["lr"] = float(lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                for k, p in self.params.items():
                    self.ema[k].lerp_(p.detach(), 1.0 - self.ema_decay)
        return total / n

    # -- state in and out (numpy, checkpoint names) ----------------------------------------

    def trainable_state(self) -> dict[str, np.ndarray]:
        return {k: _numpy(p) for k, p in self.params.items()}

    def ema_state(self) -> dict[str, np.ndarray] | None:
        return None if self.ema is None else {k: _numpy(v) for k, v in self.ema.items()}

    def optimizer_state(self) -> tuple[dict[str, np.ndarray], int]:
        """``exp_avg.{name}``, ``exp_avg_sq.{name}`` tensors and the step count."""
        tensors, step = {}, 0
        for k, p in self.params.items():
            st = self.optimizer.state.get(p)
            if not st:
                continue
            tensors[f"exp_avg.{k}"] = _numpy(st["exp_avg"])
            tensors[f"exp_avg_sq.{k}"] = _numpy(st["exp_avg_sq"])
            step = int(float(st["step"]))
        return tensors, step

    def load_state(self, trainable: dict[str, np.ndarray], optimizer: dict[str, np.ndarray], step: int,
                   ema: dict[str, np.ndarray] | None = None) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(torch.from_numpy(np.asarray(trainable[k], np.float32)))
                if step > 0:
                    self.optimizer.state[p] = {
                        "step": torch.tensor(float(step)),
                        "exp_avg": torch.from_numpy(np.array(optimizer[f"exp_avg.{k}"], np.float32)).to(self.device),
                        "exp_avg_sq": torch.from_numpy(np.array(optimizer[f"exp_avg_sq.{k}"], np.float32))
                        .to(self.device),
                    }
            if self.ema is not None and ema is not None:
                for k in self.ema:
                    self.ema[k].copy_(torch.from_numpy(np.asarray(ema[k], np.float32)))


def add_to_weights(model: torch.nn.Module, deltas: dict[str, np.ndarray]) -> torch.nn.Module:
    """``weight += delta`` for each named parameter (the sum in float32, stored in the model's dtype)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, d in deltas.items():
            p = params[name]
            p.copy_((p.float() + torch.from_numpy(np.asarray(d, np.float32)).to(p.device)).to(p.dtype))
    return model
