"""registrar: register a pod in service registries and take it out gracefully.

Importing this package imports no registry client (and nothing heavy): the
names below are loaded on first use, so ``registrar prestop`` starts fast.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ._version import __version__ as __version__  # re-exported: registrar.__version__

__all__ = ["Instance", "Registrar", "StopReport", "Trigger", "Deadline", "Backend", "Observer",
           "RegistrarError", "ConfigError", "RegistryUnavailable", "RegistrationRejected"]

_LAZY = {"Registrar": "core", "StopReport": "stopping", "Trigger": "stopping", "Deadline": "clock",
         "Backend": "plugin", "Observer": "plugin", "Instance": "instance",
         "RegistrarError": "errors", "ConfigError": "errors",
         "RegistryUnavailable": "errors", "RegistrationRejected": "errors"}

if TYPE_CHECKING:
    from .clock import Deadline
    from .core import Registrar
    from .plugin import Backend, Observer
    from .stopping import StopReport, Trigger
    from .errors import ConfigError, RegistrarError, RegistrationRejected, RegistryUnavailable
    from .instance import Instance


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'registrar' has no attribute {name!r}")
