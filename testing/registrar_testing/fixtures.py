"""pytest fixtures: session-wide real servers, each started once and
stopped at the end. Enable with ``pytest_plugins = ["registrar_testing.fixtures"]``
in a conftest.py."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory):
    """Three etcd members on 127.0.0.1, shared by every test that only reads
    and writes keys of its own (fault tests start their own cluster)."""
    from .etcd import EtcdCluster

    if not shutil.which("etcd"):
        pytest.fail("etcd is not installed: run scripts/install-etcd.sh (./dev test does)")
    with EtcdCluster(3, tmp_path_factory.mktemp("etcd3")) as cluster:
        yield cluster


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
        pytest.fail("ZooKeeper is not installed: run scripts/install-zookeeper.sh (./dev test does)")
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
