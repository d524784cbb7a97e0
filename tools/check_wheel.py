"""Check what ``pip install oxigaf`` gets: build the wheel, install it the way a user does, run it.

1. Copies the source tree (``git ls-files`` plus untracked files git does not ignore, as a fresh clone
   with the work in progress would have) to a temporary folder and builds the wheel there with
   ``pip wheel --no-deps`` (so no stale ``build/`` folder of the checkout can hide or add a file).
2. Checks that the wheel holds every module (``.py``) of ``oxigaf/``, ``backends/torch/oxigaf_torch/``
   and ``backends/mlx/oxigaf_mlx/`` that the source tree has, every file of the shipped toy model
   (``oxigaf/toy_model/``) and of the demo data (``oxigaf/demo_data/``); fails with the list of what
   is missing. Other files of the package folders that the wheel lacks are listed as a warning.
3. Creates a fresh virtual environment outside the checkout and installs ``torch==2.13.0`` (the CPU
   wheel this project's machines carry) and the wheel, non-editable, with the extras ``torch,mlx,splat``.
4. From a working folder outside the checkout, imports every module of the source tree from the
   installed copy (each module's ``__file__`` must lie inside the virtual environment). A module whose
   import fails only because an optional dependency that is not installed here is missing (``ray``,
   ``gradio``, ``huggingface_hub``: the extras ``ray``, ``ui``, ``hub``; ``gsplat``) is listed as skipped;
   any other failure fails the check. A ``__main__`` module is found, not imported (that would run it).
5. Runs the installed ``oxigaf info``, ``oxigaf demo -o DIR`` (4 DDIM steps instead of 50: the same
   files and code, a tenth of the time) and a 2-step ``oxigaf train`` of the shipped toy model on a
   2-subject toy dataset (``toys.make_dataset``).

Usage: ``python tools/check_wheel.py [--keep] [--extras torch,mlx,splat]``. Exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Source folder of each top-level package -> its name in the wheel.
PACKAGE_ROOTS = {"oxigaf": "oxigaf", "backends/torch/oxigaf_torch": "oxigaf_torch",
                 "backends/mlx/oxigaf_mlx": "oxigaf_mlx"}
# Folders of shipped data: every file under them must be in the wheel.
DATA_DIRS = ("oxigaf/toy_model/", "oxigaf/demo_data/")
TORCH_PIN = "torch==2.13.0"
# Third-party packages of the extras (and gsplat, installed by hand on CUDA machines): a module whose
# import fails because one of them is not installed in the fresh environment is skipped, not failed.
OPTIONAL_IMPORTS = {"mlx", "torch", "ray", "pyarrow", "gradio", "huggingface_hub", "plyfile", "gsplat"}

_T0 = time.monotonic()


def step(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f} s] {msg}", flush=True)


def fail(msg: str, items: list[str] = ()) -> None:
    print(f"FAILED: {msg}", file=sys.stderr)
    for item in items:
        print(f"  {item}", file=sys.stderr)
    sys.exit(1)


def run(cmd: list[str], *, cwd: Path, env: dict | None = None, capture: bool = False) -> str:
    """Run a command, echoing it; a non-zero exit fails the check with its output."""
    line = " ".join(str(c) for c in cmd).replace("\n", " ")
    print("  $ " + (line if len(line) <= 300 else line[:300] + " ..."), flush=True)
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        print(proc.stdout[-6000:], file=sys.stderr)
        fail(f"exit status {proc.returncode}: {line[:300]}")
    if not capture:
        lines = [ln for ln in proc.stdout.splitlines() if not ln.startswith("WARNING: Location")]
        if lines:
            print("\n".join("    " + ln for ln in lines[-15:]), flush=True)
    return proc.stdout


def source_files() -> list[str]:
    """The files a fresh clone with the work in progress has: tracked and untracked-not-ignored."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         check=True, stdout=subprocess.PIPE).stdout.decode()
    return sorted({f for f in out.split("\0") if f and (ROOT / f).is_file()})


def wheel_name(path: str) -> str | None:
    """Where a source file of a package lands in the wheel (None: outside the packages)."""
    for src, pkg in PACKAGE_ROOTS.items():
        if path.startswith(src + "/"):
            return pkg + path[len(src):]
    return None


def module_name(wheel_path: str) -> str:
    parts = wheel_path[: -len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def build_wheel(files: list[str], tmp: Path) -> Path:
    src = tmp / "src"
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    step(f"copied {len(files)} files of the source tree to {src}; building the wheel")
    dist = tmp / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, src], cwd=tmp)
    wheels = list(dist.glob("oxigaf-*.whl"))
    if len(wheels) != 1:
        fail(f"expected one oxigaf wheel in {dist}", [p.name for p in dist.iterdir()])
    return wheels[0]


