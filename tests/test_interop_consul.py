"""Consul interop: what consumers that know nothing of registrar see while a
real `registrar agent` registers at the client agent of a three-server
cluster and is stopped by SIGTERM.

Two foreign consumers: Consul's DNS interface, asked the way any resolver
library asks it (dnspython, SRV and A for ``<service>.service.consul``) on
the client agent and on every server, and `consul watch -type=service
-passingonly=true` (Consul's own blocking health query) on the client agent.
Each must list the pod at its address and port while it is registered and
stop listing it before the agent process has exited.

Consul 1.8.7's DNS with the default ``dns_config`` (``only_passing`` false)
leaves out instances with a critical check and keeps warning ones;
registrar's drain (maintenance mode, a critical check) therefore already
takes the pod out of DNS, before the deregistration. `test_dns_filters`
pins that behaviour on the server itself, so a change of Consul's defaults
shows up here and not as a lost request.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import dns.exception
import dns.rdatatype
import dns.resolver
import pytest
import yaml
from registrar_testing import wait_until
from registrar_testing.consul import ConsulAgent, consul_binary

POD_NAME, POD_IP, PORT = "interop-pod", "10.20.30.40", 8080
POLL_LIMIT = 60  # seconds: no thread of this module outlives a hung test by more


def resolver(agent: ConsulAgent) -> dns.resolver.Resolver:
    """A resolver pointed at one agent's DNS port, as a consumer sets it up
    (no system configuration, no cache)."""
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = ["127.0.0.1"]
    r.port = agent.dns_port
    r.lifetime = 1.0
    return r


def srv(agent: ConsulAgent, service: str) -> list[tuple[int, str]]:
    """(port, address) of each SRV answer for <service>.service.consul, the
    address read from the A records Consul adds for each target; [] when
    the name does not exist (Consul answers NXDOMAIN for a service without
    an instance it would hand out). A timeout or refusal raises."""
    try:
        answer = resolver(agent).resolve(f"{service}.service.consul.", "SRV")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    addresses = {rrset.name: [rr.address for rr in rrset]
                 for rrset in answer.response.additional if rrset.rdtype == dns.rdatatype.A}
    return sorted((rr.port, addr) for rr in answer for addr in addresses.get(rr.target, ["?"]))


def a_records(agent: ConsulAgent, service: str) -> list[str]:
    try:
        answer = resolver(agent).resolve(f"{service}.service.consul.", "A")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    return sorted(rr.address for rr in answer)


@dataclass
class Sample:
    at: float  # time.monotonic() when the answer arrived
    source: str
    lists: bool | None  # None: the query failed (not an answer either way)


@dataclass
class Timeline:
    samples: list[Sample] = field(default_factory=list)

    def of(self, source: str) -> list[Sample]:
        return [s for s in self.samples if s.source == source and s.lists is not None]

    def gone_at(self, source: str) -> float | None:
        """When `source` was first seen without the pod after last listing
        it (None if it never stopped listing it)."""
        seen = self.of(source)
        last = max((i for i, s in enumerate(seen) if s.lists), default=-1)
        return seen[last + 1].at if last + 1 < len(seen) else None


class DnsPoller(threading.Thread):
    """Asks every agent's DNS for the SRV record in turn, every few ms,
    keeping the arrival time of each answer."""

    def __init__(self, agents: list[ConsulAgent], service: str, timeline: Timeline):
        super().__init__(daemon=True)
        self.agents, self.service, self.timeline = agents, service, timeline
        self.stopped = threading.Event()

    def run(self) -> None:
        end = time.monotonic() + POLL_LIMIT
        while not self.stopped.is_set() and time.monotonic() < end:
            for agent in self.agents:
                try:
                    lists = (PORT, POD_IP) in srv(agent, self.service)
                except dns.exception.DNSException:
                    lists = None
                self.timeline.samples.append(Sample(time.monotonic(), agent.name, lists))
            self.stopped.wait(0.002)

    def stop(self) -> None:
        self.stopped.set()
        if self.ident is not None:  # started
            self.join(timeout=5)


class ConsulWatch:
    """`consul watch -type=service -passingonly=true` with `cat` as its
    handler: every change the blocking query returns is a line of JSON on
    our pipe, stamped when it arrives."""

    def __init__(self, agent: ConsulAgent, service: str, timeline: Timeline):
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
        self.process = subprocess.Popen(
            [consul_binary(), "watch", f"-http-addr={agent.http_addr}", "-type=service",
             f"-service={service}", "-passingonly=true", "-shell=false", "cat"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.timeline = timeline
        self.documents: list[list[dict]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:  # ends at EOF, when the watch is stopped
            if line.strip():
                entries = json.loads(line)
                self.documents.append(entries)
                listed = any(e["Service"]["ID"] == POD_NAME and e["Service"]["Port"] == PORT
                             and e["Service"]["Address"] == POD_IP for e in entries)
                self.timeline.samples.append(Sample(time.monotonic(), "consul watch", listed))

    def stop(self) -> str:
        self.process.terminate()
        try:
            _, err = self.process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate(timeout=5)
        self.reader.join(timeout=5)
        return err.decode(errors="replace")


def agent_config(tmp_path, cluster) -> tuple[str, str]:
    service = f"interop-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({
        "service": {"name": service, "port": PORT},
        "backends": [{"type": "consul", "address": cluster.client_addr,
                      "observers": cluster.server_addrs, "ttl": "3s", "timeout": "1s"}],
        "control": {"listen": None},
        "stop": {"grace_period": "10s", "safety_margin": "1s"},
        "health": False,  # no app listens here: register at once
    }))
    return str(path), service


def spawn_agent(config: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_")}
    env.update(POD_NAME=POD_NAME, POD_IP=POD_IP)
    return subprocess.Popen([sys.executable, "-m", "registrar", "agent", "--config", config],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def cluster(consul_cluster):
    if any(a.dns_port is None for a in consul_cluster.agents):
        pytest.fail("the session consul_cluster serves no DNS (ConsulCluster(dns=False)?)")
    return consul_cluster


def test_dns_and_watch_drop_the_pod_before_the_agent_exits(tmp_path, cluster):
    config, service = agent_config(tmp_path, cluster)
    agents = [*cluster.clients, *cluster.servers]
    timeline = Timeline()
    watch = ConsulWatch(cluster.clients[0], service, timeline)
    poller = DnsPoller(agents, service, timeline)
    try:
        wait_until(lambda: watch.documents, 10, "consul watch prints its first result")
    except TimeoutError:
        raise AssertionError(f"consul watch printed nothing: {watch.stop()}") from None
    agent = spawn_agent(config)
    try:
        wait_until(lambda: all(srv(a, service) == [(PORT, POD_IP)] for a in agents), 15,
                   "every agent's DNS has the SRV record", interval=0.02,
                   ignore=dns.exception.DNSException)
        assert all(a_records(a, service) == [POD_IP] for a in agents)
        wait_until(lambda: timeline.of("consul watch") and timeline.of("consul watch")[-1].lists,
                   10, "consul watch lists the pod")
        poller.start()
        wait_until(lambda: all(timeline.of(a.name) for a in agents), 5, "a first DNS round")
        sigterm = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=15)
        exited = time.monotonic()
    finally:
        agent.kill()
        _, err = agent.communicate(timeout=5)
        poller.stop()
        watch_err = watch.stop()
    assert agent.returncode == 0, err
    for source in [a.name for a in agents] + ["consul watch"]:
        seen = timeline.of(source)
        assert any(s.lists for s in seen), f"{source} never listed the pod: {seen[:3]}"
        gone = timeline.gone_at(source)
        assert gone is not None, f"{source} still lists the pod after the agent exited"
        assert gone < exited, (f"{source} first answered without the pod "
                               f"{(gone - exited) * 1000:.1f} ms after the agent exited")
        assert not any(s.lists for s in seen if s.at > gone), f"{source} listed it again"
        print(f"{source}: gone {(gone - sigterm) * 1000:.0f} ms after SIGTERM, "
              f"{(exited - gone) * 1000:.0f} ms before the agent exited")
    # Nothing comes back once the agent is gone.
    assert all(srv(a, service) == [] and a_records(a, service) == [] for a in agents)
    assert watch.documents[0] == [] and watch.documents[-1] == [], watch_err


def test_dns_filters(cluster):
    """What Consul 1.8.7's DNS hands out, by check status, with the default
    dns_config: passing and warning instances, not critical ones (hence not
    one in maintenance), and nothing once deregistered. Asked of the client
    agent and of a server."""
    client, server = cluster.clients[0], cluster.servers[0]
    service, sid = f"filters-{uuid.uuid4().hex[:8]}", f"filters-{uuid.uuid4().hex[:8]}"
    client.request("PUT", "/v1/agent/service/register", json={
        "Name": service, "ID": sid, "Address": POD_IP, "Port": PORT,
        "Check": {"TTL": "30s", "DeregisterCriticalServiceAfter": "1m"}})

    def answers(expected):
        wait_until(lambda: all(srv(a, service) == expected for a in (client, server)),
                   10, f"DNS answers {expected} for {service}", interval=0.02,
                   ignore=dns.exception.DNSException)

    def server_checks(expected):
        # DNS answers alike whether a change reached the server's catalog or
        # not yet: wait for the catalog before asking.
        wait_until(lambda: [c["Status"] for c in server.get(f"/v1/health/checks/{service}")
                            .json()] == expected, 10, f"the server has checks {expected}")

    try:
        server_checks(["critical"])  # a TTL check starts critical
        answers([])
        client.request("PUT", f"/v1/agent/check/pass/service:{sid}")
        answers([(PORT, POD_IP)])
        client.request("PUT", f"/v1/agent/check/warn/service:{sid}")
        server_checks(["warning"])
        answers([(PORT, POD_IP)])
        client.request("PUT", f"/v1/agent/check/pass/service:{sid}")
        client.request("PUT", f"/v1/agent/service/maintenance/{sid}",
                       params={"enable": "true", "reason": "drain"})
        answers([])
        client.request("PUT", f"/v1/agent/service/maintenance/{sid}", params={"enable": "false"})
        answers([(PORT, POD_IP)])
    finally:
        client.request("PUT", f"/v1/agent/service/deregister/{sid}")
    answers([])
