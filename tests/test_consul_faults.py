"""Issue 24, points 1 and 2, on a real Consul cluster of its own (three
servers and a client agent; the faults here would disturb the shared one):
the client agent between us and the servers must neither keep a stopping pod
in rotation nor let /readyz say "registered" while no server lists the pod.

1. The leader frozen (SIGSTOP) as SIGTERM arrives: the client agent's RPCs
   hang on it, so every call to the agent times out and, before the fix, the
   live servers listed the pod as passing for tens of seconds, TTL or not.
   The removal must go through the live servers, within the stop budget.
2. The client agent restarted gracefully: it leaves the cluster, the servers
   drop its node with our service, and it goes on accepting check passes.
   /readyz must not say ready while no server lists the pod."""
from __future__ import annotations

import signal
import time
import uuid

import pytest

from registrar import Instance, Registrar
from registrar.config import StopConfig
from registrar_consul import ConsulBackend, ConsulConfig
from registrar_testing import wait_until
from registrar_testing.agents import Agent, ReadySampler, consul_setup
from registrar_testing.consul import ConsulCluster, passing_ids

pytestmark = pytest.mark.slow

TTL = 3.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ConsulCluster(tmp_path_factory.mktemp("consul-faults"), servers=3, clients=1) as c:
        yield c


@pytest.fixture
def service():
    return f"faults-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def setup(cluster, service):
    return consul_setup(cluster, service, TTL)


@pytest.fixture
def agent(tmp_path, setup, service):
    # No gid of its own: nothing here cuts the agent off (no root needed).
    started = Agent(tmp_path, service, setup.backend, gid=None)
    try:
        wait_until(lambda: started.readyz() == 200 and all(
            setup.listed_on(i) for i in range(len(setup.members))), 20,
            "registered and listed by every server", ignore=(OSError,))
        yield started
    finally:
        started.kill()


def test_frozen_leader_at_sigterm_the_live_servers_drop_the_pod_within_the_budget(
        cluster, setup, agent):
    leader = cluster.leader_server()
    live = [i for i, s in enumerate(cluster.servers) if s is not leader]
    leader.freeze()
    try:
        began = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        # The budget is 9 s (grace 10 s, margin 1 s); a new leader takes 1-2 s.
        wait_until(lambda: not setup.listed_by(live), 9.0,
                   "the live servers stopped listing the pod", interval=0.05,
                   ignore=Exception)
        gone = time.monotonic() - began
        agent.proc.wait(15)
        exited = time.monotonic() - began
    finally:
        leader.thaw()
        wait_until(cluster.healthy, 60, "the cluster is whole again", interval=0.2,
                   ignore=Exception)
    print(f"gone from the live servers {gone:.2f}s after SIGTERM; exit "
          f"{agent.proc.returncode} after {exited:.2f}s")
    assert "through the server at http://" in agent.log, agent.log
    # The frozen server never confirms: the stop used its budget, and says so.
    assert agent.proc.returncode == 1, agent.log
    assert "removed, unconfirmed 2/3 observers" in agent.log, agent.log
    # Stays gone once the agent's own queued calls have run (the leader is back).
    time.sleep(1.0)
    assert not setup.listed(), agent.log


def test_client_agent_restarted_gracefully_readyz_never_says_ready_while_unlisted(
        cluster, setup, agent):
    with ReadySampler(agent, setup.listed) as sampler:
        time.sleep(0.3)
        cluster.clients[0].restart(timeout=60, graceful=True)
        wait_until(lambda: agent.readyz() == 200 and setup.listed(), 30,
                   "ready and listed again", ignore=(OSError,))
        time.sleep(0.3)
    print(f"{len(sampler.samples)} samples; ready while unlisted: {len(sampler.violations())}")
    dropped = [s for s in sampler.samples if not s[1] and not s[3]]
    assert dropped, ("the servers never dropped the pod (the test proves nothing): "
                     f"{sampler.samples}")
    assert not sampler.violations(), agent.log
    assert "the servers no longer list it" in agent.log, agent.log


def test_a_frozen_client_agent_at_the_stop_the_servers_take_the_removal(cluster, service):
    instance = Instance.create(service, 8080, id=f"pod-{uuid.uuid4().hex[:8]}",
                               address="10.0.0.9")
    backend = ConsulBackend(instance, ConsulConfig(
        type="consul", address=cluster.client_addr, observers=cluster.server_addrs, ttl="3s",
        timeout="500ms"))
    registrar = Registrar(instance, [backend], stop=StopConfig(grace_period=10))
    registrar.start(wait=True, timeout=10)
    client = cluster.clients[0]
    client.freeze()
    try:
        report = registrar.stop("test")
    finally:
        client.thaw()
    # Every server has confirmed: drain and the agent's call failed, the
    # servers took the removal.
    assert report.ok, report.summary()
    assert "maintenance" in report.summary()
    assert not any(instance.id in passing_ids(a, service) for a in cluster.server_addrs)


def test_without_servers_to_turn_to_a_frozen_agent_leaves_it_not_removed(cluster, service):
    instance = Instance.create(service, 8080, id=f"pod-{uuid.uuid4().hex[:8]}",
                               address="10.0.0.9")
    backend = ConsulBackend(instance, ConsulConfig(
        type="consul", address=cluster.client_addr, ttl="3s", timeout="500ms"))
    registrar = Registrar(instance, [backend], stop=StopConfig(grace_period=4, safety_margin=1))
    registrar.start(wait=True, timeout=10)
    client = cluster.clients[0]
    client.freeze()
    try:
        began = time.monotonic()
        report = registrar.stop("test")
        took = time.monotonic() - began
    finally:
        client.thaw()
    # The whole budget (3 s) was tried, and the report says what failed.
    assert not report.backends[0].removed, report.summary()
    assert "no answer in time" in report.summary(), report.summary()
    assert took > 2.5, report.summary()


def test_node_maintenance_takes_the_pod_out_of_passing_and_readyz_says_so(cluster, agent):
    # `consul maint -enable` on the pod's node: ?passing drops every service
    # there, ours included, though the agent accepts every check pass.
    client = cluster.clients[0]
    client.request("PUT", "/v1/agent/maintenance", params={"enable": "true", "reason": "test"})
    try:
        wait_until(lambda: agent.readyz() == 503, 1.0, "/readyz 503 while the node is in "
                   "maintenance", interval=0.01, ignore=(OSError,))
    finally:
        client.request("PUT", "/v1/agent/maintenance", params={"enable": "false"})
    wait_until(lambda: agent.readyz() == 200, 10, "ready again", ignore=(OSError,))
    assert "_node_maintenance is critical" in agent.log, agent.log
