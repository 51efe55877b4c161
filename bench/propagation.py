#!/usr/bin/env python3
"""Propagation benchmark: register/deregister cycles against a real
three-node cluster; prints p50/p99/max of deregister -> last observer
(the time until every member's own view has dropped the instance) and of
the whole stop().

    .venv/bin/python bench/propagation.py [--backend etcd] [--cycles 200]
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from registrar import Instance, Registrar
from registrar.discovery import backend_class
from registrar.config import StopConfig


@contextlib.contextmanager
def etcd_cluster(tmp: Path):
    from registrar_testing.etcd import EtcdCluster

    with EtcdCluster(3, tmp) as cluster:
        yield {"type": "etcd", "endpoints": cluster.endpoints, "ttl": "10s"}


@contextlib.contextmanager
def zookeeper(tmp: Path):
    from registrar_testing.zookeeper import ZooKeeperEnsemble

    with ZooKeeperEnsemble(3, tmp) as ensemble:
        yield {"type": "zookeeper", "hosts": ensemble.hosts, "session_timeout": "10s"}


@contextlib.contextmanager
def consul(tmp: Path):
    from registrar_testing.consul import ConsulCluster

    # The instance registers at the client agent; the three servers observe.
    with ConsulCluster(tmp, servers=3, clients=1) as cluster:
        yield {"type": "consul", "address": cluster.client_addr,
               "observers": cluster.server_addrs, "ttl": "10s"}


#: backend type -> context manager yielding that backend's config section
#: for a three-node cluster it started.
SETUPS = {"etcd": etcd_cluster, "zookeeper": zookeeper, "consul": consul}


def percentiles(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return f"p50 {statistics.median(ms):6.2f} ms   p99 {p99:6.2f} ms   max {ms[-1]:6.2f} ms"


def run(section: dict, cycles: int) -> dict[str, list[float]]:
    cls = backend_class(section["type"])
    config = cls.config_model.model_validate(section)
    out: dict[str, list[float]] = {"propagation": [], "deregister": [], "stop": []}
    for i in range(cycles):
        instance = Instance("bench", f"pod-{uuid.uuid4().hex[:8]}", "10.0.0.1", 10000 + i % 50000)
        registrar = Registrar(instance, [cls(instance, config)],
                              stop=StopConfig(grace_period=30, propagation_timeout=10))
        registrar.start(wait=True, timeout=30)
        observers = registrar.backends[0].observers()
        deadline = time.monotonic() + 10
        while not all(o.sees(instance) for o in observers):  # also warms their connections
            if time.monotonic() > deadline:
                raise SystemExit(f"cycle {i}: the registration never reached every observer")
            time.sleep(0.002)
        report = registrar.stop("bench")
        (b,) = report.backends
        if not report.ok:
            raise SystemExit(f"cycle {i}: stop incomplete: {report.summary()}")
        out["propagation"].append(b.propagation_seconds)
        out["deregister"].append(b.deregister_seconds)
        out["stop"].append(report.seconds)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=sorted(SETUPS), action="append",
                        help="backend(s) to measure (default: all installed)")
    parser.add_argument("--cycles", type=int, default=200)
    args = parser.parse_args()
    # SIGTERM (a CI timeout, say) unwinds like Ctrl-C: the finally blocks
    # stop every server and process this bench started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.WARNING)
    for name in args.backend or sorted(SETUPS):
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp, \
                SETUPS[name](Path(tmp)) as section:
            began = time.monotonic()
            figures = run(section, args.cycles)
            took = time.monotonic() - began
        print(f"{name}: {args.cycles} cycles on a three-node cluster ({took:.1f}s)")
        print(f"  drain+deregister call       {percentiles(figures['deregister'])}")
        print(f"  deregister -> last observer {percentiles(figures['propagation'])}")
        print(f"  whole stop()                {percentiles(figures['stop'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
