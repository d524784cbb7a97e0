import os
import sys
from pathlib import Path

import numpy as np
import pytest

# Parity needs true float32 matmuls everywhere.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

# One compute thread per test process (torch's OpenMP pool, OpenBLAS's pthreads), set before
# either library loads. The test shapes are tiny, so a second thread buys little even on an idle
# machine, and on a loaded one (this 2-core machine is shared) every operator's thread barrier
# waits for a descheduled thread: a tiny UNet call took 8.0 s with 2 threads and 0.81 s with 1
# at load 11. Results are the same to float32 rounding. OXIGAF_TEST_THREADS=N chooses another count.
_THREADS = os.environ.get("OXIGAF_TEST_THREADS", "1")
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _THREADS)

# The mlx[cpu] wheel for Linux bundles a reference BLAS, ~30x slower than an optimised one (a
# 2048² matmul: 4.7 s against 0.16 s here). When Debian's OpenBLAS is installed
# (libopenblas0-pthread), the test run restarts itself once with it preloaded; results are the same.
# A test-only speed-up: the package never does this. OXIGAF_TEST_OPENBLAS=0 turns it off.
_OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def pytest_configure(config):
    if not (
        sys.platform == "linux"
        and os.environ.get("OXIGAF_TEST_OPENBLAS", "1") != "0"
        and os.path.exists(_OPENBLAS)
        and _OPENBLAS not in os.environ.get("LD_PRELOAD", "")
        and "mlx" not in sys.modules
    ):
        return
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.stop_global_capturing()  # give the new process the real stdout and stderr
    env = {**os.environ, "LD_PRELOAD": ":".join(filter(None, [_OPENBLAS, os.environ.get("LD_PRELOAD")])),
           "OXIGAF_TEST_OPENBLAS": "0"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "pytest", *config.invocation_params.args], env)


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
