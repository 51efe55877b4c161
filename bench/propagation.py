#!/usr/bin/env python3
"""Propagation benchmark: register/deregister cycles against a real
three-node cluster; prints p50/p99/max of deregister -> last observer
(the time until every member's own view has dropped the instance) and of
the whole stop(), and the requests one stopping pod sends to each member
(counted on this process's sockets, see registrar_testing.load).

With ``--lag SECONDS`` each stop runs while one follower is frozen
(SIGSTOP) for that long: the figures are then the time until it confirms
after its thaw, and what the stop cost the frozen member and the others.

    .venv/bin/python bench/propagation.py [--backend etcd] [--cycles 200]
    .venv/bin/python bench/propagation.py --backend zookeeper --cycles 5 --lag 2
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from registrar import Instance, Registrar
from registrar.discovery import backend_class
from registrar.config import StopConfig
from registrar_testing.load import count_sends


@dataclass
class Cluster:
    """A started three-node cluster: the backend's config section, the
    client ports the pod talks to, and how to find a follower to freeze
    (its index in ``ports``) and freeze/thaw it."""
    section: dict[str, Any]
    ports: list[int]
    follower: Callable[[], int]
    freeze: Callable[[int], None]
    thaw: Callable[[int], None]


@contextlib.contextmanager
def etcd_cluster(tmp: Path):
    from registrar_testing.etcd import EtcdCluster

    with EtcdCluster(3, tmp) as c:
        yield Cluster({"type": "etcd", "endpoints": c.endpoints, "ttl": "10s"},
                      [m.client_port for m in c.members],
                      lambda: next(i for i in range(3) if i != c.leader_index()),
                      lambda i: c.members[i].freeze(), lambda i: c.members[i].thaw())


@contextlib.contextmanager
def zookeeper(tmp: Path):
    from registrar_testing.zookeeper import ZooKeeperEnsemble

    with ZooKeeperEnsemble(3, tmp) as z:
        yield Cluster({"type": "zookeeper", "hosts": z.hosts, "session_timeout": "10s"},
                      [s.client_port for s in z.servers],
                      lambda: next(i for i in range(3) if i != z.leader_index()),
                      lambda i: z.servers[i].freeze(), lambda i: z.servers[i].thaw())


@contextlib.contextmanager
def consul(tmp: Path):
    from registrar_testing.consul import ConsulCluster

    # The instance registers at the client agent; the three servers observe.
    with ConsulCluster(tmp, servers=3, clients=1) as c:
        yield Cluster({"type": "consul", "address": c.client_addr,
                       "observers": c.server_addrs, "ttl": "10s"},
                      [urlsplit(a).port for a in [*c.server_addrs, c.client_addr]],
                      lambda: _consul_follower(c),
                      lambda i: c.servers[i].freeze(), lambda i: c.servers[i].thaw())


def _consul_follower(c) -> int:
    """A server that is not the raft leader: the one whose
    /v1/agent/self says it is not (``Stats.consul.leader``)."""
    for i, server in enumerate(c.servers):
        if server.get("/v1/agent/self").json()["Stats"]["consul"]["leader"] == "false":
            return i
    raise RuntimeError("no Consul server is a follower")


#: backend type -> context manager yielding a Cluster it started.
SETUPS = {"etcd": etcd_cluster, "zookeeper": zookeeper, "consul": consul}


def percentiles(values: list[float], unit: float = 1000, fmt: str = "6.2f",
                suffix: str = " ms") -> str:
    ms = sorted(v * unit for v in values)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return (f"p50 {statistics.median(ms):{fmt}}{suffix}   p99 {p99:{fmt}}{suffix}   "
            f"max {ms[-1]:{fmt}}{suffix}")


def run(cluster: Cluster, cycles: int, lag: float) -> dict[str, list[float]]:
    section = cluster.section
    cls = backend_class(section["type"])
    config = cls.config_model.parse(section)
    out: dict[str, list[float]] = {"propagation": [], "deregister": [], "stop": [],
                                   "sent_max": [], "sent_frozen": [], "sent_others": []}
    for i in range(cycles):
        instance = Instance("bench", f"pod-{uuid.uuid4().hex[:8]}", "10.0.0.1", 10000 + i % 50000)
        registrar = Registrar(instance, [cls(instance, config)],
                              stop=StopConfig(grace_period=30, propagation_timeout=10))
        registrar.start(wait=True, timeout=30)
        observers = registrar.backends[0].observers()
        deadline = time.monotonic() + 10
        while not all(o.sees(instance) for o in observers):
            if time.monotonic() > deadline:
                raise SystemExit(f"cycle {i}: the registration never reached every observer")
            time.sleep(0.002)
        frozen = cluster.follower() if lag else None
        thaw = None
        with count_sends(cluster.ports) as sent:
            if frozen is not None:
                cluster.freeze(frozen)
                thaw = threading.Timer(lag, cluster.thaw, (frozen,))
                thaw.start()
            try:
                report = registrar.stop("bench")
            finally:
                if thaw is not None:
                    thaw.join()
            # Closing is done in the background after the report: count it.
            time.sleep(0.2)
        (b,) = report.backends
        if not report.ok:
            raise SystemExit(f"cycle {i}: stop incomplete: {report.summary()}")
        out["propagation"].append(b.propagation_seconds)
        out["deregister"].append(b.deregister_seconds)
        out["stop"].append(report.seconds)
        counts = [sent[p] for p in cluster.ports]
        out["sent_max"].append(max(counts))
        if frozen is not None:
            out["sent_frozen"].append(counts[frozen])
            out["sent_others"].append(max(c for j, c in enumerate(counts) if j != frozen))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=sorted(SETUPS), action="append",
                        help="backend(s) to measure (default: all installed)")
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--lag", type=float, default=0.0, metavar="SECONDS",
                        help="freeze a follower for this long during each stop")
    args = parser.parse_args()
    # SIGTERM (a CI timeout, say) unwinds like Ctrl-C: the finally blocks
    # stop every server and process this bench started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.WARNING)
    for name in args.backend or sorted(SETUPS):
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp, \
                SETUPS[name](Path(tmp)) as cluster:
            began = time.monotonic()
            figures = run(cluster, args.cycles, args.lag)
            took = time.monotonic() - began
        lag = f", a follower frozen {args.lag:g}s per stop" if args.lag else ""
        print(f"{name}: {args.cycles} cycles on a three-node cluster{lag} ({took:.1f}s)")
        print(f"  drain+deregister call       {percentiles(figures['deregister'])}")
        print(f"  deregister -> last observer {percentiles(figures['propagation'])}")
        print(f"  whole stop()                {percentiles(figures['stop'])}")
        counts = ("sent_frozen", "sent_others") if args.lag else ("sent_max",)
        for key in counts:
            label = {"sent_max": "requests to the busiest member",
                     "sent_frozen": "requests to the frozen member",
                     "sent_others": "requests to the busiest other"}[key]
            print(f"  {label:<32}{percentiles(figures[key], 1, '6.0f', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
