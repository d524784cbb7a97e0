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

# The mlx[cpu] wheel for Linux bundles a reference BLAS, ~10x slower than an optimised one (a 3x3
# convolution of the e2e model: 0.28 s against 0.027 s). So the test run restarts itself once with
# a fast BLAS preloaded for MLX: the OpenBLAS inside scipy's wheel (a dev dependency), whose symbols
# carry a "scipy_" prefix, behind a shim of two forwarding functions (cblas_sgemm, cblas_dgemm)
# compiled once with the system C compiler; else Debian's OpenBLAS where it is installed
# (libopenblas0-pthread). The shim comes first because preloading Debian's whole BLAS also hands
# torch its sgemm: a 2048x512x512 matmul took 0.41 s instead of 0.085 s, and the suite 7m26s
# instead of 5m13s. Results are the same to float32 rounding. A test-only speed-up: the package
# never does this. OXIGAF_TEST_OPENBLAS=0 turns it off, =debian picks Debian's OpenBLAS.
_OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
_SHIM = r"""
typedef int blasint;
#define FORWARD(T, NAME) \
  extern void scipy_##NAME(int, int, int, blasint, blasint, blasint, T, const T *, blasint, const T *, blasint, T, \
                           T *, blasint); \
  void NAME(int o, int ta, int tb, blasint m, blasint n, blasint k, T alpha, const T *a, blasint lda, const T *b, \
            blasint ldb, T beta, T *c, blasint ldc) { \
    scipy_##NAME(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc); }
FORWARD(float, cblas_sgemm)
FORWARD(double, cblas_dgemm)
"""


def _scipy_openblas_shim() -> str | None:
    """A shared library exporting cblas_sgemm/dgemm from scipy's bundled OpenBLAS, built once into
    a cache folder; None without scipy's OpenBLAS or a C compiler."""
    import glob
    import hashlib
    import importlib.util
    import shutil
    import subprocess
    import tempfile

    spec = importlib.util.find_spec("scipy")
    cc = shutil.which("cc") or shutil.which("gcc")
    if spec is None or spec.origin is None or cc is None:
        return None
    libs = sorted(glob.glob(str(Path(spec.origin).parents[1] / "scipy.libs" / "libscipy_openblas*.so")))
    if not libs:
        return None
    lib = Path(libs[-1])
    key = hashlib.sha256((_SHIM + str(lib)).encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"oxigaf-test-cblas-{key}.so"
    if out.is_file():
        return str(out)
    src = out.with_suffix(f".{os.getpid()}.c")
    src.write_text(_SHIM)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    try:
        subprocess.run([cc, "-O2", "-shared", "-fPIC", str(src), "-o", str(tmp), f"-L{lib.parent}", f"-l:{lib.name}",
                        f"-Wl,-rpath,{lib.parent}"], check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)  # several processes may build it at once: each renames a whole file
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        src.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return str(out)


def pytest_configure(config):
    if not (
        sys.platform == "linux"
        and not hasattr(config, "workerinput")  # an xdist worker inherits its controller's environment
        and os.environ.get("OXIGAF_TEST_OPENBLAS", "1") != "0"
        and "mlx" not in sys.modules
    ):
        return
    blas = None if os.environ.get("OXIGAF_TEST_OPENBLAS") == "debian" else _scipy_openblas_shim()
    if blas is None and os.path.exists(_OPENBLAS):
        blas = _OPENBLAS
    if blas is None or blas in os.environ.get("LD_PRELOAD", ""):
        return
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.stop_global_capturing()  # give the new process the real stdout and stderr
    env = {**os.environ, "LD_PRELOAD": ":".join(filter(None, [blas, os.environ.get("LD_PRELOAD")])),
           "OXIGAF_TEST_OPENBLAS": "0"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "pytest", *config.invocation_params.args], env)


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core (each runs one compute thread, above), at most 4: past that
    the heaviest files, not the worker count, set the wall time, and each worker holds its own models."""
    return max(2, min(os.cpu_count() or 1, 4))


# The order files start in. xdist (``--dist loadfile --no-loadscope-reorder``, pyproject.toml)
# hands each worker two files at the start, in collection order, and one more whenever it is down
# to one. The two heaviest files start first, one per worker; the small third one is what waits
# behind the heaviest. By default xdist would order the files by their number of tests, and the
# MLX reference run (test_pipeline_e2e.py: 6 to 10 minutes on 2 cores without a fast BLAS) could
# start last.
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
