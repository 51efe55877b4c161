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

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest
import yaml

from registrar_testing import free_port, wait_until
from registrar_testing.consul import passing_ids
from registrar_testing.etcd import kv_get_serializable
from registrar_testing.faults import Blackhole
from registrar_testing.zookeeper import ServerViews

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Blackhole.available(), reason="needs nftables as root")]

#: The agent's group id: what the nftables rules match.
AGENT_GID = 4714
TTL = 3.0
POD_IP = "10.20.30.40"


def port_of(address: str) -> int:
    if "://" not in address:
        address = "tcp://" + address
    return urlsplit(address).port


@dataclass
class Setup:
    """One registry as this module uses it: the backend section, the ports
    the agent talks to, and whether any member lists the entry."""
    name: str
    backend: dict
    ports: list[int]
    listed: object  # () -> bool
    members: list[str] = field(default_factory=list)


def etcd_setup(cluster, service: str) -> Setup:
    key = f"/services/{service}/{POD_IP}:8080"
    return Setup("etcd", {"type": "etcd", "endpoints": cluster.endpoints, "ttl": f"{TTL:g}s",
                          "timeout": "1s"},
                 [port_of(e) for e in cluster.endpoints],
                 lambda: any(kv_get_serializable(e, key, timeout=1)[1] for e in cluster.endpoints),
                 list(cluster.endpoints))


def zookeeper_setup(ensemble, service: str, views: ServerViews) -> Setup:
    path = f"/services/{service}/truth-pod"
    return Setup("zookeeper", {"type": "zookeeper", "hosts": ensemble.hosts,
                               "session_timeout": f"{TTL:g}s", "timeout": "1s"},
                 [port_of(h) for h in ensemble.hosts],
                 lambda: any(views.exists(path)), list(ensemble.hosts))


def consul_setup(cluster, service: str) -> Setup:
    return Setup("consul", {"type": "consul", "address": cluster.client_addr,
                            "observers": cluster.server_addrs, "ttl": f"{TTL:g}s",
                            "timeout": "1s"},
                 [port_of(a) for a in [cluster.client_addr, *cluster.server_addrs]],
                 lambda: any("truth-pod" in passing_ids(a, service) for a in cluster.server_addrs),
                 list(cluster.server_addrs))


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


class Agent:
    """`registrar agent` under AGENT_GID, its log in a file."""

    def __init__(self, tmp_path, service: str, backend: dict, **stop):
        self.control = f"127.0.0.1:{free_port()}"
        config = tmp_path / "agent.yaml"
        config.write_text(yaml.safe_dump({
            "service": {"name": service, "port": 8080},
            "backends": [backend],
            "stop": {"grace_period": "10s", "safety_margin": "1s", **stop},
            "control": {"listen": self.control},
            "health": False,  # no app here: register at once
        }))
        self.log_path = tmp_path / "agent.log"
        env = {**os.environ, "POD_NAME": "truth-pod", "POD_IP": POD_IP}
        for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN"):
            env.pop(name, None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "registrar", "agent", "--config", str(config)],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                group=AGENT_GID)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def readyz(self, timeout: float = 0.3) -> int | None:
        try:
            with urllib.request.urlopen(f"http://{self.control}/readyz", timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None  # frozen, or not up yet

    def terminate(self, timeout: float = 15) -> float:
        """SIGTERM; seconds until it exited."""
        began = time.monotonic()
        self.proc.send_signal(signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=timeout)
        return time.monotonic() - began

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def agents():
    started: list[Agent] = []
    yield started
    for agent in started:
        agent.kill()


class Sampler:
    """Every 50 ms: listed?, /readyz, listed? A violation is a 200 with no
    member listing the entry on both sides of it."""

    def __init__(self, agent: Agent, listed):
        self.agent, self.listed = agent, listed
        self.samples: list[tuple[float, bool, int | None, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _listed(self) -> bool | None:
        try:
            return bool(self.listed())
        except Exception:  # noqa: BLE001 - a read that failed proves nothing
            return None

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            before = self._listed()
            code = self.agent.readyz()
            after = self._listed()
            self.samples.append((time.monotonic(), before is not False, code, after is not False))

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def violations(self) -> list:
        return [s for s in self.samples if s[2] == 200 and not s[1] and not s[3]]

    def saw_unlisted(self) -> bool:
        """Whether some sample found no member listing the entry (on either
        side of an answer that was not 200: no answer while frozen counts)."""
        return any((not s[1] or not s[3]) and s[2] != 200 for s in self.samples)


def _start(tmp_path, setup: Setup, service: str, agents: list) -> Agent:
    agent = Agent(tmp_path, service, setup.backend)
    agents.append(agent)
    wait_until(lambda: agent.readyz() == 200 and setup.listed(), 20,
               f"the agent registered on {setup.name}", ignore=(OSError,))
    return agent


def _ride_out(sampler: Sampler, agent: Agent, setup: Setup, fault_seconds: float) -> None:
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
    with Sampler(agent, setup.listed) as sampler:
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
    with Sampler(agent, setup.listed) as sampler:
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
