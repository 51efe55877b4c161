"""The ZooKeeper backend passes the conformance suite on a real three-server
ensemble. Also home of the ZooKeeper fault helpers the other ZooKeeper
tests use: per-server views, forced session expiry, a simulated crash."""
from __future__ import annotations

import socket
import time

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import ConnectionLoss, SessionExpiredError
from kazoo.handlers.threading import KazooTimeoutError

from tests.conformance.suite import BackendConformance, Harness


class ServerViews:
    """One kazoo client per server, each connected to that server alone: a
    read through it is what a consumer connected there sees (no sync)."""

    def __init__(self, hosts: list[str], auth: str | None = None):
        self.clients: list[KazooClient] = []
        try:
            for host in hosts:
                client = KazooClient(hosts=host, timeout=10,
                                     auth_data=[("digest", auth)] if auth else None)
                client.start(timeout=10)
                self.clients.append(client)
        except BaseException:
            self.close()
            raise

    def stat(self, index: int, path: str, timeout: float = 5.0):
        """exists() on one server, riding out a reconnection (bounded)."""
        end = time.monotonic() + timeout
        while True:
            try:
                return self.clients[index].exists_async(path).get(timeout=1)
            except (ConnectionLoss, SessionExpiredError, KazooTimeoutError):
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)

    def exists(self, path: str, servers=None) -> list[bool]:
        indexes = range(len(self.clients)) if servers is None else servers
        return [self.stat(i, path) is not None for i in indexes]

    def close(self) -> None:
        for client in self.clients:
            client.stop()
            client.close()


def expire_session(connect_string: str, client: KazooClient) -> None:
    """Expire a live session the way kazoo's own tests did: a second client
    joins it with its id and password, then closes it."""
    other = KazooClient(hosts=connect_string, client_id=client.client_id, timeout=10)
    other.start(timeout=10)
    other.stop()
    other.close()


def crash_session(client: KazooClient) -> None:
    """What SIGKILL leaves behind: the TCP connection closes, no
    closeSession is sent, and the session lives on in the ensemble until it
    expires. kazoo has no such call, and its stop() closes the session:
    flag the client stopped (its connection loop then ends instead of
    reconnecting) and cut the socket under it."""
    client._stopped.set()
    client._connection._socket.shutdown(socket.SHUT_RDWR)


class ZooKeeperHarness(Harness):
    ttl = 2.0  # the servers' tickTime is 500 ms: sessions of 1 s to 60 s

    def __init__(self, ensemble, views: ServerViews):
        self.ensemble = ensemble
        self._views = views

    def section(self, **overrides):
        return {"type": "zookeeper", "hosts": self.ensemble.hosts, "base_path": "/conformance",
                "session_timeout": f"{self.ttl}s", "timeout": "1s", **overrides}

    def views(self, instance):
        return self._views.exists(f"/conformance/{instance.service}/{instance.id}")

    def lose_registration(self, backend):
        expire_session(self.ensemble.connect_string, backend._client)

    def crash(self, backend):
        crash_session(backend._client)

    def member_ports(self):
        return [s.client_port for s in self.ensemble.servers]


@pytest.fixture(scope="module")
def zk_views(zk_ensemble):
    views = ServerViews(zk_ensemble.hosts)
    yield views
    views.close()


class TestZooKeeperConformance(BackendConformance):
    @pytest.fixture
    def harness(self, zk_ensemble, zk_views):
        return ZooKeeperHarness(zk_ensemble, zk_views)
