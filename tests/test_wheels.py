"""The distributions as a user gets them, without this checkout: ./dev wheels'
build (scripts/wheels.py: every sdist, and every wheel built from its sdist)
into a temporary directory; what each wheel and sdist holds; then
`registrar[etcd]` installed from those wheels into a fresh venv (its other
dependencies from the configured index) and its `registrar` command run from
a directory outside the checkout: --version, check, and an agent registered
in the session's etcd cluster, then stopped by SIGTERM.

Nothing is kept between runs: the build, the venv and the agent's files are
all under pytest's tmp directories."""
from __future__ import annotations

import email.parser
import json
import os
import signal
import subprocess
import sys
import tarfile
import uuid
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from registrar import __version__
from registrar_testing import free_port, wait_until
from registrar_testing.etcd import kv_get_serializable

ROOT = Path(__file__).resolve().parent.parent
#: distribution -> (source directory, package)
DISTRIBUTIONS = {
    "registrar": (ROOT, "registrar"),
    "registrar-etcd": (ROOT / "backends" / "etcd", "registrar_etcd"),
    "registrar-zookeeper": (ROOT / "backends" / "zookeeper", "registrar_zookeeper"),
    "registrar-consul": (ROOT / "backends" / "consul", "registrar_consul"),
    "registrar-testing": (ROOT / "testing", "registrar_testing"),
}
POD_IP = "10.20.30.40"  # only written into etcd; nothing connects to it


def wheel_of(dist: Path, name: str) -> Path:
    return dist / f"{name.replace('-', '_')}-{__version__}-py3-none-any.whl"


def sdist_of(dist: Path, name: str) -> Path:
    return dist / f"{name.replace('-', '_')}-{__version__}.tar.gz"


def package_files(name: str) -> set[str]:
    """The files of the distribution's package as git has them (tracked, or new
    and not ignored), relative to its source directory: what must ship."""
    source, package = DISTRIBUTIONS[name]
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                          "--", package], cwd=source, capture_output=True, text=True,
                         check=True).stdout
    return {line for line in out.splitlines() if line}


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """The ten artifacts, built as ./dev wheels builds them."""
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "wheels.py"), "--outdir",
                           str(out)], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    return out


def test_wheels_builds_an_sdist_and_a_wheel_of_each_distribution(dist):
    expected = {p.name for name in DISTRIBUTIONS
                for p in (wheel_of(dist, name), sdist_of(dist, name))}
    assert {p.name for p in dist.iterdir()} == expected


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_the_wheel_and_the_sdist_ship_every_file_of_the_package(dist, name):
    """Data files included: the kit's java/ sources, which curator.py compiles
    from beside itself at run time, and _version.py."""
    want = package_files(name)
    package = DISTRIBUTIONS[name][1]
    assert f"{package}/_version.py" in want
    if name == "registrar-testing":
        assert {"registrar_testing/java/CuratorProbe.java", "registrar_testing/java/StdinHold.java",
                "registrar_testing/java/CuratorCacheWatch.java"} <= want
    with zipfile.ZipFile(wheel_of(dist, name)) as wheel:
        shipped = {n for n in wheel.namelist() if n.startswith(f"{package}/")}
        metadata = email.parser.Parser().parsestr(
            wheel.read(f"{package}-{__version__}.dist-info/METADATA").decode())
    assert shipped == want
    assert metadata["Name"] == name and metadata["Version"] == __version__
    top = f"{package}-{__version__}/"
    with tarfile.open(sdist_of(dist, name)) as sdist:
        names = [m.name for m in sdist.getmembers() if m.isfile()]
    assert {n.removeprefix(top) for n in names if n.startswith(f"{top}{package}/")} == want
    # Self-contained: its build needs only what it carries (the wheel above was built
    # from it, in isolation), and nothing of the suite rides along half.
    assert f"{top}pyproject.toml" in names
    assert not [n for n in names if n.startswith(f"{top}tests/")]


def test_the_core_wheel_declares_an_extra_per_backend_and_all(dist):
    with zipfile.ZipFile(wheel_of(dist, "registrar")) as wheel:
        metadata = email.parser.Parser().parsestr(
            wheel.read(f"registrar-{__version__}.dist-info/METADATA").decode())
    extras = set(metadata.get_all("Provides-Extra"))
    assert {"etcd", "zookeeper", "consul", "all", "webhook", "test", "bench"} <= extras
    requirements = [Requirement(line) for line in metadata.get_all("Requires-Dist")]

    def of(extra: str) -> list[str]:
        return [f"{r.name}{sorted(r.extras) if r.extras else ''}{r.specifier}"
                for r in requirements if r.marker and r.marker.evaluate({"extra": extra})]

    for backend in ("etcd", "zookeeper", "consul"):
        assert of(backend) == [f"registrar-{backend}=={__version__}"]
    assert of("all") == ["registrar['consul', 'etcd', 'zookeeper']"]


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> Path:
    """A fresh venv holding `registrar[etcd]` from the wheels. Made without pip
    and filled by this interpreter's pip (--python): the same install, 5 s
    sooner than bootstrapping pip into it."""
    path = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True,
                   timeout=60)
    # ==version: PyPI has an unrelated, older "registrar" (0.0.3.x); the pin keeps the
    # resolver on ours. The constraints pin the dependencies to the versions the suite ran.
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(path / "bin" / "python"), "install",
         "--quiet", "--disable-pip-version-check", "--find-links", str(dist),
         "-c", str(ROOT / "constraints.txt"), f"registrar[etcd]=={__version__}"],
        capture_output=True, text=True, timeout=300, check=False, cwd=path.parent)
    assert done.returncode == 0, done.stderr
    return path


def outside(venv: Path, tmp_path: Path) -> dict:
    """Keyword arguments for running the venv's commands away from the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSAFEPATH")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", POD_NAME="wheel-pod",
               POD_IP=POD_IP)
    return {"cwd": tmp_path, "env": env, "text": True}


def test_the_venv_holds_the_wheels_and_not_the_checkout(venv, tmp_path):
    probe = ("import importlib.metadata as m, json, registrar, registrar_etcd\n"
             "def version(name):\n"
             "    try:\n"
             "        return m.version(name)\n"
             "    except m.PackageNotFoundError:\n"
             "        return None\n"
             "names = ('registrar', 'registrar-etcd', 'registrar-zookeeper',\n"
             "         'registrar-consul', 'registrar-testing')\n"
             "print(json.dumps({'files': [registrar.__file__, registrar_etcd.__file__],\n"
             "                  'version': registrar.__version__,\n"
             "                  'dists': {n: version(n) for n in names}}))\n")
    done = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True,
                          timeout=60, **outside(venv, tmp_path))
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    for file in seen["files"]:
        assert Path(file).is_relative_to(venv), file
    assert seen["version"] == __version__
    # The etcd extra and nothing more.
    assert seen["dists"] == {"registrar": __version__, "registrar-etcd": __version__,
                             "registrar-zookeeper": None, "registrar-consul": None,
                             "registrar-testing": None}


def test_registrar_version_is_the_distributions(venv, tmp_path):
    done = subprocess.run(["registrar", "--version"], capture_output=True, timeout=60,
                          **outside(venv, tmp_path))
    assert done.returncode == 0 and done.stdout == f"registrar {__version__}\n", done.stderr


def test_check_then_an_agent_against_etcd(venv, tmp_path, etcd_cluster):
    service = f"wheels-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "service": {"name": service, "port": 8080},
        "backends": [{"type": "etcd", "endpoints": etcd_cluster.endpoints, "ttl": "3s",
                      "timeout": "1s"}],
        "stop": {"grace_period": "10s", "safety_margin": "1s"},
        "control": {"listen": f"127.0.0.1:{free_port()}"},
        "health": False,  # no app listens here: register at once
    }))
    key = f"services/{service}/{POD_IP}:8080"
    run = outside(venv, tmp_path)

    done = subprocess.run(["registrar", "check", "--config", str(config)], capture_output=True,
                          timeout=60, **run)
    assert done.returncode == 0, done.stderr
    assert done.stderr == (f"{config}: valid: {service}/wheel-pod at {POD_IP}:8080 on etcd\n"), \
        done.stderr

    agent = subprocess.Popen(["registrar", "agent", "--config", str(config)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, **run)
    try:
        wait_until(lambda: all(kv_get_serializable(ep, key)[1] for ep in etcd_cluster.endpoints)
                   or agent.poll() is not None, 30, "every etcd member lists the agent")
        assert agent.poll() is None, "the agent exited before registering"
        assert kv_get_serializable(etcd_cluster.endpoints[0], key)[2], "the key has no lease"
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=15)
    finally:
        if agent.poll() is None:
            agent.kill()
        _, err = agent.communicate(timeout=10)
    assert agent.returncode == 0, err
    assert [kv_get_serializable(ep, key)[1] for ep in etcd_cluster.endpoints] == [False] * 3
    last = err.splitlines()[-1]
    assert "exiting 0: removed from 1/1 backends" in last and "after SIGTERM" in last, err
