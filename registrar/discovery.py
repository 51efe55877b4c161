"""How the core finds backends: the ``registrar.backends`` entry-point
group, loaded by type name on first use (a missing one becomes an
"install X" message naming the field)."""
from __future__ import annotations

import difflib
import importlib.metadata

from .errors import BackendNotFound
from .plugin import Backend

ENTRY_POINT_GROUP = "registrar.backends"

_KNOWN_DISTRIBUTIONS = {"etcd": "registrar-etcd", "zookeeper": "registrar-zookeeper",
                        "consul": "registrar-consul"}


def available_backends() -> dict[str, importlib.metadata.EntryPoint]:
    """Installed backend plugins by type name."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def backend_class(type_name: str, path: str = "type") -> type[Backend]:
    """The Backend class for a ``type``; a BackendNotFound naming the field,
    the installed types and the distribution to install otherwise."""
    eps = available_backends()
    ep = eps.get(type_name)
    if ep is None:
        known = ", ".join(sorted(eps)) or "none"
        if type_name in _KNOWN_DISTRIBUTIONS:  # ours, not installed here
            raise BackendNotFound(
                path, f"backend type {type_name!r} is not installed (installed: {known}): "
                      f"install the distribution {_KNOWN_DISTRIBUTIONS[type_name]!r} "
                      f"(pip install 'registrar[{type_name}]')")
        close = difflib.get_close_matches(type_name, [*eps, *_KNOWN_DISTRIBUTIONS], n=1,
                                          cutoff=0.6)
        if close:
            raise BackendNotFound(path, f"unknown backend type {type_name!r} (did you mean "
                                        f"{close[0]!r}?; installed: {known})")
        dist = _KNOWN_DISTRIBUTIONS.get(type_name, f"registrar-{type_name}")
        raise BackendNotFound(
            path, f"unknown backend type {type_name!r} (installed: {known}); "
                  f"install the distribution {dist!r} to add it")
    try:
        cls = ep.load()
    except ImportError as exc:
        raise BackendNotFound(
            path, f"backend {type_name!r} is installed but cannot be imported: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendNotFound(path, f"entry point {ep.value!r} is not a registrar Backend")
    return cls
