"""One version for every distribution of the tree: each reads it from its own
package's _version.py, they pin each other to it, `registrar --version` prints
it and the installed distributions carry it. scripts/version.py writes it
everywhere; tests/test_wheels.py checks the built wheels."""
from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from registrar import __version__, cli

ROOT = Path(__file__).resolve().parent.parent
#: distribution -> (its pyproject.toml, its package)
DISTRIBUTIONS = {
    "registrar": (ROOT / "pyproject.toml", "registrar"),
    "registrar-etcd": (ROOT / "backends/etcd/pyproject.toml", "registrar_etcd"),
    "registrar-zookeeper": (ROOT / "backends/zookeeper/pyproject.toml", "registrar_zookeeper"),
    "registrar-consul": (ROOT / "backends/consul/pyproject.toml", "registrar_consul"),
    "registrar-testing": (ROOT / "testing/pyproject.toml", "registrar_testing"),
}


def test_every_distribution_of_the_tree_is_listed_here():
    found = {tomllib.loads(p.read_text())["project"]["name"]
             for p in [ROOT / "pyproject.toml", *ROOT.glob("*/pyproject.toml"),
                       *ROOT.glob("backends/*/pyproject.toml")]}
    assert found == set(DISTRIBUTIONS)


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_each_distribution_reads_its_version_from_its_own_package(name):
    path, package = DISTRIBUTIONS[name]
    project = tomllib.loads(path.read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == f"{package}._version.__version__"
    # Inside the distribution's own directory: its sdist carries it.
    assert (path.parent / package / "_version.py").is_file()


def test_every_copy_of_the_version_agrees():
    """The _version.py files, the == pins, image tags and file names across
    the tree (scripts/version.py --check says which differ)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "version.py"), "--check"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stderr == "", done.stderr


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_the_distributions_pin_each_other_to_the_version(name):
    project = tomllib.loads(DISTRIBUTIONS[name][0].read_text())["project"]
    requirements = [Requirement(r) for r in project.get("dependencies", [])]
    for extra in project.get("optional-dependencies", {}).values():
        requirements += [Requirement(r) for r in extra]
    ours = [r for r in requirements if r.name in DISTRIBUTIONS and r.name != name]
    assert ours, f"{name} requires none of the others"
    for requirement in ours:
        assert str(requirement.specifier) == f"=={__version__}", requirement


def test_the_extras_pull_the_backends():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for backend in ("etcd", "zookeeper", "consul"):
        assert extras[backend] == [f"registrar-{backend}=={__version__}"]
    assert extras["all"] == ["registrar[etcd,zookeeper,consul]"]


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_the_installed_distribution_has_the_version(name):
    """The dev install's metadata (./dev setup reinstalls when a _version.py
    changes): what pip and importlib.metadata report."""
    installed = importlib.metadata.version(name)
    assert installed == __version__, f"{name} is installed as {installed}: run ./dev setup"


def test_registrar_version_prints_it(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"registrar {__version__}\n"


def test_the_changelog_has_the_version_and_an_unreleased_section():
    headings = re.findall(r"^## \[([^]]+)\]", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert headings[:2] == ["Unreleased", __version__], headings
