import os
from pathlib import Path

import numpy as np
import pytest

# Parity needs true float32 matmuls everywhere.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINTS = FIXTURES / "checkpoints"


def rel_l2(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


BACKENDS = [b for b in ("torch", "mlx") if _importable(b)]


@pytest.fixture(params=BACKENDS)
def backend_name(request) -> str:
    return request.param
