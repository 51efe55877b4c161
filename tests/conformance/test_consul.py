"""The Consul backend passes the conformance suite on a real cluster: three
servers (the observers) and one client agent (where the backend registers)."""
from __future__ import annotations

import contextlib
import json
import os
from urllib.parse import urlsplit

import pytest
import requests

from registrar_testing import ESTABLISHED, tcp_sockets
from registrar_testing.conformance import BackendConformance, Harness
from registrar_testing.consul import passing_ids


class ConsulHarness(Harness):
    # Consul has no minimum TTL; 2 s keeps the expiry tests short.
    ttl = 2.0

    def __init__(self, cluster):
        self.cluster = cluster

    def section(self, **overrides):
        return {"type": "consul", "address": self.cluster.client_addr,
                "observers": self.cluster.server_addrs, "ttl": f"{self.ttl}s",
                "timeout": "1s", **overrides}

    def views(self, instance):
        return [instance.id in passing_ids(addr, instance.service)
                for addr in self.cluster.server_addrs]

    def lose_registration(self, backend):
        # What a restarted -dev (or wiped) agent does: it no longer knows the
        # service or its check. Done at the agent behind the backend's back.
        r = requests.put(f"{self.cluster.client_addr}/v1/agent/service/deregister/"
                         f"{backend.instance.id}", timeout=2)
        r.raise_for_status()

    def crash(self, backend):
        pass  # the TTL check simply stops being passed

    def member_ports(self):
        return [urlsplit(a).port for a in [self.cluster.client_addr, *self.cluster.server_addrs]]

    def freeze_follower(self):
        # The observers are the servers, in server_addrs' order. Not the server
        # the client agent sends its RPCs to: the agent answers a registration
        # or deregistration only once it has synced it to a server, and it stays
        # on a frozen one for 30 s and more (the removal would never be made).
        servers = self.cluster.servers
        busy = _rpc_peers(self.cluster.clients[0].process.proc.pid)
        index = next(i for i, s in enumerate(servers)
                     if s.get("/v1/agent/self").json()["Stats"]["consul"]["leader"] == "false"
                     and _config(s)["ports"]["server"] not in busy)
        server = servers[index]
        return self.frozen(server, index, urlsplit(server.http_addr).port,
                           lambda: bool(server.leader()))


def _config(agent) -> dict:
    return json.loads((agent.process.workdir / "config.json").read_text())


def _rpc_peers(pid: int) -> set[int]:
    """The remote ports of the established TCP connections of process ``pid``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return {sock.remote_port for sock in tcp_sockets()
            if sock.state == ESTABLISHED and sock.inode in inodes}


class TestConsulConformance(BackendConformance):
    @pytest.fixture
    def harness(self, consul_cluster):
        return ConsulHarness(consul_cluster)
