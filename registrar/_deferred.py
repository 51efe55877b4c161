"""Imports a registrar process defers until their first use.

``requests`` imports a character-set detector (charset_normalizer) when it
is imported, for the one case of a response whose charset is neither given
nor implied (``Response.apparent_encoding``). The registries answer JSON,
whose charset requests knows without detection, so in an agent the
detector is never called, yet it costs every pod about 3 MB of RSS (its
tables and the CJK codecs it loads). ``defer_charset_detection()`` puts a
stand-in in ``sys.modules`` that carries the version requests checks and
imports the real module the first time anything else is asked of it:
nothing changes but when the import happens.

Only the ``registrar`` command installs it, in its own process, before
anything imports requests; a library user's process is left alone.
"""
from __future__ import annotations

import importlib
import sys
import types

DETECTOR = "charset_normalizer"


class _Deferred(types.ModuleType):
    """Stands in ``sys.modules`` for a module until an attribute it does not
    carry is asked for; then imports the module and answers from it."""

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            # The import system probes __path__ (is it a package?) and the
            # like on every ``from X import Y``: no reason to load.
            raise AttributeError(name)
        real = self.__dict__.get("_deferred_real")
        if real is None:
            real = _load(self)
        return getattr(real, name)


def _load(stub: _Deferred) -> types.ModuleType:
    name = stub.__name__
    del sys.modules[name]
    try:
        real = importlib.import_module(name)
    except BaseException:
        sys.modules[name] = stub
        raise
    stub.__dict__["_deferred_real"] = real
    for key, module in list(sys.modules.items()):  # requests.packages aliases it
        if module is stub:
            sys.modules[key] = real
    return real


def defer_charset_detection() -> bool:
    """Install the stand-in for the detector; False (and nothing done) when
    it is already imported or not installed."""
    if DETECTOR in sys.modules:
        return False
    from importlib import metadata, util

    try:
        version = metadata.version(DETECTOR.replace("_", "-"))
        spec = util.find_spec(DETECTOR)
    except (metadata.PackageNotFoundError, ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    stub = _Deferred(DETECTOR)
    stub.__version__ = version
    # A package's path, so that importing one of its submodules (a plugin that
    # does ``from charset_normalizer.api import from_bytes``) still works.
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules[DETECTOR] = stub
    return True
