"""Random-weight checkpoints from manifests (tensor names and shapes): the demo's tiny model and
the benchmarks' real-shape models are both made here, each with its own numbers.

The recipe: float16; matrices and convolution kernels normal with std 1/sqrt(fan_in); every 1-D
``weight`` (in these models always a normalisation scale, whatever its module is called: the LDM
names say ``in_layers.0``) 1 + N(0, norm_scale_std²); every 1-D ``bias`` N(0, bias_std²). A std of
0 gives exactly 1 (scales) or 0 (biases) and draws nothing from the generator, so the numbers of
the other tensors do not depend on it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np


def random_weights(shapes: dict[str, list[int]], seed: int, *, norm_scale_std: float = 0.0,
                   bias_std: float = 0.0) -> dict[str, np.ndarray]:
    """float16 tensors for every name in ``shapes``, drawn in name order from ``seed`` (module docstring)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in sorted(shapes.items()):
        leaf = name.rsplit(".", 1)[-1]
        if len(shape) == 1 and leaf == "weight":
            # 1, not 0, at the centre: a zero scale would switch the whole block off
            arr = (1.0 + norm_scale_std * rng.standard_normal(shape, dtype=np.float32) if norm_scale_std
                   else np.ones(shape, np.float32))
        elif len(shape) == 1 and leaf == "bias":
            arr = (bias_std * rng.standard_normal(shape, dtype=np.float32) if bias_std
                   else np.zeros(shape, np.float32))
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else int(shape[0])
            arr = rng.standard_normal(shape, dtype=np.float32) / np.sqrt(max(fan_in, 1))
        out[name] = arr.astype(np.float16)
    return out


def build_folder(dst: Path, fill: Callable[[Path], None]) -> None:
    """Replace the folder ``dst`` with what ``fill(tmp)`` writes into a fresh temporary folder
    beside it: a crash or an interrupt midway leaves the old folder (or none), never half a one."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        fill(tmp)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