def check_contents(wheel: Path, files: list[str]) -> list[str]:
    """Fail unless the wheel holds every module and shipped data file; return the module names."""
    with zipfile.ZipFile(wheel) as z:
        held = set(z.namelist())
    expected = {f: wheel_name(f) for f in files if wheel_name(f)}
    modules = sorted(w for f, w in expected.items() if f.endswith(".py"))
    data = sorted(w for f, w in expected.items() if f.startswith(DATA_DIRS))
    other = sorted(w for f, w in expected.items() if not f.endswith(".py") and not f.startswith(DATA_DIRS))
    missing = [w for w in modules + data if w not in held]
    in_wheel = {n for n in held if n.endswith(".py") and ".dist-info/" not in n}
    step(f"the wheel {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB) holds {len(in_wheel)} modules; "
         f"the source tree has {len(modules)} modules and {len(data)} toy-model / demo-data files")
    if missing:
        fail(f"{len(missing)} file(s) of the source tree are missing from the wheel", missing)
    if not any(w.startswith("oxigaf/toy_model/") and w.endswith(".safetensors") for w in data):
        fail("the source tree has no toy-model weights (oxigaf/toy_model/**/*.safetensors)")
    not_shipped = [w for w in other if w not in held]
    if not_shipped:
        print("  warning: files of the package folders that the wheel lacks (package data?):")
        for w in not_shipped:
            print(f"    {w}")
    extra = sorted(in_wheel - set(modules))
    if extra:
        print("  warning: modules in the wheel that the source tree lacks:", ", ".join(extra))
    step(f"OK: every module and all {len(data)} toy-model / demo-data files are in the wheel")
    return [module_name(w) for w in modules]


IMPORT_SCRIPT = r"""
import importlib, importlib.util, json, sys, traceback
venv, optional = sys.argv[1], set(sys.argv[2].split(","))
report = {"ok": [], "skipped": {}, "failed": {}, "outside": {}}
for name in sys.argv[3:]:
    try:
        if name.endswith(".__main__"):  # importing it would run the command: find it, do not run it
            spec = importlib.util.find_spec(name)
            if spec is None:
                raise ModuleNotFoundError(f"no module named {name!r}", name=name)
            mod = type("Found", (), {"__file__": spec.origin})
        else:
            mod = importlib.import_module(name)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top in optional and importlib.util.find_spec(top) is None:
            report["skipped"][name] = top
        else:
            report["failed"][name] = traceback.format_exc(limit=3)
        continue
    except Exception:
        report["failed"][name] = traceback.format_exc(limit=3)
        continue
    path = getattr(mod, "__file__", None) or ""
    if not path.startswith(venv):
        report["outside"][name] = path
    report["ok"].append(name)
print("REPORT " + json.dumps(report))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (wheel, venv, outputs)")
    ap.add_argument("--extras", default="torch,mlx,splat", help="extras to install the wheel with")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="oxigaf-wheel-check-")).resolve()
    if tmp.is_relative_to(ROOT):
        fail(f"the temporary folder {tmp} lies inside the checkout {ROOT}")
    step(f"checking the wheel of {ROOT} in {tmp}")
    try:
        files = source_files()
        wheel = build_wheel(files, tmp)
        modules = check_contents(wheel, files)

        venv = tmp / "venv"
        step(f"creating a fresh virtual environment {venv}")
        run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
        py, bindir = venv / "bin" / "python", venv / "bin"
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
        env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
                   PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
        step(f"installing {TORCH_PIN} and the wheel (non-editable) with [{args.extras}]")
        # This interpreter's pip installs into the new environment (--python): no pip of its own to set
        # up there; --no-compile skips byte-compiling torch's thousands of modules, which nothing here needs.
        run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-compile", TORCH_PIN,
             f"{wheel}[{args.extras}]"], cwd=tmp, env=env)

        work = tmp / "work"
        work.mkdir()
        step(f"importing the {len(modules)} modules of the source tree from the installed copy (cwd {work})")
        out = run([py, "-c", IMPORT_SCRIPT, str(venv) + os.sep, ",".join(sorted(OPTIONAL_IMPORTS)), *modules],
                  cwd=work, env=env, capture=True)
        report = json.loads(out.split("REPORT ", 1)[1])
        for name, dep in sorted(report["skipped"].items()):
            print(f"  skipped {name}: needs {dep}, not installed here")
        if report["failed"]:
            fail(f"{len(report['failed'])} module(s) failed to import from the installed wheel",
                 [f"{n}:\n{tb}" for n, tb in sorted(report["failed"].items())])
        if report["outside"]:
            fail("module(s) imported from outside the virtual environment",
                 [f"{n}: {p}" for n, p in sorted(report["outside"].items())])
        step(f"OK: {len(report['ok'])} imported from {venv}, {len(report['skipped'])} skipped")

        oxigaf = bindir / "oxigaf"
        step("oxigaf info")
        run([oxigaf, "info"], cwd=work, env=env)
        step("oxigaf demo")
        demo = work / "demo"
        run([oxigaf, "demo", "-o", demo, "--backend", "torch", "--steps", "4", "--quiet"], cwd=work, env=env)
        if not any(demo.iterdir()):
            fail(f"oxigaf demo wrote nothing to {demo}")
        step("oxigaf train: 2 steps of the shipped toy model on a 2-subject toy dataset")
        data = work / "data"
        model = run([py, "-c", "import sys; from oxigaf import toys; "
                     "toys.make_dataset(sys.argv[1], subjects=2, views_per_subject=4, size=64, seed=0); "
                     "print(toys.model_path())", data], cwd=work, env=env, capture=True).strip().splitlines()[-1]
        if not Path(model).resolve().is_relative_to(venv):
            fail(f"the toy model {model} is not the installed one")
        trained = work / "trained"
        run([oxigaf, "train", data, "--model", model, "-o", trained, "--steps", "2", "--backend", "torch",
             "--quiet"], cwd=work, env=env)
        if not (trained / "unet").is_dir():
            fail(f"oxigaf train wrote no unet/ to {trained}", [p.name for p in trained.iterdir()])
        step("OK: the installed wheel builds, imports, and runs info, demo and train")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
