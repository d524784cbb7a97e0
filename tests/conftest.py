import os
from pathlib import Path

import numpy as np
import pytest

# Parity needs true float32 matmuls everywhere.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

# One compute thread per test process (torch's OpenMP pool, OpenBLAS's pthreads), set before
# either library loads. The test shapes are tiny, so a second thread buys little even on an idle
# machine, and on a loaded one every operator's thread barrier waits for a descheduled thread
# (docs/testing.md has the measurement). Results are the same to float32 rounding.
# OXIGAF_TEST_THREADS=N chooses another count.
_THREADS = os.environ.get("OXIGAF_TEST_THREADS", "1")
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _THREADS)

# The mlx[cpu] wheel for Linux bundles netlib's reference BLAS, far slower than an optimised one.
# Before anything loads MLX, the suite lends it torch's MKL (oxigaf_mlx.blas, which says how;
# docs/testing.md has what it saves). OXIGAF_TEST_MLX_BLAS=reference keeps the wheel's own BLAS.
if os.environ.get("OXIGAF_TEST_MLX_BLAS") == "reference":
    MLX_BLAS = "reference (OXIGAF_TEST_MLX_BLAS=reference)"
else:
    from oxigaf_mlx.blas import lend_torch_blas

    MLX_BLAS = lend_torch_blas()


def pytest_report_header(config):
    return f"mlx CPU BLAS: {MLX_BLAS}"


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core (each runs one compute thread, above), at most 4: past that
    the heaviest files, not the worker count, set the wall time, and each worker holds its own models."""
    return max(2, min(os.cpu_count() or 1, 4))


# The order files start in. xdist (``--dist loadfile --no-loadscope-reorder``, pyproject.toml)
# hands each worker two files at the start, in collection order, and one more whenever it is down
# to one. The two heaviest files start first, one per worker; the small third one is what waits
# behind the heaviest. By default xdist would order the files by their number of tests, and the
# MLX reference run (test_pipeline_e2e.py, the suite's heaviest file) could start last.
RUN_FIRST = ("test_pipeline_e2e.py", "test_refine.py", "test_config.py", "test_toys.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(RUN_FIRST)))  # stable: files stay whole


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


@pytest.fixture(scope="module")
def toy_photo():
    """The front view of a held-out toy head (1,000,003), the photo of tests on the shipped toy model."""
    from PIL import Image

    from oxigaf import toys
    from oxigaf.images import to_uint8

    return Image.fromarray(to_uint8(toys.render(1_000_003, [0.0], 64)[0][0]))


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
