"""The ZooKeeper backend passes the conformance suite on a real three-server
ensemble."""
from __future__ import annotations

import pytest

from registrar_testing.conformance import BackendConformance, Harness
from registrar_testing.zookeeper import ServerViews, crash_session, expire_session


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

    def freeze_follower(self):
        leader = self.ensemble.wait_leader()
        index = next(i for i in range(len(self.ensemble.servers)) if i != leader)
        server = self.ensemble.servers[index]
        return self.frozen(server, index, server.client_port,
                           lambda: server.mode() in ("leader", "follower"))


@pytest.fixture(scope="module")
def zk_views(zk_ensemble):
    views = ServerViews(zk_ensemble.hosts)
    yield views
    views.close()


class TestZooKeeperConformance(BackendConformance):
    @pytest.fixture
    def harness(self, zk_ensemble, zk_views):
        return ZooKeeperHarness(zk_ensemble, zk_views)
