#!/usr/bin/env python3
"""The one version of every distribution in this tree, and where it is written.

    python scripts/version.py            print it
    python scripts/version.py --check    exit 1 and name each place that differs
    python scripts/version.py 0.2.0      write 0.2.0 everywhere; then add its CHANGELOG.md
                                         section and run ./dev setup

Each distribution reads its version from its package's _version.py (the root
pyproject.toml says why); registrar/_version.py is the reference. The copies
are the `==` pins between the distributions and the version in image tags and
file names across the tree (`registrar:0.1.0`, `registrar-etcd==0.1.0`,
`registrar_etcd-0.1.0-py3-none-any.whl`) and the Dockerfile's VERSION default.
CHANGELOG.md keeps its past versions. Writing a version also regenerates the
injected manifests (scripts/k8s-manifests.py: registrar.io/injected).
tests/test_version.py runs --check.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "registrar" / "_version.py"
VERSION_FILES = [REFERENCE, *sorted(ROOT.glob("backends/*/registrar_*/_version.py")),
                 ROOT / "testing" / "registrar_testing" / "_version.py"]
ASSIGNMENT = re.compile(r'^(__version__ = ")([^"]+)(")$', re.MULTILINE)
VERSION = r"\d+(?:\.\d+)+(?:(?:a|b|rc|\.post|\.dev)\d+)?"
#: A distribution (extras allowed) or image of ours, then ==, : or - and a version.
MENTION = re.compile(r"(?<![\w.-])(registrar(?:[-_](?:etcd|zookeeper|consul|testing))?"
                     rf"(?:\[[\w,]+\])?(?:==|:|-))({VERSION})(?!\w|\.\d)")
#: Other places, one pattern each: (path, pattern whose group 2 is the version).
OTHERS = [(ROOT / "Dockerfile", re.compile(rf"^(ARG VERSION=)({VERSION})()$", re.MULTILINE))]
SUFFIXES = {".md", ".toml", ".yaml", ".yml", ".py", ".sh", ".txt", ".in", ".cfg", ".json"}
#: Not copies of the current version (past ones; this file's examples).
SKIP = {"CHANGELOG.md", "scripts/version.py"}


def read_version(path: Path) -> str:
    match = ASSIGNMENT.search(path.read_text())
    if match is None:
        raise SystemExit(f"version.py: no __version__ = \"...\" line in {path}")
    return match.group(2)


def text_files() -> list[Path]:
    """The tree's text files as git sees them (tracked, or new and not ignored)."""
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")
    paths = [ROOT / name for name in names if name and name not in SKIP]
    return [p for p in paths if (p.suffix in SUFFIXES or p.name == "Dockerfile")
            and p.is_file() and p not in VERSION_FILES]


def mentions(paths: list[Path]) -> list[tuple[Path, int, str]]:
    """(file, line number, version) of every copy of the version in ``paths``."""
    found = []
    for path in paths:
        text = path.read_text(errors="replace")
        for pattern in [MENTION] + [p for f, p in OTHERS if f == path]:
            for match in pattern.finditer(text):
                found.append((path, text.count("\n", 0, match.start()) + 1, match.group(2)))
    return found


def check() -> list[str]:
    """One line per place whose version is not the reference's."""
    want = read_version(REFERENCE)
    wrong = [f"{p.relative_to(ROOT)}: {v} (registrar/_version.py: {want})"
             for p in VERSION_FILES if (v := read_version(p)) != want]
    wrong += [f"{p.relative_to(ROOT)}:{line}: {v} (registrar/_version.py: {want})"
              for p, line, v in mentions(text_files()) if v != want]
    return wrong


def write(new: str) -> None:
    if not re.fullmatch(VERSION, new):
        raise SystemExit(f"version.py: {new!r} is not a version like 1.2.3 or 1.2.3rc1")
    for path in VERSION_FILES:
        path.write_text(ASSIGNMENT.sub(rf"\g<1>{new}\g<3>", path.read_text()))
    for path in text_files():
        text = path.read_text()
        changed = MENTION.sub(rf"\g<1>{new}", text)
        for other, pattern in OTHERS:
            if other == path:
                changed = pattern.sub(rf"\g<1>{new}\g<3>", changed)
        if changed != text:
            path.write_text(changed)
    # registrar.inject stamps the version of the registrar it imports: this tree's.
    subprocess.run([sys.executable, str(ROOT / "scripts" / "k8s-manifests.py")], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("version", nargs="?", help="the new version")
    parser.add_argument("--check", action="store_true", help="exit 1 if any place differs")
    args = parser.parse_args()
    if args.version:
        write(args.version)
    wrong = check()
    for line in wrong:
        print(line, file=sys.stderr)
    if not args.check and not wrong:
        print(read_version(REFERENCE))
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
