"""Session-wide real servers. Each is started once and stopped at the end."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.servers.etcd import EtcdCluster


@pytest.fixture(autouse=True)
def _restore_logging():
    """In-process CLI runs install a root handler on the test's captured
    stderr; background threads (a kazoo client closing) must not log into
    it once the test is over."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory):
    """Three etcd members on 127.0.0.1, shared by every test that only reads
    and writes keys of its own (fault tests start their own cluster)."""
    if not shutil.which("etcd"):
        pytest.fail("etcd is not installed: run scripts/install-etcd.sh (./dev test does)")
    with EtcdCluster(3, tmp_path_factory.mktemp("etcd3")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def zk_standalone(tmp_path_factory):
    """One standalone ZooKeeper server on 127.0.0.1."""
    from tests.servers.zookeeper import ZooKeeperEnsemble

    with ZooKeeperEnsemble(1, tmp_path_factory.mktemp("zk1")) as zk:
        yield zk


@pytest.fixture(scope="session")
def zk_ensemble(tmp_path_factory):
    """Three ZooKeeper servers on 127.0.0.1, shared like etcd_cluster."""
    from tests.servers.zookeeper import ZK_JAR, ZooKeeperEnsemble

    if not Path(ZK_JAR).exists():
        pytest.fail("ZooKeeper is not installed: run scripts/install-zookeeper.sh (./dev test does)")
    with ZooKeeperEnsemble(3, tmp_path_factory.mktemp("zk3")) as ensemble:
        yield ensemble


@pytest.fixture(scope="session")
def consul_cluster(tmp_path_factory):
    """Three Consul servers and one client agent on 127.0.0.1, shared like
    etcd_cluster (tests register at the client; the servers are observers)."""
    from tests.servers.consul import ConsulCluster, consul_binary

    try:
        consul_binary()
    except FileNotFoundError as exc:
        pytest.fail(f"{exc} (./dev test runs it)")
    with ConsulCluster(tmp_path_factory.mktemp("consul"), servers=3, clients=1) as cluster:
        yield cluster
