"""Backend discovery with pluggy, through the ``oxigaf.backends`` entry-point group.

A backend distribution declares an entry point in that group naming a module (or object)
that implements ``oxigaf_backends() -> list[BackendSpec]``. Importing it must be cheap and
must not import its framework: availability is asked separately.
"""

from __future__ import annotations

import functools

import pluggy

from .backend import Backend, BackendSpec
from .config import check_dtype
from .errors import BackendError

ENTRY_POINT_GROUP = "oxigaf.backends"

hookspec = pluggy.HookspecMarker("oxigaf")
hookimpl = pluggy.HookimplMarker("oxigaf")


class BackendHooks:
    @hookspec
    def oxigaf_backends(self) -> list[BackendSpec]:
        """Return the backends this plugin provides."""


@functools.lru_cache(maxsize=1)
def _manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("oxigaf")
    pm.add_hookspecs(BackendHooks)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm


def refresh() -> None:
    """Forget discovered plugins (after installing one in the running process)."""
    _manager.cache_clear()


def backend_specs() -> dict[str, BackendSpec]:
    specs: dict[str, BackendSpec] = {}
    for group in _manager().hook.oxigaf_backends():
        for spec in group or ():
            specs.setdefault(spec.name, spec)
    return specs


def available_backends() -> list[str]:
    """Names of the backends installed *and* importable here, best first."""
    specs = [s for s in backend_specs().values() if s.available() is None]
    return [s.name for s in sorted(specs, key=lambda s: -s.priority())]


def get_backend(name: str = "auto", device: str | None = None, dtype: str = "float32") -> Backend:
    """Make a backend by name; ``"auto"`` picks the best available one."""
    if isinstance(name, Backend) and not isinstance(name, str):
        return name
    check_dtype(dtype)
    specs = backend_specs()
    usable = available_backends()
    if name == "auto":
        if not usable:
            raise BackendError(
                "no oxigaf backend is installed; install one with pip install 'oxigaf[torch]' or 'oxigaf[mlx]'"
            )
        name = usable[0]
    if name not in specs:
        hint = {"torch": "oxigaf[torch]", "mlx": "oxigaf[mlx]"}.get(name)
        raise BackendError(
            f"unknown backend {name!r}; available: {', '.join(usable) or 'none'}"
            + (f" (install it with pip install '{hint}')" if hint else "")
        )
    spec = specs[name]
    why = spec.available()
    if why is not None:
        extra = f" (install it with pip install '{spec.extra}')" if spec.extra else ""
        raise BackendError(
            f"backend {name!r} cannot run here: {why}{extra}; available: {', '.join(usable) or 'none'}"
        )
    return spec.factory(device=device, dtype=dtype)
