"""``oxigaf info``: the installed backends, their devices and versions."""

from __future__ import annotations

import argparse
import platform


def add_parser(sub) -> argparse.ArgumentParser:
    return sub.add_parser("info", help="installed backends, devices and versions")


def run(args) -> int:
    from .. import __version__, plugins

    print(f"oxigaf {__version__}, Python {platform.python_version()} on {platform.system()} {platform.machine()}")
    for name, spec in sorted(plugins.backend_specs().items()):
        why = spec.available()
        if why is not None:
            print(f"  {name}: not available ({why}); install with pip install '{spec.extra}'")
            continue
        backend = plugins.get_backend(name)
        versions = ", ".join(f"{k} {v}" for k, v in backend.versions().items())
        print(f"  {name}: available, default device {backend.device}" + (f"; {versions}" if versions else ""))
    return 0
