#!/usr/bin/env python3
"""Rolling-restart benchmark: requests lost, and time per pod stop, while
the pods of service "web" are restarted one by one, for real, on this
machine, with each way of taking a pod out of a registry, side by side.

    .venv/bin/python bench/rolling_restart.py [--registry all] [--min-requests 50000]
        [--strategies naive,sigterm-dereg,sleep,registrar]
        [--consumers per-request,keepalive,cached] [--cache-s 2] [--apps dies]
        [--rate 300] [--work-ms 20] [--pods 3] [--grace 30] [--json] [--plot FILE.png]
        [--keep]

What runs (all on 127.0.0.1; bench/rr/ holds the parts):
  * the registries (--registry etcd|zookeeper|consul|all), one after the
    other, started with the testing kit's launchers: three etcd members;
    three ZooKeeper servers; Consul with 3 servers and 1 client agent, the
    pods registering at the client agent;
  * --pods pods, each one container played by the kubelet simulator
    (registrar_testing.kubelet: preStop hook, SIGTERM, SIGKILL at the grace
    period --grace): a wrapper with bench/apps/webapp.py under it (--work-ms
    per request) on a port of its own;
  * the consumers (--consumers, default all three; bench/apps/consumer.py,
    nothing of registrar's): each discovers the pods by watching ONE member,
    a follower (etcd: a watch of services/web/ through the JSON gateway;
    ZooKeeper: a kazoo ChildrenWatch of /services/web; Consul: blocking
    queries on /v1/health/service/web?passing&stale) and sends --rate
    requests per second, round-robin over the instances it knows, never
    retrying:
      per-request  a new TCP connection per request (Connection: close);
      keepalive    a pool of persistent HTTP/1.1 connections per instance; a
                   pooled socket the peer closed is dropped before reuse (as
                   urllib3 does); idle sockets to a removed instance stay open;
      cached       what most real consumers do (Spring Cloud LoadBalancer's
                   instance-list cache, 35 s by default; Ribbon's 30 s
                   refresh; HAProxy's `hold valid`; DNS caches): the same
                   watch, but it picks from a copy of the watch's list taken
                   every --cache-s seconds (default 2; at a random phase per
                   consumer), so it lists a change up to --cache-s late; a new
                   TCP connection per request, as per-request. Its rows are
                   labelled with the cache ("cached 2s"); the wait timeouts
                   below are --cache-s longer for it.
    They all run at the same time, each at the full rate, against the same
    pods (the pods see N x --rate with N consumers): each gets the same
    rolling restarts, and a full run costs 1/N of the time. A row of the
    results is one consumer.

The app (--apps, default dies; dies,graceful adds rows):
  dies      SIGTERM kills it at once: requests in flight are cut;
  graceful  stops accepting, closes idle connections, finishes the
            requests in flight, exits.

Strategies (--strategies, default all four, in this order):
  naive          bench/apps/naive_wrapper.py registers the app (etcd: a lease
                 key services/web/<addr> = {"Op":0,"Addr":...}; ZooKeeper: an
                 ephemeral Curator-style node /services/web/<pod> via kazoo;
                 Consul: an agent service with a TTL check, plain HTTP); on
                 SIGTERM it passes SIGTERM to the app at once and deregisters
                 NOTHING (nor closes its ZooKeeper session): the 10 s TTL /
                 session timeout / lease removes the entry;
  sigterm-dereg  the same wrapper deregisters on SIGTERM, then stops the app at
                 once (what ContainerPilot and Spring Cloud do);
  sleep          the same wrapper as naive, and a preStop exec that deregisters
                 with the registry's own tool (`etcdctl del`; Debian's
                 /usr/share/zookeeper/bin/zkCli.sh delete; `consul services
                 deregister -id=<pod>` with CONSUL_HTTP_ADDR), then `sleep 5`;
  registrar      `registrar run` with a config of service, backends, control
                 and stop.grace_period only (registrar's defaults do the rest;
                 the backend section names the registry: etcd endpoints and
                 ZooKeeper hosts = all three, Consul address = the client
                 agent and observers = the three servers), preStop httpGet to
                 /prestop on the control port.

A block is one (registry, app, strategy): start the pods, start the
consumers, wait until they list every pod, start the traffic; 1 s later,
rounds, each a rolling restart of every pod (delete a pod: the kubelet's
preStop, SIGTERM, SIGKILL at the grace period; start its replacement; wait
until every consumer lists it, the cached one in its cache; next pod;
with a cached consumer each deletion first waits a random 0 to --cache-s
seconds, or it would always come just after the refresh that listed the
replacement: the cache's worst phase, every time), until each consumer
has sent >= --min-requests; 1 s more traffic. After
each round the bench waits, the traffic going on, until no consumer lists
a deleted pod any more (naive: until the TTL removed it; cached: until its
cache dropped it too; at most 30 s, plus --cache-s with a cached
consumer), so every round starts from the same state. Between blocks every
pod is SIGKILLed and the registry cleared.

A failed request is classified by the consumer: refused (nothing listens),
reset (the connection was reset or closed before a whole response came:
RST, EOF, a truncated answer), timeout (2 s, connect or response), http5xx,
no_instance (no instance known when the request was due), other (any other
socket error; not expected).

Late requests: requests that started after the deletion of the pod whose
address they were sent to (the pod that had that address then), whatever
their outcome: traffic a consumer still sent to a pod it had been told was
going (ok while the pod still served, e.g. during a preStop sleep; failed
once it stopped).

Output: a table on stdout (one line per registry, strategy, consumer, app:
sent, failed, failed by kind, late requests, per-pod stop p50 and max in
seconds, from the deletion until the pod's last container exited); with
--json one JSON line per row on stdout instead (registry, strategy,
consumer, app, sent, failed, failed_by_kind, late_requests, late_failed,
stop_p50_s, stop_max_s, failed_per_pod, pods_deleted, rounds,
failed_after_deletion: per deleted pod in deletion order, its requests
that failed after its deletion; cache_s for the cached consumer) and the
table on stderr. "/pod" is failed per pod deleted: the figure that does not
depend on how long the traffic ran between rounds. --plot FILE.png draws
requests, failures and late requests per second over time, one panel per
strategy and registry (and app), a column of the legend per consumer, pod
deletions dotted, each with how many requests to that pod failed after it
(all consumers; up to 40 deletions a panel).
Progress goes to stderr (per round, and per block how many connections the
keepalive consumer opened and how many it found closed before reuse, and
how many times the cached consumer refreshed its cache).
Every process the bench starts is stopped on exit, Ctrl-C or SIGTERM.

Time: a block lasts about --min-requests / --rate seconds plus its last
round; the default run of --registry all took about 40 minutes on this
2-core machine when nothing else ran, measured with two consumers
(per-request, keepalive): the cached one adds half as much load again, and
up to --cache-s per replacement to each round (fewer rounds in a block).
"""
from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from rr.block import run_block
from rr.cli import add_load_arguments, progress, split
from rr.consumers import CLIENTS, labels
from rr.pods import STRATEGIES
from rr.registries import REGISTRIES
from rr.report import Block, json_lines, plot, rows, table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default="all", choices=[*REGISTRIES, "all"])
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help="comma-separated, of: " + ", ".join(STRATEGIES))
    parser.add_argument("--consumers", default=",".join(CLIENTS),
                        help="comma-separated, of: " + ", ".join(CLIENTS))
    parser.add_argument("--cache-s", type=float, default=2.0,
                        help="the cached consumer's seconds between two copies of its list")
    parser.add_argument("--apps", default="dies", help="comma-separated, of: dies, graceful")
    add_load_arguments(parser, "rounds")
    parser.add_argument("--json", action="store_true",
                        help="JSON lines on stdout instead of the table (the table goes to stderr)")
    parser.add_argument("--plot", metavar="FILE.png", help="draw requests and failures over time")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.pods < 1 or args.rate <= 0 or args.min_requests < 1 or args.cache_s <= 0:
        parser.error("--pods, --rate, --min-requests and --cache-s must be positive")
    # SIGTERM (a CI timeout, say) unwinds like Ctrl-C: the finally blocks
    # stop every server and process this bench started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    registries = list(REGISTRIES) if args.registry == "all" else [args.registry]
    strategies = split(args.strategies, list(STRATEGIES), "strategy")
    args.consumers = split(args.consumers, CLIENTS, "consumer")
    apps = split(args.apps, ["dies", "graceful"], "app")
    if args.plot:
        import matplotlib  # noqa: F401 - fail now, not after the run

    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bench-rolling-"))
    blocks: list[Block] = []
    progress(f"traffic: {args.rate:g} req/s per consumer ({', '.join(labels(args))}, at the "
             f"same time), round-robin, no retries; app: {args.work_ms:g} ms per request; "
             f"{args.pods} pods; grace period {args.grace:g} s; >= {args.min_requests} "
             f"requests per row")
    try:
        for name in registries:
            registry = REGISTRIES[name]()
            began = time.monotonic()
            try:
                try:
                    registry.start(tmp / name)
                except Exception as exc:  # noqa: BLE001 - the other registries still run
                    progress(f"{name} did not start: {exc}")
                    blocks += [Block(name, strategy, app, error=f"{name} did not start")
                               for app in apps for strategy in strategies]
                    continue
                progress(f"{registry.describe()} (up in {time.monotonic() - began:.1f} s)")
                for app in apps:
                    for strategy in strategies:
                        block = run_block(registry, strategy, app, args,
                                          tmp / name / f"{app}-{strategy}")
                        blocks.append(block)
                        progress(f"  [{name} {strategy} {app}] done: {block.rounds} round(s), "
                                 f"{len(block.deletions)} pods deleted, {block.seconds:.0f} s")
            finally:
                registry.stop()
    finally:
        if args.keep:
            progress(f"work directory kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    all_rows = [r for b in blocks for r in rows(b, labels(args))]
    if args.json:
        print(json_lines(all_rows))
        progress(table(all_rows))
    else:
        print(table(all_rows))
    if args.plot:
        plot(blocks, labels(args), args.plot)
        progress(f"plot: {args.plot}")
    progress(f"total bench time {time.monotonic() - t0:.1f} s")
    return 1 if any(b.error for b in blocks) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # everything was stopped on the way out
        print("interrupted", file=sys.stderr)
        sys.exit(130)
