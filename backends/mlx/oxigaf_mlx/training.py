"""What only MLX can do for training: the UNet's loss and gradients (``mx.value_and_grad``),
``mlx.optimizers.AdamW``, LoRA layers; the same numbers as the torch backend.

Weights are float32 masters held here as a parameter tree; ``dtype="bfloat16"`` casts them
(and so the compute) to bfloat16 inside the differentiated function, so the gradients reach
the float32 masters. Tensors cross the interface as numpy arrays with the checkpoint's names
and PyTorch layouts (convolution weights (O, I, kH, kW); MLX keeps (O, kH, kW, I) inside).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from oxigaf.config import UNetConfig
from oxigaf.errors import ConfigError

from .common import load_weights
from .unet import MultiViewUNet, ResBlock, SpatialTransformer3D


def _to_torch_layout(name: str, a: mx.array) -> np.ndarray:
    arr = np.array(a.astype(mx.float32))
    return arr.transpose(0, 3, 1, 2) if arr.ndim == 4 else arr


def _from_torch_layout(arr: np.ndarray) -> mx.array:
    arr = np.asarray(arr, np.float32)
    return mx.array(np.ascontiguousarray(arr.transpose(0, 2, 3, 1) if arr.ndim == 4 else arr))


def _recompute(layer, base, arrays: tuple, *static):
    """``base.__call__(layer, *arrays, *static)`` under ``mx.checkpoint``: only the inputs are kept
    for the backward pass. The layer's trainable parameters are explicit inputs, so their
    gradients flow (as ``mlx.nn.utils.checkpoint`` does it)."""

    def inner(params, *xs):
        layer.update(params)
        return base.__call__(layer, *xs, *static)

    return mx.checkpoint(inner)(layer.trainable_parameters(), *arrays)


class _CheckpointedResBlock(ResBlock):
    def __call__(self, x, emb):
        return _recompute(self, ResBlock, (x, emb))


class _CheckpointedTransformer(SpatialTransformer3D):
    def __call__(self, x, context, num_frames, call):
        return _recompute(self, SpatialTransformer3D, (x, context), num_frames, call)


def _enable_checkpointing(model: MultiViewUNet) -> None:
    """Recompute every ResBlock and transformer in the backward pass (their class is swapped, so
    the parameter names stay the checkpoint's)."""
    for block in [*model.input_blocks, model.middle_block, *model.output_blocks]:
        for layer in block:
            if type(layer) is ResBlock:
                layer.__class__ = _CheckpointedResBlock
            elif type(layer) is SpatialTransformer3D:
                layer.__class__ = _CheckpointedTransformer


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (same parameter names) plus ``scale · B A x``."""

    def __init__(self, base: nn.Linear, a: np.ndarray, b: np.ndarray, scale: float):
        super().__init__()
        self.weight = base.weight
        if "bias" in base:
            self.bias = base.bias
        self.lora_A = mx.array(np.asarray(a, np.float32))
        self.lora_B = mx.array(np.asarray(b, np.float32))
        self.scale = float(scale)

    def __call__(self, x):
        y = x @ self.weight.T
        if "bias" in self:
            y = y + self.bias
        low = (x @ self.lora_A.astype(x.dtype).T) @ self.lora_B.astype(x.dtype).T
        return y + self.scale * low


def _parent(model: nn.Module, path: str):
    """(container, key) of a dotted module path (list indices are numbers)."""
    parts = path.split(".")
    node = model
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else getattr(node, p)
    return node, parts[-1]


def _get(node, key: str):
    return node[int(key)] if isinstance(node, list) else getattr(node, key)


def _assign(tree, dotted: str, value) -> None:
    """Set one leaf of a nested dict/list parameter tree in place."""
    node, key = _parent_tree(tree, dotted)
    node[int(key) if isinstance(node, list) else key] = value


def _parent_tree(tree, dotted: str):
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node, parts[-1]


def _set(node, key: str, value) -> None:
    if isinstance(node, list):
        node[int(key)] = value
    else:
        setattr(node, key, value)


class UNetTrainer:
    """A trainable multi-view UNet with its AdamW state (see ``oxigaf_torch.training.UNetTrainer``)."""

    def __init__(self, config: UNetConfig, state: dict[str, np.ndarray], *, dtype: str = "float32",
                 lora: dict | None = None, grad_checkpointing: bool = False, attention: str = "auto",
                 weight_decay: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-8, ema_decay: float | None = None):
        if dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"training dtype must be float32 or bfloat16; got {dtype!r}")
        self.dtype = dtype
        self.model = load_weights(MultiViewUNet(config, attention=attention), state,
                                  config.source or "UNet state", dtype="float32")
        self.lora = lora
        self.model.freeze()
        if lora is None:
            self.model.unfreeze()
            self.names = [k for k, _ in tree_flatten(self.model.trainable_parameters())]
        else:
            self.names = []
            for target in lora["targets"]:
                parent, key = _parent(self.model, target)
                layer = LoRALinear(_get(parent, key), lora["tensors"][f"{target}.lora_A.weight"],
                                   lora["tensors"][f"{target}.lora_B.weight"], lora["scale"])
                layer.freeze()
                layer.unfreeze(keys=["lora_A", "lora_B"])
                _set(parent, key, layer)
                self.names += [f"{target}.lora_A", f"{target}.lora_B"]
        self.model.train()
        if grad_checkpointing:
            _enable_checkpointing(self.model)
        if dtype == "bfloat16":  # frozen weights are only ever read in bfloat16
            frozen = {k for k, _ in tree_flatten(self.model.parameters())} - set(self.names)
            self.model.update(tree_unflatten([(k, v.astype(mx.bfloat16)) for k, v in
                                              tree_flatten(self.model.parameters()) if k in frozen]))
        self.params = self.model.trainable_parameters()
        self.optimizer = optim.AdamW(learning_rate=0.0, betas=list(betas), eps=eps, weight_decay=weight_decay,
                                     bias_correction=True)
        self.ema_decay = ema_decay
        self.ema = tree_map(lambda p: mx.array(p), self.params) if ema_decay else None
        self._grad = mx.value_and_grad(self._loss_of)
        mx.eval(self.model.parameters())

    # -- names: the interface uses ``{target}.lora_A.weight``, the tree ``{target}.lora_A``

    def _public(self, name: str) -> str:
        return name + ".weight" if self.lora is not None else name

    # -- forward ---------------------------------------------------------------------------

    def _forward(self, batch):
        a = lambda v: None if v is None else mx.array(np.ascontiguousarray(v))  # noqa: E731
        return self.model(a(batch.x), a(batch.timesteps), a(batch.context), camera=a(batch.camera),
                          num_frames=batch.num_frames, ip=a(batch.ip), ip_img=a(batch.ip_img))

    def _loss_of(self, params, batch):
        if self.dtype == "bfloat16":
            params = tree_map(lambda p: p.astype(mx.bfloat16), params)
        self.model.update(params)
        out = self._forward(batch).astype(mx.float32)
        b, f = batch.batch_size, batch.num_frames
        pred = out.reshape((b, f) + tuple(out.shape[1:]))[:, : batch.views]
        return mx.mean(mx.square(pred - mx.array(batch.target)))

    def loss(self, batch) -> float:
        value = self._loss_of(self.params, batch)
        mx.eval(value)
        return float(value.item())

    def predict(self, batch) -> np.ndarray:
        self.model.update(self.params)
        return np.array(self._forward(batch).astype(mx.float32))

    # -- one optimiser step ----------------------------------------------------------------

    def step(self, micro_batches: list, lr: float, max_grad_norm: float | None = None) -> float:
        n = len(micro_batches)
        total, grads = 0.0, None
        for batch in micro_batches:
            loss, g = self._grad(self.params, batch)
            mx.eval(loss, g)
            value = float(loss.item())
            if not np.isfinite(value):
                self.model.update(self.params)
                return float("nan")
            total += value
            g = tree_map(lambda x: x / n, g)
            grads = g if grads is None else tree_map(lambda x, y: x + y, grads, g)
        flat = [v for _, v in tree_flatten(grads)]
        norm = float(mx.sqrt(sum(mx.sum(mx.square(v.astype(mx.float32))) for v in flat)).item()) if flat else 0.0
        if not np.isfinite(norm):
            self.model.update(self.params)
            return float("nan")
        if max_grad_norm is not None and max_grad_norm > 0:
            coef = min(1.0, float(max_grad_norm) / (norm + 1e-6))
            if coef < 1.0:
                grads = tree_map(lambda x: x * coef, grads)
        self.optimizer.learning_rate = float(lr)
        self.params = self.optimizer.apply_gradients(grads, self.params)
        if self.ema is not None:
            d = self.ema_decay
            self.ema = tree_map(lambda e, p: e + (1.0 - d) * (p - e), self.ema, self.params)
        mx.eval(self.params, self.optimizer.state, self.ema)
        self.model.update(self.params)
        return total / n

    # -- state in and out (numpy, checkpoint names, PyTorch layouts) ------------------------

    def _export(self, tree) -> dict[str, np.ndarray]:
        return {self._public(k): _to_torch_layout(k, v) for k, v in tree_flatten(tree)}

    def trainable_state(self) -> dict[str, np.ndarray]:
        return self._export(self.params)

    def ema_state(self) -> dict[str, np.ndarray] | None:
        return None if self.ema is None else self._export(self.ema)

    def optimizer_state(self) -> tuple[dict[str, np.ndarray], int]:
        state = self.optimizer.state
        if "step" not in state or int(state["step"].item()) == 0:
            return {}, 0
        tensors = {}
        for k, v in tree_flatten({k: v for k, v in state.items() if k not in ("step", "learning_rate")}):
            name, moment = k.rsplit(".", 1)
            key = "exp_avg" if moment == "m" else "exp_avg_sq"
            tensors[f"{key}.{self._public(name)}"] = _to_torch_layout(name, v)
        return tensors, int(state["step"].item())

    def load_state(self, trainable: dict[str, np.ndarray], optimizer: dict[str, np.ndarray], step: int,
                   ema: dict[str, np.ndarray] | None = None) -> None:
        params = tree_map(lambda p: p, self.params)
        for k in self.names:
            _assign(params, k, _from_torch_layout(trainable[self._public(k)]))
        self.params = params
        self.model.update(self.params)
        if step > 0:
            self.optimizer.init(self.params)
            for k in self.names:
                slot, key = _parent_tree(self.optimizer.state, k)
                slot = slot[int(key) if isinstance(slot, list) else key]
                slot["m"] = _from_torch_layout(optimizer[f"exp_avg.{self._public(k)}"])
                slot["v"] = _from_torch_layout(optimizer[f"exp_avg_sq.{self._public(k)}"])
            self.optimizer.state["step"] = mx.array(step, mx.uint64)
        if self.ema is not None and ema is not None:
            self.ema = tree_map(lambda p: p, self.params)
            for k in self.names:
                _assign(self.ema, k, _from_torch_layout(ema[self._public(k)]))
        mx.eval(self.params, self.optimizer.state)


def add_to_weights(model: nn.Module, deltas: dict[str, np.ndarray]) -> nn.Module:
    """``weight += delta`` for each named parameter (PyTorch layout; Linear weights are the same in MLX)."""
    params = dict(tree_flatten(model.parameters()))
    updates = []
    for name, d in deltas.items():
        p = params[name]
        delta = _from_torch_layout(d)
        updates.append((name, (p.astype(mx.float32) + delta).astype(p.dtype)))
    model.update(tree_unflatten(updates))
    mx.eval(model.parameters())
    return model
