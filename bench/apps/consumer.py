#!/usr/bin/env python3
"""The consumer of the rolling-restart bench: a client-side load balancer
that discovers the service by watching ONE member of a registry (its own
code, registrar_testing.watchers, nothing of registrar's) and sends it a
steady stream of requests.

    consumer.py --registry etcd|zookeeper|consul --target ADDR --out FILE
                [--service web] [--client per-request|keepalive|cached]
                [--cache-s 2] [--rate 300] [--timeout 2] [--threads 64]
                [--max-seconds 600]

--target: an etcd client URL (watch of services/<service>/), a ZooKeeper
host:port (ChildrenWatch of /services/<service>), a Consul HTTP address
(blocking queries on /v1/health/service/<service>?passing&stale).

Traffic: open loop, --rate requests per second, each a ``GET /`` to the
next instance of the current set (round-robin, chosen when the request is
due), run by a pool of --threads; --client says how connections are made
(bench/apps/http_clients.py). No retries. A request due while no
instance is known fails as ``no_instance``.

--client cached: what most real consumers do (Spring Cloud LoadBalancer's
instance-list cache, 35 s by default; Ribbon's 30 s refresh; HAProxy's
``hold valid``; a DNS cache). The watch above still follows the registry,
but the list the requests are picked from is a copy of what it lists,
taken when the consumer starts, then every --cache-s seconds at a phase
drawn at random per process (so consumers do not refresh in step). Its
connections are per-request ones (a new one per request,
``Connection: close``).

Protocol: JSON lines on stdout, ``time.monotonic()`` timestamps: ``ready``
(the initial set), ``add``/``del`` (an address, when the balancer applied
the change; for ``cached``, when its copy changed), ``count`` (every
second: sent and failed so far), ``error``, ``done`` (``cached`` adds
``refreshes``, how many copies it took). Every request is written to --out as
``[t_due, t_start, t_end, addr, outcome, reused_or_connected, detail]``.
Commands on stdin: ``go`` starts the traffic, ``stop`` (or EOF) ends it,
waits for the requests in flight and exits. Everything stops by itself
after --max-seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable

from http_clients import KeepAlive, PerRequest, open_loop
from registrar_testing.watchers import watcher

_print_lock = threading.Lock()


def emit(**fields) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()


def emit_change(kind: str, addr: str) -> None:
    emit(ev=kind, ep=addr, t=time.monotonic())


class Balancer:
    """Round-robin over the addresses discovery currently lists;
    ``notify(kind, addr)`` is told each change once applied."""

    def __init__(self, notify: Callable[[str, str], None] = emit_change) -> None:
        self._lock = threading.Lock()
        self._list: list[str] = []
        self._next = 0
        self._notify = notify

    def changed(self, kind: str, addr: str) -> None:
        with self._lock:
            if kind == "add" and addr not in self._list:
                self._list = sorted([*self._list, addr])
            elif kind == "del" and addr in self._list:
                self._list = [a for a in self._list if a != addr]
        self._notify(kind, addr)

    def pick(self) -> str | None:
        with self._lock:
            if not self._list:
                return None
            addr = self._list[self._next % len(self._list)]
            self._next += 1
            return addr

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self._list)


class CachedBalancer(Balancer):
    """Round-robin over a copy of what ``source()`` lists (discovery's
    truth), taken by refresh(): once by start(), then at
    ``began + phase + k * ttl`` (k = 0, 1, ...; ``phase`` drawn in [0, ttl)
    unless given). Between two copies the list does not change, whatever
    the registry says."""

    def __init__(self, source: Callable[[], Iterable[str]], ttl: float,
                 phase: float | None = None,
                 notify: Callable[[str, str], None] = emit_change) -> None:
        if ttl <= 0:
            raise ValueError("the cache's ttl must be positive")
        super().__init__(notify)
        self._source = source
        self.ttl = ttl
        self.phase = random.uniform(0, ttl) if phase is None else phase
        self.refreshes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> None:
        """Take a new copy; notify one add/del per address that differs."""
        new = sorted(set(self._source()))
        with self._lock:
            old, self._list = set(self._list), new
            self.refreshes += 1
        for addr in sorted(set(new) - old):
            self._notify("add", addr)
        for addr in sorted(old - set(new)):
            self._notify("del", addr)

    def next_refresh(self, began: float, now: float) -> float:
        """The first scheduled refresh strictly after ``now``."""
        first = began + self.phase
        if now < first:
            return first
        return first + (math.floor((now - first) / self.ttl) + 1) * self.ttl

    def start(self) -> CachedBalancer:
        self.refresh()
        began = time.monotonic()

        def run() -> None:
            due = self.next_refresh(began, began)
            while not self._stop.wait(max(due - time.monotonic(), 0)):
                self.refresh()
                # On schedule, not "ttl after the last one": no drift; a
                # refresh that came late does not make the next one late.
                due = self.next_refresh(began, max(time.monotonic(), due))

        self._thread = threading.Thread(target=run, name="cache", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--registry", choices=["etcd", "zookeeper", "consul"], required=True)
    parser.add_argument("--target", required=True, help="the ONE member this consumer reads")
    parser.add_argument("--service", default="web")
    parser.add_argument("--client", choices=["per-request", "keepalive", "cached"],
                        default="per-request")
    parser.add_argument("--cache-s", type=float, default=2.0,
                        help="--client cached: seconds between two copies of the list")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args()
    if args.cache_s <= 0:
        parser.error("--cache-s must be positive")
    began = time.monotonic()

    def on_error(msg):
        emit(ev="error", what=msg, t=time.monotonic())

    if args.client == "cached":
        # The watch keeps the truth (its own set); the balancer copies it.
        discovery = watcher(args.registry, args.target, args.service, None, on_error)
        discovery.start()
        balancer: Balancer = CachedBalancer(discovery.addresses, args.cache_s).start()
    else:
        balancer = Balancer()
        discovery = watcher(args.registry, args.target, args.service, balancer.changed,
                            on_error)
        discovery.start()
    emit(ev="ready", t=time.monotonic(), endpoints=balancer.snapshot())

    client = KeepAlive(args.timeout) if args.client == "keepalive" else PerRequest(args.timeout)
    def one(t_due: float) -> tuple[tuple, bool]:
        t_start = time.monotonic()
        addr = balancer.pick()
        if addr is None:
            return (t_due, t_start, t_start, None, "no_instance", False, ""), False
        kind, flag, detail = client.request(addr)
        return (t_due, t_start, time.monotonic(), addr, kind, flag, detail), kind == "ok"

    records, behind = open_loop(args.rate, args.max_seconds, args.threads, one, emit, began)
    if isinstance(balancer, CachedBalancer):
        balancer.stop()
    discovery.stop()
    client.close()
    with open(args.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    kinds: dict[str, int] = {}
    for r in records:
        kinds[r[4]] = kinds.get(r[4], 0) + 1
    extra = {"opened": client.opened, "dropped": client.dropped} \
        if isinstance(client, KeepAlive) else {}
    if isinstance(balancer, CachedBalancer):
        extra["refreshes"] = balancer.refreshes
    emit(ev="done", t=time.monotonic(), sent=len(records), kinds=kinds,
         fell_behind=behind, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
