"""LoRA adapters on the UNet's attention projections: the layout on disk, initialisation, merging.

An adapter on a ``Linear`` with weight W (out, in) adds ``scale · B A x`` with A (rank, in),
B (out, rank), ``scale = alpha / rank``. A starts uniform in ±1/√in (as PEFT's Kaiming-uniform
start), B at zero, so training starts from the base model exactly. Targets: every
``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (and ImageDream's ``to_k_ip``, ``to_v_ip``) of the
UNet's transformer attention (``attn1`` self-attention over all views, ``attn2`` cross-attention).

On disk (``OUT/lora/``): ``adapter_model.safetensors`` with ``{target}.lora_A.weight`` and
``{target}.lora_B.weight`` per target, and ``adapter_config.json`` with ``r`` (rank),
``lora_alpha``, ``target_modules`` (the full module names) and ``base_model``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ModelLoadError

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_TARGET = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_k_ip|to_v_ip|to_out\.0)\.weight$")


def lora_targets(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Module names (without ``.weight``) of the attention projections in a UNet state."""
    return sorted(k[: -len(".weight")] for k, s in shapes.items() if _TARGET.search(k) and len(s) == 2)


def init_lora(shapes: dict[str, tuple[int, ...]], targets: list[str], rank: int,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Initial adapter tensors (numpy float32): A uniform ±1/√in, B zero."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"lora rank must be a positive integer; got {rank!r}")
    out = {}
    for t in targets:
        o, i = shapes[t + ".weight"]
        if rank > min(o, i):
            raise ConfigError(f"lora rank {rank} exceeds the size of {t} ({o}x{i})")
        bound = 1.0 / np.sqrt(i)
        out[t + ".lora_A.weight"] = rng.uniform(-bound, bound, size=(rank, i)).astype(np.float32)
        out[t + ".lora_B.weight"] = np.zeros((o, rank), np.float32)
    return out


@dataclass
class LoRA:
    rank: int
    alpha: float
    targets: list[str]
    tensors: dict[str, np.ndarray]
    base_model: str = ""

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)

    def deltas(self) -> dict[str, np.ndarray]:
        """``{target}.weight -> scale · B @ A`` (float32)."""
        out = {}
        for t in self.targets:
            a = self.tensors[t + ".lora_A.weight"].astype(np.float32)
            b = self.tensors[t + ".lora_B.weight"].astype(np.float32)
            out[t + ".weight"] = (np.float32(self.scale) * (b @ a)).astype(np.float32)
        return out

    def check_against(self, shapes: dict[str, tuple[int, ...]], where: str) -> None:
        """Every target must be a weight of this shape in the UNet ``where``."""
        problems = []
        for t in self.targets:
            w = shapes.get(t + ".weight")
            a = self.tensors[t + ".lora_A.weight"].shape
            b = self.tensors[t + ".lora_B.weight"].shape
            if w is None:
                problems.append(f"{t} (no such weight)")
            elif len(w) != 2 or a != (self.rank, w[1]) or b != (w[0], self.rank):
                problems.append(f"{t} (A {a}, B {b} vs weight {tuple(w)})")
        if problems:
            raise ModelLoadError(f"the LoRA adapter does not fit the UNet in {where}: " + ", ".join(problems))

    def merge_into(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(state)
        for k, d in self.deltas().items():
            out[k] = (np.asarray(state[k], np.float32) + d).astype(np.float32)
        return out

    def save(self, folder: str | os.PathLike) -> Path:
        from safetensors.numpy import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{WEIGHTS_NAME}.tmp"
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in self.tensors.items()}, str(tmp))
        os.replace(tmp, folder / WEIGHTS_NAME)
        cfg = {"peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha, "target_modules": self.targets,
               "base_model": self.base_model}
        tmp = folder / f".{CONFIG_NAME}.tmp"
        tmp.write_text(json.dumps(cfg, indent=2))
        os.replace(tmp, folder / CONFIG_NAME)
        return folder


def load_lora(folder: str | os.PathLike) -> LoRA:
    """Read ``adapter_config.json`` + ``adapter_model.safetensors``; a ``ModelLoadError`` names what is wrong."""
    from ..checkpoints import read_json, read_safetensors

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"LoRA folder {folder} does not exist")
    cfg = read_json(folder / CONFIG_NAME, CONFIG_NAME)
    rank, alpha, targets = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r")), cfg.get("target_modules")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ModelLoadError(f"{folder / CONFIG_NAME}: 'r' must be a positive integer; got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ModelLoadError(f"{folder / CONFIG_NAME}: 'lora_alpha' must be a number; got {alpha!r}")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise ModelLoadError(f"{folder / CONFIG_NAME}: 'target_modules' must be a list of module names")
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise ModelLoadError(f"LoRA folder {folder} has no {WEIGHTS_NAME}")
    tensors = {k: np.asarray(v, np.float32) for k, v in read_safetensors(path).items()}
    want = {f"{t}.lora_{s}.weight" for t in targets for s in "AB"}
    missing, extra = sorted(want - set(tensors)), sorted(set(tensors) - want)
    if missing or extra:
        raise ModelLoadError(f"{path} does not match its config: missing {missing[:5]}, unexpected {extra[:5]}")
    return LoRA(rank, float(alpha), list(targets), tensors, str(cfg.get("base_model", "")))
