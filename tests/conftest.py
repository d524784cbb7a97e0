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


def make_hub_cache(cache: Path, repo_id: str, source: Path, revision: str = "0" * 40) -> Path:
    """Lay ``source`` out as a Hugging Face hub cache entry for ``repo_id`` (what
    ``snapshot_download`` leaves behind), so hub ids resolve offline. Returns the snapshot folder."""
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    shutil.copytree(source, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot
