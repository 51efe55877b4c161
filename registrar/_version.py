"""The version of registrar, and of every distribution built from this tree.

Each distribution (the core, each backend, the testing kit) reads its version
from its own package's ``_version.py`` at build time, so that its sdist is
self-contained; they are released together, so all hold the same version.
scripts/version.py sets them all (and the ``==`` pins between them);
tests/test_version.py fails when any differ.
"""
__version__ = "0.1.0"
