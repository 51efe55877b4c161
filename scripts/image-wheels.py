#!/usr/bin/env python3
"""Make a directory of wheels install registrar offline on other CPython versions.

    python3 scripts/image-wheels.py DIR 3.11 3.12 3.13 3.14

DIR holds the wheels of registrar, its backends and all their dependencies for
the running Python (what `pip wheel` wrote). Most are pure Python; a few are
compiled for one CPython version (msgspec, PyYAML, ...). For each other version
named, this downloads the same release of each compiled one, built for that
version and the same platforms; then it checks, for every version named, that
`registrar[all]` resolves from DIR alone (pip install --dry-run --no-index).

The Dockerfile runs it on /opt/registrar/wheels, so that an app image on any
glibc base with one of those Pythons can `pip install --no-index --find-links`
from the registrar image (docs/install.md). Uses the running Python's pip.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path


def compiled(directory: Path) -> list[tuple[str, str, list[str]]]:
    """(name, version, platform tags) of each wheel in ``directory`` that is not
    for any platform. A wheel's name is name-version[-build]-python-abi-platform."""
    found = []
    for wheel in sorted(directory.glob("*.whl")):
        parts = wheel.name.removesuffix(".whl").split("-")
        if parts[-1] != "any":
            found.append((parts[0], parts[1], parts[-1].split(".")))
    return found


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet",
                    *args], check=True)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    directory, versions = Path(argv[0]), argv[1:]
    own = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheels = compiled(directory)
    platforms = sorted({tag for _, _, tags in wheels for tag in tags})
    target = ["--only-binary=:all:", "--implementation", "cp",
              *[arg for tag in platforms for arg in ("--platform", tag)]]
    for version in versions:
        if version != own:
            for name, release, _ in wheels:
                pip("download", "--no-deps", "--dest", str(directory),
                    "--python-version", version, *target, f"{name}=={release}")
        with tempfile.TemporaryDirectory() as tmp:
            pip("install", "--dry-run", "--ignore-installed", "--no-index", "--find-links",
                str(directory), "--target", tmp, "--python-version", version, *target,
                "registrar[all]")
        print(f"image-wheels.py: registrar[all] installs from {directory} alone on CPython "
              f"{version}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
