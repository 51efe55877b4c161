#!/usr/bin/env python3
"""Build the sdist and the wheel of every distribution in this tree with the
standard build front end (``python -m build``): the core (registrar), each
backend (registrar-etcd, -zookeeper, -consul) and the testing kit
(registrar-testing). Each wheel is built from its sdist, in an isolated
environment, so an sdist that needs a file outside its own directory fails
here.

    python scripts/wheels.py [--outdir DIR]   (./dev wheels: DIR is dist/)

Earlier artifacts of these distributions in DIR are removed first; the
others are left alone. Prints one line per artifact.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Source directory of each distribution, the core first.
DISTRIBUTIONS = {
    "registrar": ROOT,
    "registrar-etcd": ROOT / "backends" / "etcd",
    "registrar-zookeeper": ROOT / "backends" / "zookeeper",
    "registrar-consul": ROOT / "backends" / "consul",
    "registrar-testing": ROOT / "testing",
}


def normalized(name: str) -> str:
    """The name as sdist and wheel file names spell it (registrar_etcd)."""
    return name.replace("-", "_")


def build_one(source: Path, outdir: Path) -> None:
    # Into a directory of its own, moved into outdir once complete: a failed or
    # interrupted build leaves nothing half-written there.
    with tempfile.TemporaryDirectory(prefix="registrar-build-") as tmp:
        done = subprocess.run([sys.executable, "-m", "build", "--outdir", tmp, str(source)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"python -m build {source} failed:\n{done.stdout}{done.stderr}")
        for artifact in Path(tmp).iterdir():
            artifact.replace(outdir / artifact.name)


def build_all(outdir: Path, jobs: int | None = None) -> list[Path]:
    """Build all ten artifacts into ``outdir`` and return their paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    names = tuple(normalized(name) for name in DISTRIBUTIONS)
    for old in outdir.iterdir():
        if old.name.endswith((".whl", ".tar.gz")) and old.name.split("-")[0] in names:
            old.unlink()
    # Each build is mostly waiting for pip to fill its isolated environment: two at a
    # time per core keeps both cores busy.
    jobs = jobs or 2 * (os.cpu_count() or 1)
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda source: build_one(source, outdir), DISTRIBUTIONS.values()))
    return sorted(p for p in outdir.iterdir() if p.name.split("-")[0] in names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outdir", type=Path, default=ROOT / "dist")
    args = parser.parse_args()
    try:
        artifacts = build_all(args.outdir)
    except RuntimeError as exc:
        print(f"wheels.py: {exc}", file=sys.stderr)
        return 1
    for artifact in artifacts:
        print(artifact)
    return 0


if __name__ == "__main__":
    sys.exit(main())
