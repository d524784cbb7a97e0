"""Packaging: pyproject.toml's package discovery finds every folder of modules of the source tree, and
tools/check_wheel.py (which CI runs on the real wheel) fails on a wheel that lacks a module or a
toy-model file."""

import importlib.util
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")
expand = pytest.importorskip("setuptools.config.expand")


def _check_wheel():
    spec = importlib.util.spec_from_file_location("check_wheel", ROOT / "tools" / "check_wheel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_discovery_finds_every_package_of_the_source_tree():
    cw = _check_wheel()
    with open(ROOT / "pyproject.toml", "rb") as f:
        find = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]
    package_dir = {}
    found = set(expand.find_packages(**find, fill_package_dir=package_dir, root_dir=str(ROOT)))
    modules = [w for f in cw.source_files() if f.endswith(".py") and (w := cw.wheel_name(f))]
    assert len(modules) > 40
    wanted = {w.rsplit("/", 1)[0].replace("/", ".") for w in modules}
    assert {"oxigaf", "oxigaf.training", "oxigaf_torch", "oxigaf_mlx"} <= wanted
    assert sorted(wanted - found) == []
    assert Path(package_dir["oxigaf_torch"]) == Path("backends/torch/oxigaf_torch")
    assert Path(package_dir["oxigaf_mlx"]) == Path("backends/mlx/oxigaf_mlx")


def _wheel(path: Path, names) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for n in names:
            z.writestr(n, "")
    return path


FILES = ["oxigaf/__init__.py", "oxigaf/sub/__init__.py", "oxigaf/sub/mod.py",
         "backends/torch/oxigaf_torch/fast/x.py", "oxigaf/toy_model/m/unet/w.safetensors",
         "oxigaf/demo_data/portrait.png", "tests/test_x.py", "README.md"]
IN_WHEEL = ["oxigaf/__init__.py", "oxigaf/sub/__init__.py", "oxigaf/sub/mod.py", "oxigaf_torch/fast/x.py",
            "oxigaf/toy_model/m/unet/w.safetensors", "oxigaf/demo_data/portrait.png"]


def test_check_wheel_passes_a_complete_wheel(tmp_path):
    names = _check_wheel().check_contents(_wheel(tmp_path / "w.whl", IN_WHEEL), FILES)
    assert names == ["oxigaf", "oxigaf.sub", "oxigaf.sub.mod", "oxigaf_torch.fast.x"]


@pytest.mark.parametrize("missing", ["oxigaf/sub/mod.py", "oxigaf_torch/fast/x.py",
                                     "oxigaf/toy_model/m/unet/w.safetensors", "oxigaf/demo_data/portrait.png"])
def test_check_wheel_fails_on_a_missing_file(tmp_path, capsys, missing):
    wheel = _wheel(tmp_path / "w.whl", [n for n in IN_WHEEL if n != missing])
    with pytest.raises(SystemExit) as e:
        _check_wheel().check_contents(wheel, FILES)
    assert e.value.code == 1
    assert f"  {missing}\n" in capsys.readouterr().err
