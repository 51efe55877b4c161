# This distribution's version, read at build time (pyproject.toml); always registrar's own
# (registrar/_version.py says why, scripts/version.py sets both).
__version__ = "0.1.0"
