"""Kubernetes manifests checked as the API server would: ``kubernetes-validate
--strict`` (an unknown or misplaced field is an error, not dropped) for the
first version with native sidecars and for the newest the installed
kubernetes-validate knows; the API schemas ship inside it, so this works
offline. kubernetes-validate is imported when asked for (the test extra)."""
from __future__ import annotations

from typing import Any

import pytest

#: Kubernetes' first version with native sidecars on by default.
OLDEST = "1.29"


def validator() -> Any:
    """The kubernetes_validate module, or a test failure that says how to get it."""
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed (pip install kubernetes-validate; "
                    "it is in the test extra)")
    return kubernetes_validate


def validate_strictly(doc: dict[str, Any], where: str) -> None:
    """``doc`` valid with --strict for OLDEST and the newest version, each
    against that version's own schemas (not an older fallback); a failure
    names ``where``, the kind, the version and the field."""
    kv = validator()
    for version in (OLDEST, kv.latest_version()):
        try:
            used = kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            field = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{where}: {doc['kind']} is not valid for Kubernetes {version}: "
                        f"{field}: {exc.message}")
        assert used == ".".join(version.split(".")[:2]), (where, version, used)
