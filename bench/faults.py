"""The fault table: what a real `registrar agent` does under each fault, on
each registry, measured against real three-member clusters on loopback.

    .venv/bin/python bench/faults.py [--registry etcd|zookeeper|consul|all] [--json]

The agent runs under a group id of its own, so nftables cuts off the agent
alone (registrar_testing.agents, faults.Blackhole(gid=)); the registries'
own views are read as consumers read them (etcd: each member's serializable
read; ZooKeeper: a session on each server; Consul: each server's
?passing&stale). Settings: TTL (session timeout) 3 s, request timeout 1 s,
grace period 10 s, safety margin 1 s (a stop budget of 9 s); the rest is
the default configuration. Root is needed (nftables).

Cases:
  sigkill         agent SIGKILLed: when the entry left every member's view
  sigstop         frozen until the entry expired (+1 s), then SIGCONT: when
                  it was listed again; /readyz never 200 while unlisted
  partition       cut off from every member until the entry expired (+1 s),
                  then healed: same figures
  down at start   every member unreachable for 3 s from the agent's start:
                  registered this long after they came back
  down at stop    every member unreachable from just before SIGTERM: exit
                  code and time to exit (the budget is 9 s)
  member refuses  the member the agent uses refuses connections from just
                  before SIGTERM: exit code and time to exit
  leader killed   the leader SIGKILLed as SIGTERM arrives: exit code, time
  leader frozen   the leader SIGSTOPped as SIGTERM arrives: exit code, time,
                  and when the entry left every live member's view (Consul:
                  the client agent's RPCs hang on the frozen server)
  agent left      Consul only: the client agent restarted gracefully (SIGTERM:
                  it leaves the cluster, its node's services dropped), then
                  started again: /readyz never 200 while unlisted
  restarted       agent SIGKILLed and started again at once (same pod
                  name): ready again after; still listed once the old
                  registration's TTL is over
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

from registrar_testing import wait_until
from registrar_testing.agents import (AGENT_GID, Agent, ReadySampler, Setup, consul_setup,
                                      etcd_setup, port_of, zookeeper_setup)
from registrar_testing.faults import Blackhole

TTL = 3.0


def until(predicate, timeout: float, what: str, interval: float = 0.02) -> float:
    """Seconds until ``predicate`` held (TimeoutError past ``timeout``)."""
    began = time.monotonic()
    wait_until(predicate, timeout, what, interval=interval, ignore=(OSError, Exception))
    return time.monotonic() - began


class Registry:
    """One cluster and what the cases need of it: a fresh Setup per agent,
    and a way to kill and bring back the leader."""

    def __init__(self, name: str, stack: ExitStack, base: Path):
        self.name = name
        if name == "etcd":
            from registrar_testing.etcd import EtcdCluster

            self.cluster = stack.enter_context(EtcdCluster(3, base / "etcd"))
        elif name == "zookeeper":
            from registrar_testing.zookeeper import ServerViews, ZooKeeperEnsemble

            self.cluster = stack.enter_context(ZooKeeperEnsemble(3, base / "zk"))
            self.views = ServerViews(self.cluster.hosts)
            stack.callback(self.views.close)
        else:
            from registrar_testing.consul import ConsulCluster

            self.cluster = stack.enter_context(ConsulCluster(base / "consul", servers=3,
                                                             clients=1))

    def setup(self, service: str) -> Setup:
        if self.name == "etcd":
            return etcd_setup(self.cluster, service, TTL)
        if self.name == "zookeeper":
            return zookeeper_setup(self.cluster, service, self.views, TTL)
        return consul_setup(self.cluster, service, TTL)

    def freeze_leader(self):
        """SIGSTOP the leader; returns (its index, a function that thaws it
        and waits until the cluster is whole again)."""
        if self.name == "etcd":
            index = self.cluster.leader_index()
            member = self.cluster.members[index]
            member.freeze()
            return index, lambda: (member.thaw(), wait_until(
                lambda: all(m.healthy() for m in self.cluster.members), 60, "etcd healthy"))
        if self.name == "zookeeper":
            index = self.cluster.wait_leader()
            server = self.cluster.servers[index]
            server.freeze()
            return index, lambda: (server.thaw(), server.wait_serving(60),
                                   self.cluster.wait_leader(60))
        server = self.cluster.leader_server()
        server.freeze()
        return self.cluster.servers.index(server), lambda: (server.thaw(), wait_until(
            self.cluster.healthy, 60, "consul healthy", interval=0.2, ignore=Exception))

    def kill_leader(self):
        """SIGKILL the leader; returns a function that brings it back."""
        if self.name == "etcd":
            member = self.cluster.members[self.cluster.leader_index()]
            member.kill()
            return lambda: member.restart()
        if self.name == "zookeeper":
            server = self.cluster.servers[self.cluster.wait_leader()]
            server.kill()
            return lambda: (server.restart(), self.cluster.wait_leader())
        server = self.cluster.leader_server()
        server.kill()
        return lambda: server.restart()


def run_case(registry: Registry, case: str, tmp: Path) -> dict:
    service = f"fault-{uuid.uuid4().hex[:8]}"
    setup = registry.setup(service)
    workdir = tmp / f"{registry.name}-{case.replace(' ', '-')}-{service}"
    workdir.mkdir()
    agents: list[Agent] = []

    def start(**kw) -> Agent:
        sub = workdir / str(len(agents))
        sub.mkdir()
        agent = Agent(sub, service, setup.backend, **kw)
        agents.append(agent)
        return agent

    def registered(agent: Agent, timeout: float = 30) -> float:
        return until(lambda: agent.readyz() == 200 and setup.listed(), timeout, "registered")

    row = {"registry": registry.name, "case": case}
    try:
        if case == "sigkill":
            agent = start()
            registered(agent)
            agent.proc.kill()
            row["gone_s"] = until(lambda: not setup.listed(), 30, "gone")
            row["outcome"] = f"gone from every member {row['gone_s']:.2f}s after the kill"
        elif case in ("sigstop", "partition"):
            agent = start()
            registered(agent)
            with ReadySampler(agent, setup.listed) as sampler:
                with ExitStack() as fault:
                    if case == "sigstop":
                        agent.proc.send_signal(signal.SIGSTOP)
                        fault.callback(agent.proc.send_signal, signal.SIGCONT)
                    else:
                        fault.enter_context(Blackhole(setup.ports, "drop", gid=AGENT_GID))
                    row["expired_s"] = until(lambda: not setup.listed(), 30, "expired")
                    time.sleep(1.0)
                row["repaired_ms"] = 1000 * until(lambda: setup.listed(), 30, "listed again")
                until(lambda: agent.readyz() == 200, 30, "ready again")
                time.sleep(0.2)
            row["samples"] = len(sampler.samples)
            row["ready_while_unlisted"] = len(sampler.violations())
            row["outcome"] = (f"expired after {row['expired_s']:.2f}s; listed again "
                              f"{row['repaired_ms']:.0f}ms after the fault ended; /readyz 200 "
                              f"while unlisted: {row['ready_while_unlisted']} of "
                              f"{row['samples']} samples")
        elif case == "down at start":
            with Blackhole(setup.ports, "drop", gid=AGENT_GID):
                agent = start()
                time.sleep(3.0)
                row["ready_while_down"] = agent.readyz() == 200
            row["registered_s"] = registered(agent)
            row["outcome"] = f"registered {row['registered_s']:.2f}s after the registry came back"
        elif case in ("down at stop", "member refuses", "leader killed"):
            agent = start()
            registered(agent)
            with ExitStack() as fault:
                if case == "down at stop":
                    fault.enter_context(Blackhole(setup.ports, "drop", gid=AGENT_GID))
                elif case == "member refuses":
                    fault.enter_context(Blackhole(port_of(setup.members[0]), "reject",
                                                  gid=AGENT_GID))
                else:
                    fault.callback(registry.kill_leader())
                began = time.monotonic()
                agent.proc.send_signal(signal.SIGTERM)
                agent.proc.wait(20)
                row["exit_s"] = time.monotonic() - began
                row["exit_code"] = agent.proc.returncode
            row["gone_s"] = until(lambda: not setup.listed(), 30, "gone")
            summary = [line for line in agent.log.splitlines() if "after SIGTERM in" in line]
            row["report"] = summary[-1].split(": ", 1)[-1] if summary else ""
            row["outcome"] = (f"exit {row['exit_code']} after {row['exit_s']:.2f}s "
                              f"(budget 9s)")
        elif case == "leader frozen":
            agent = start()
            registered(agent)
            until(lambda: all(setup.listed_on(i) for i in range(len(setup.members))), 10,
                  "listed by every member")
            frozen, thaw = registry.freeze_leader()
            live = [i for i in range(len(setup.members)) if i != frozen]
            try:
                began = time.monotonic()
                agent.proc.send_signal(signal.SIGTERM)
                row["gone_s"] = until(lambda: not setup.listed_by(live), 30, "gone from the "
                                      "live members", interval=0.05)
                agent.proc.wait(20)
                row["exit_s"] = time.monotonic() - began
                row["exit_code"] = agent.proc.returncode
            finally:
                thaw()
            summary = [line for line in agent.log.splitlines() if "after SIGTERM in" in line]
            row["report"] = summary[-1].split(": ", 1)[-1] if summary else ""
            row["outcome"] = (f"gone from the live members {row['gone_s']:.2f}s after SIGTERM; "
                              f"exit {row['exit_code']} after {row['exit_s']:.2f}s (budget 9s)")
        elif case == "agent left":
            if registry.name != "consul":
                return {**row, "outcome": "— (no client agent)"}
            agent = start()
            registered(agent)
            client = registry.cluster.clients[0]
            with ReadySampler(agent, setup.listed) as sampler:
                time.sleep(0.5)
                began = time.monotonic()
                client.restart(timeout=60, graceful=True)
                row["agent_back_s"] = time.monotonic() - began
                row["ready_s"] = until(lambda: agent.readyz() == 200 and setup.listed(), 30,
                                       "ready and listed again") + row["agent_back_s"]
                time.sleep(0.5)
            unlisted = [t - began for t, before, _, after in sampler.samples
                        if not before and not after]
            row["unlisted_s"] = [round(unlisted[0], 2), round(unlisted[-1], 2)] if unlisted else []
            row["samples"] = len(sampler.samples)
            row["ready_while_unlisted"] = len(sampler.violations())
            row["outcome"] = (f"unlisted {row['unlisted_s']} s after the restart began; "
                              f"ready again after {row['ready_s']:.2f}s; /readyz 200 while "
                              f"unlisted: {row['ready_while_unlisted']} of {row['samples']} "
                              f"samples")
        elif case == "restarted":
            first = start()
            registered(first)
            first.proc.kill()
            began = time.monotonic()
            second = start()
            row["ready_s"] = until(lambda: second.readyz() == 200, 30, "ready")
            listed = []
            while time.monotonic() - began < TTL + 2.0:
                listed.append(setup.listed())
                time.sleep(0.05)
            row["listed_throughout_ttl"] = all(listed)
            row["outcome"] = (f"ready {row['ready_s']:.2f}s after the restart; listed through "
                              f"the old registration's TTL: {row['listed_throughout_ttl']}")
        else:
            raise ValueError(case)
    except Exception as exc:  # noqa: BLE001 - a row says what went wrong
        row["outcome"] = f"FAILED: {type(exc).__name__}: {exc}"
        row["log"] = agents[-1].log[-2000:] if agents else ""
    finally:
        for agent in agents:
            agent.kill()
    return row


CASES = ["sigkill", "sigstop", "partition", "down at start", "down at stop", "member refuses",
         "leader killed", "leader frozen", "agent left", "restarted"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", choices=["etcd", "zookeeper", "consul", "all"],
                        default="all")
    parser.add_argument("--case", choices=CASES, action="append")
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    args = parser.parse_args()
    if not Blackhole.available():
        print("faults: needs nftables as root", file=sys.stderr)
        return 2
    names = ["etcd", "zookeeper", "consul"] if args.registry == "all" else [args.registry]
    rows = []
    with tempfile.TemporaryDirectory(prefix="registrar-faults-") as tmp:
        for name in names:
            with ExitStack() as stack:
                registry = Registry(name, stack, Path(tmp))
                for case in args.case or CASES:
                    row = run_case(registry, case, Path(tmp))
                    rows.append(row)
                    if args.json:
                        print(json.dumps(row), flush=True)
                    else:
                        print(f"| {case} | {name} | {row['outcome']} |", flush=True)
    return 0 if all(not r["outcome"].startswith("FAILED") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
