"""Backend discovery through entry points, and the core staying free of torch and mlx."""

import importlib
import subprocess
import sys
import textwrap

import pytest

import oxigaf
from oxigaf import plugins
from oxigaf.errors import BackendError, ConfigError

from conftest import BACKENDS


def test_builtin_backends_found_through_entry_points():
    specs = plugins.backend_specs()
    assert {"torch", "mlx"} <= set(specs)
    assert set(BACKENDS) <= set(oxigaf.available_backends())
    # They came from the oxigaf.backends entry-point group, not from a hard-coded list.
    names = {name for name, _ in plugins._manager().list_name_plugin()}
    assert {"torch", "mlx"} <= names


@pytest.mark.parametrize("name", BACKENDS)
def test_get_backend_by_name(name):
    b = oxigaf.get_backend(name, dtype="float32")
    assert b.name == name and b.dtype == "float32"
    import numpy as np

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y = b.concat([b.asarray(x), b.asarray(x * 2)], axis=0)
    np.testing.assert_array_equal(b.to_numpy(y), np.concatenate([x, x * 2]))
    assert b.isfinite(y)
    assert set(b.memory()) == {"current_bytes", "peak_bytes"}


@pytest.mark.parametrize("name", BACKENDS)
def test_builtin_backends_subclass_backend_and_report_versions(name):
    from oxigaf.backend import Backend

    b = oxigaf.get_backend(name, device="cpu", dtype="float32")
    assert isinstance(b, Backend)
    versions = b.versions()
    framework = importlib.import_module("mlx.core" if name == "mlx" else name)
    assert versions[name] == framework.__version__ and versions["device"] == "cpu"
    # every model loader of the contract is the backend's own, not the base class's stub
    for method in ("load_unet", "load_vae", "load_image_encoder", "load_text_encoder", "load_upsampler_unet",
                   "unet_trainer", "apply_lora"):
        assert getattr(type(b), method) is not getattr(Backend, method), method


def test_auto_picks_best_available():
    assert oxigaf.get_backend("auto").name == oxigaf.available_backends()[0]


def test_unknown_backend_names_it_and_lists_available():
    with pytest.raises(BackendError) as err:
        oxigaf.get_backend("tensorflow")
    msg = str(err.value)
    assert "tensorflow" in msg and "available" in msg
    for name in oxigaf.available_backends():
        assert name in msg


def test_unknown_dtype_is_config_error():
    with pytest.raises(ConfigError, match="float8"):
        oxigaf.get_backend("auto", dtype="float8")


def test_unknown_device_is_backend_error():
    with pytest.raises(BackendError, match="tpu"):
        oxigaf.get_backend(BACKENDS[0], device="tpu")


def test_third_party_backend_via_entry_point(tmp_path, monkeypatch):
    """A throwaway distribution declaring an ``oxigaf.backends`` entry point is discovered."""
    (tmp_path / "fancy_backend.py").write_text(textwrap.dedent("""
        from oxigaf.backend import BackendSpec
        from oxigaf.plugins import hookimpl

        class Fancy:
            name = "fancy"
            def __init__(self, device=None, dtype="float32"):
                self.device, self.dtype = device or "abacus", dtype

        @hookimpl
        def oxigaf_backends():
            return [BackendSpec("fancy", Fancy, lambda: None, lambda: -1),
                    BackendSpec("broken", Fancy, lambda: "needs an abacus", extra="fancy-extra")]
    """))
    dist = tmp_path / "fancy_backend-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fancy-backend\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[oxigaf.backends]\nfancy = fancy_backend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.refresh()
    try:
        assert "fancy" in oxigaf.available_backends()
        assert "broken" not in oxigaf.available_backends()
        assert oxigaf.available_backends()[-1] == "fancy"  # lowest priority
        b = oxigaf.get_backend("fancy", device="abacus")
        assert (b.name, b.device) == ("fancy", "abacus")
        with pytest.raises(BackendError) as err:
            oxigaf.get_backend("broken")
        assert "needs an abacus" in str(err.value) and "fancy-extra" in str(err.value)
    finally:
        monkeypatch.undo()
        plugins.refresh()
    assert "fancy" not in oxigaf.available_backends()


def test_core_imports_neither_torch_nor_mlx():
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        import oxigaf
        for m in pkgutil.iter_modules(oxigaf.__path__):
            importlib.import_module("oxigaf." + m.name)
        oxigaf.plugins.backend_specs()  # discovering plugins must not import their frameworks either
        bad = sorted({n.split(".")[0] for n in sys.modules} & {"torch", "mlx", "diffusers", "transformers"})
        assert not bad, bad
        print("clean")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr
