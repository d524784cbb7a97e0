"""MLX's CPU matmuls on Linux, and an opt-in way to run them on torch's MKL. Imports neither.

The mlx[cpu] wheel for Linux bundles netlib's reference BLAS, far slower than an optimised
one (docs/performance.md has the measurement), and MLX's CPU matmuls and convolutions all go
through its ``cblas_sgemm``. That wrapper calls the Fortran ``sgemm_`` through the PLT, so
whatever library in the process's global symbol scope exports ``sgemm_`` serves it. torch's
``libtorch_cpu.so`` exports MKL's ``sgemm_`` and ``dgemm_`` (linked in statically), so promoting
the already-loaded torch library to the global scope before MLX loads is enough: no compiler, no
system package, no restart. Same results to float32 rounding (the MLX reference run of the test
suite: 7.7e-7 against the reference BLAS).

The package never does this on its own (it changes which ``sgemm_`` every library loaded later
binds to); the test suite and the benchmarks do, and so may a user of MLX on a Linux CPU:

    from oxigaf_mlx.blas import lend_torch_blas
    lend_torch_blas()  # before anything imports mlx
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

TORCH_MKL = "torch's MKL"


def lend_torch_blas() -> str:
    """Make MLX's CPU BLAS in this process torch's MKL where that can work; what it now is:
    ``TORCH_MKL``, or "reference (why not)", or the platform's own (not Linux)."""
    if sys.platform != "linux":
        return "the platform's (not Linux)"
    if "mlx.core" in sys.modules:  # its symbols were bound when it loaded (Python dlopens with RTLD_NOW)
        return "reference (mlx was loaded first)"
    try:
        import torch
    except ImportError:
        return "reference (torch is not installed)"
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"),
                          mode=os.RTLD_GLOBAL | os.RTLD_NOLOAD)
        lib.sgemm_  # noqa: B018 (torch builds without MKL, as on ARM, export none)
    except (OSError, AttributeError) as e:
        return f"reference ({e})"
    return TORCH_MKL
