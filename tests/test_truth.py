"""Issue 14 on real servers: the registered state tells the truth, and a
dead member costs no budget.

A real `registrar agent` runs under a group id of its own, so nftables can
cut it (and only it) off from every registry member while the test keeps
reading the members. A sampler asks /readyz every 50 ms and, around each
answer, whether any member lists the entry: /readyz must never be 200 while
no member lists it (before and after the answer, so a change in between is
not counted against the agent). Faults: a partition from every member past
the TTL, and SIGSTOP past the TTL (for ZooKeeper that also expires the
session: the server drops it while the agent is frozen)."""
from __future__ import annotations

import signal
import time
import uuid

import pytest

from registrar_testing import free_port, wait_until
from registrar_testing.agents import (AGENT_GID, Agent, ReadySampler, Setup, consul_setup,
                                      etcd_setup, port_of, zookeeper_setup)
from registrar_testing.faults import Blackhole
from registrar_testing.zookeeper import ServerViews

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Blackhole.available(), reason="needs nftables as root")]

TTL = 3.0


@pytest.fixture
def service():
    return f"truth-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def zk_views(zk_ensemble):
    views = ServerViews(zk_ensemble.hosts)
    yield views
    views.close()


@pytest.fixture(params=["etcd", "zookeeper", "consul"])
def setup(request, service):
    if request.param == "etcd":
        return etcd_setup(request.getfixturevalue("etcd_cluster"), service)
    if request.param == "zookeeper":
        return zookeeper_setup(request.getfixturevalue("zk_ensemble"), service,
                               request.getfixturevalue("zk_views"))
    return consul_setup(request.getfixturevalue("consul_cluster"), service)


@pytest.fixture
def agents():
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.kill()


def _start(tmp_path, setup: Setup, service: str, agents: list) -> Agent:
    agent = Agent(tmp_path, service, setup.backend)
    agents.append(agent)
    wait_until(lambda: agent.readyz() == 200 and setup.listed(), 20,
               f"the agent registered on {setup.name}", ignore=(OSError,))
    return agent


def _ride_out(sampler: ReadySampler, agent: Agent, setup: Setup, fault_seconds: float) -> None:
    """After a fault: ready and listed again (the repair landed), and no
    sample ever said ready while nothing listed us."""
    wait_until(lambda: agent.readyz() == 200 and setup.listed(), 20,
               "ready and listed again after the fault", ignore=(OSError,))
    time.sleep(0.2)  # a few samples of the repaired state
    print(f"{setup.name}: {len(sampler.samples)} samples over {fault_seconds:.1f}s of fault; "
          f"ready-but-unlisted: {len(sampler.violations())}")
    assert not sampler.violations(), agent.log
    # The fault really did take the entry away (else the test proves nothing).
    assert sampler.saw_unlisted(), f"the entry never went away: {sampler.samples}"
    not_ready = sum(s[2] != 200 for s in sampler.samples)
    print(f"{setup.name}: /readyz not 200 in {not_ready} of {len(sampler.samples)} samples")


def test_partitioned_from_every_member_past_the_ttl(tmp_path, setup, service, agents):
    agent = _start(tmp_path, setup, service, agents)
    with ReadySampler(agent, setup.listed) as sampler:
        with Blackhole(setup.ports, mode="drop", gid=AGENT_GID):
            began = time.monotonic()
            wait_until(lambda: not setup.listed(), TTL + 10, "the entry expired", interval=0.05)
            time.sleep(1.0)  # stay cut off a while after it went
            cut = time.monotonic() - began
        _ride_out(sampler, agent, setup, cut)
    assert agent.terminate() < 9, agent.log
    assert agent.proc.returncode == 0, agent.log
    assert "presumed lost" in agent.log or "may be gone" in agent.log, agent.log


def test_frozen_past_the_ttl(tmp_path, setup, service, agents):
    agent = _start(tmp_path, setup, service, agents)
    with ReadySampler(agent, setup.listed) as sampler:
        agent.proc.send_signal(signal.SIGSTOP)
        began = time.monotonic()
        try:
            wait_until(lambda: not setup.listed(), TTL + 10, "the entry expired", interval=0.05)
            time.sleep(1.0)
        finally:
            agent.proc.send_signal(signal.SIGCONT)
        _ride_out(sampler, agent, setup, time.monotonic() - began)
    assert agent.terminate() < 9, agent.log
    assert agent.proc.returncode == 0, agent.log


def test_a_member_that_refuses_connections_at_the_stop_costs_no_budget(
        tmp_path, setup, service, agents):
    """The member the agent's observers would wait on refuses connections
    (to the agent only) from just before SIGTERM: the removal is confirmed
    on the others and the stop ends at once, reporting that member down."""
    agent = _start(tmp_path, setup, service, agents)
    member = setup.members[0]
    with Blackhole(port_of(member), mode="reject", gid=AGENT_GID):
        seconds = agent.terminate()
    log = agent.log
    print(f"{setup.name}: stop with {member} refusing took {seconds:.3f}s")
    assert agent.proc.returncode == 0, log
    assert seconds < 5, log  # the budget is 9 s; waiting on the dead member would take all of it
    assert "confirmed 2/3 observers, 1 down" in log, log
    assert "refuses connections: not waiting for it" in log, log
    wait_until(lambda: not setup.listed(), 5, "the entry is gone")


def test_one_dead_endpoint_in_the_config_costs_no_budget(tmp_path, setup, service, agents):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    backend = dict(setup.backend)
    if setup.name == "etcd":
        backend["endpoints"] = [*backend["endpoints"], f"http://{dead}"]
    elif setup.name == "zookeeper":
        backend["hosts"] = [*backend["hosts"], dead]
    else:
        backend["observers"] = [*backend["observers"], f"http://{dead}"]
    agent = Agent(tmp_path, service, backend)
    agents.append(agent)
    wait_until(lambda: agent.readyz() == 200 and setup.listed(), 20, "registered",
               ignore=(OSError,))
    seconds = agent.terminate()
    log = agent.log
    print(f"{setup.name}: stop with a dead endpoint took {seconds:.3f}s")
    assert agent.proc.returncode == 0, log
    assert seconds < 5, log
    assert "confirmed 3/4 observers, 1 down" in log, log
