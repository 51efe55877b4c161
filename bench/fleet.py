#!/usr/bin/env python3
"""Fleet benchmark: N pods (real `registrar agent` processes, each its own instance) on one
three-node registry; what the fleet costs the registry's servers, and what each agent costs.

    .venv/bin/python bench/fleet.py [--registry etcd|zookeeper|consul|all] [--pods 200]
        [--steady 120] [--phases steady,fault,rolling] [--fault blackhole|freeze|both]
        [--all-in-one] [--consul-clients 1] [--batch 20] [--source DIR] [--json]

Root is needed for the blackhole fault (nftables). What runs, all on 127.0.0.1:
  * the registry (--registry; `all` runs them one after the other), started with the testing
    kit's launchers: 3 etcd members; 3 ZooKeeper servers (maxClientCnxns=0: every pod
    connects from 127.0.0.1, ZooKeeper's default allows 60 connections per client IP);
    Consul with 3 servers and --consul-clients client agents (pods register at them, round
    robin; the backend's observers are the 3 servers);
  * the apps: one process (bench/fleet_parts/ports.py) holding one listening socket per pod,
    so the agents' default health gate (a TCP connect to service.port) passes;
  * the pods, started --batch at a time, each ready (/readyz 200) before the next batch:
    `registrar agent` with the kit's Agent helper: service "fleet", its own POD_NAME, port
    and control port, every backend setting left at its default (TTL 10 s, heartbeat every
    3.3 s, request timeout 2 s), grace period 30 s;
  * one watcher per member, as consumers watch (registrar_testing.watchers: etcd watch,
    ZooKeeper ChildrenWatch, Consul blocking ?passing&stale queries), timing each removal.

Phases, in this order (--phases picks some):
  start      the fleet starting, batch by batch;
  steady     --steady seconds with nothing happening: heartbeats and health probes;
  fault      per fault mode (--fault, default both): with one follower cut off or frozen,
             10 % of the pods stop at once; then the fault is lifted and the cluster settles.
             blackhole: nftables drops the agents' packets (their group id only) to that
             member's client port (Consul: a server's HTTP port, where observers read); the
             bench's watchers and the other members still reach it. freeze: SIGSTOP the
             member (its watcher is frozen too and left out of the propagation figure).
             The phase ends once the cluster is healthy again and every view dropped the
             stopped pods: what reaches the member late is counted in it;
  rolling    every remaining pod stops, 25 % of --pods at a time (maxUnavailable 25 %), the
             next batch once the last has exited.
The fault phases run before the rolling stop so that the rolling stop stops every pod left.

A pod stops as the kubelet stops a pod whose app's preStop hook is `registrar prestop`: POST
/prestop to the agent (it answers with its stop report once the removal has propagated),
then the app stops listening and the agent gets SIGTERM.

Figures, per registry and phase:
  per server   requests/s and CPU % (of one core; utime+stime from /proc/<pid>/stat); the
               established connections to its client port (/proc/net/tcp, at the phase's end,
               the bench's own watcher and scrapes included; fault phases: while the fault
               lasts); sessions (ZooKeeper
               global_sessions on the leader) or leases (etcd) at the phase's end; in stop
               phases, requests per stopping pod: the phase's requests less what the pods
               still running sent at the steady phase's rate per pod, per pod stopped
               (this includes ~1 request per member and removal from the bench's watchers
               on ZooKeeper and Consul); none for the faulted server (its sessions moved
               or stalled: only its raw rate says something), and the stop table's req/pod
               sums the others.
               Request counters: see bench/fleet_parts/registries.py.
  propagation  from each stop's trigger (POST /prestop) to the last member's watcher no
               longer listing the pod: p50/p99/max; and the agents' own reports (the stop's
               seconds, deregister -> last observer), with how many were confirmed; and the
               CPU an agent spent on its stop (trigger to /prestop's answer), the mean: what
               bounds propagation when many stop at once on few cores;
  agents       at the steady phase's end, per agent: RSS (VmRSS) and PSS (smaps_rollup: pages
               shared between agents divided among them) p50/max in MB, and CPU % of a core
               over the steady phase, p50/max.
A table on stdout; with --json one JSON document on stdout instead (the table on stderr).
--source DIR runs the agents from another checkout (e.g. `git worktree add /tmp/before
HEAD`): DIR, DIR/backends/* and DIR/testing go first on the agents' PYTHONPATH.
Every process the bench starts is stopped on exit, Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from fleet_parts.pods import Apps, Pod, source_env, start_pods, stop_pods
from fleet_parts.registries import (
    CLK_TCK,
    SERVICE,
    STARTERS,
    Cluster,
    cpu_ticks,
    established,
)
from registrar_testing import wait_until
from registrar_testing.agents import AGENT_GID
from registrar_testing.faults import Blackhole
from registrar_testing.watchers import watcher

PHASES = ("steady", "fault", "rolling")


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Watch:
    """One watcher per member of every cluster, and when each address left each view."""

    def __init__(self, clusters: list[Cluster]):
        self.gone: dict[tuple[int, str], float] = {}
        self.errors: list[str] = []
        self.watchers = []
        self.labels = []
        for cluster in clusters:
            for i, target in enumerate(cluster.watch_targets):
                index = len(self.watchers)

                def listener(kind: str, addr: str, index=index) -> None:
                    if kind == "del":
                        self.gone[(index, addr)] = time.monotonic()

                self.watchers.append(watcher(cluster.name, target, SERVICE, listener,
                                             self.errors.append).start())
                self.labels.append((cluster.name, i))

    def lists(self, addr: str, indexes) -> bool:
        return any(addr in self.watchers[i].addresses() for i in indexes)

    def all_list(self, addrs: list[str]) -> bool:
        return all(set(addrs) <= set(w.addresses()) for w in self.watchers)

    def propagation(self, pod: Pod, indexes: list[int]) -> float | None:
        """Trigger -> the last of these views without the pod (None: one still lists it)."""
        if self.lists(pod.addr, indexes):
            return None
        times = [self.gone[(i, pod.addr)] for i in indexes if (i, pod.addr) in self.gone]
        return max(times) - pod.trigger if times else None

    def stop(self) -> None:
        for w in self.watchers:
            w.stop()


@dataclass
class Phase:
    name: str
    began: float = 0.0
    ended: float = 0.0
    start: dict = field(default_factory=dict)
    end: dict = field(default_factory=dict)
    conns: dict = field(default_factory=dict)
    stopped: list[Pod] = field(default_factory=list)
    pod_seconds: float = 0.0  # pods running, summed over the phase
    watchers: list[int] = field(default_factory=list)  # the views propagation counts
    faulted: tuple[str, str] | None = None  # (registry, server) cut off or frozen
    load: tuple = ()
    note: str = ""

    @property
    def seconds(self) -> float:
        return self.ended - self.began


def snapshot(clusters: list[Cluster]) -> dict:
    return {(c.name, s.name): s.snapshot() for c in clusters for s in c.servers}


def connections(clusters: list[Cluster]) -> dict:
    counts = established({s.port for c in clusters for s in c.servers})
    return {(c.name, s.name): counts[s.port] for c in clusters for s in c.servers}


def begin(phase: Phase, clusters: list[Cluster]) -> Phase:
    phase.start = snapshot(clusters)
    phase.began = time.monotonic()
    return phase


def end(phase: Phase, clusters: list[Cluster], pods: list[Pod]) -> Phase:
    phase.ended = time.monotonic()
    phase.end = snapshot(clusters)
    if not phase.conns:
        phase.conns = connections(clusters)
    # A pod heartbeats until its stop begins: the baseline of a stop phase counts it so far.
    phase.pod_seconds = sum(
        max(0.0, min(p.trigger or phase.ended, phase.ended) - phase.began)
        for p in pods if p.trigger is None or p.trigger > phase.began)
    phase.load = os.getloadavg()
    return phase


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def server_rows(phase: Phase, clusters: list[Cluster], steady: Phase | None) -> list[dict]:
    rows = []
    for c in clusters:
        for s in c.servers:
            key = (c.name, s.name)
            a, b = phase.start[key], phase.end[key]
            req = (b["requests"] - a["requests"]
                   if None not in (a["requests"], b["requests"]) else None)
            if b["reads"] == a["reads"]:
                req = None  # no read of the counter succeeded in this phase: unknown, not 0
            if b["failed"] > a["failed"]:
                print(f"  {c.name} {s.name}: {b['failed'] - a['failed']} request-counter reads "
                      f"failed in {phase.name} (last: {b['last_error']})", file=sys.stderr)
            cpu = (b["cpu_ticks"] - a["cpu_ticks"]
                   if None not in (a["cpu_ticks"], b["cpu_ticks"]) else None)
            row = {"registry": c.name, "phase": phase.name, "server": s.name, "role": s.role,
                   "seconds": round(phase.seconds, 2),
                   "requests_per_s": None if req is None else round(req / phase.seconds, 1),
                   "cpu_pct": None if cpu is None else round(
                       100 * cpu / CLK_TCK / phase.seconds, 1),
                   "connections": phase.conns[key], c.sessions_label: b["sessions"]}
            # The faulted server's load is not the pods' baseline minus the stops: cut off
            # from the agents or frozen, it loses what its sessions sent; shown raw only.
            if (phase.stopped and steady is not None and req is not None
                    and key != phase.faulted):
                sa, sb = steady.start[key], steady.end[key]
                if None not in (sa["requests"], sb["requests"]) and steady.pod_seconds:
                    per_pod_s = (sb["requests"] - sa["requests"]) / steady.pod_seconds
                    extra = req - per_pod_s * phase.pod_seconds
                    row["requests_per_stopping_pod"] = round(extra / len(phase.stopped), 1)
            rows.append(row)
    return rows


def ms(value: float | None) -> float | None:
    return None if value is None else round(1000 * value, 1)


def stop_row(phase: Phase, watch: Watch, servers: list[dict]) -> dict:
    """``requests_per_stopping_pod``: summed over the servers of the phase but the faulted
    one (a fault moves the pods' sessions from one member to the others: one member's
    figure alone says little)."""
    pods = phase.stopped
    mine = [s["requests_per_stopping_pod"] for s in servers
            if s["phase"] == phase.name and "requests_per_stopping_pod" in s]
    per_pod = round(sum(mine), 1) if mine else None
    external = [watch.propagation(p, phase.watchers) for p in pods]
    seen = [v for v in external if v is not None]
    reports = [p.report for p in pods if p.report]
    stop_s = [r["seconds"] for r in reports]
    reported = [b["propagation_seconds"] for r in reports for b in r["backends"]
                if b.get("propagation_seconds") is not None]
    return {"phase": phase.name, "stopped": len(pods), "seconds": round(phase.seconds, 2),
            "requests_per_stopping_pod": per_pod,
            "propagation_ms": {"p50": ms(pct(seen, .5)), "p99": ms(pct(seen, .99)),
                               "max": ms(max(seen, default=None))},
            "still_listed": len(external) - len(seen),
            "agent_stop_ms": {"p50": ms(pct(stop_s, .5)), "max": ms(max(stop_s, default=None))},
            "agent_propagation_ms": {"p50": ms(pct(reported, .5)),
                                     "p99": ms(pct(reported, .99)),
                                     "max": ms(max(reported, default=None))},
            "agent_cpu_ms_per_stop": ms(statistics.mean(cpu)) if (cpu := [
                p.stop_cpu_s for p in pods if p.stop_cpu_s is not None]) else None,
            "confirmed": sum(1 for r in reports if r.get("ok")),
            "errors": [f"{p.name}: {p.error}" for p in pods if p.error][:5],
            "views": len(phase.watchers), "load": [round(x, 2) for x in phase.load],
            "note": phase.note}


def agent_row(pods: list[Pod], cpu0: dict, steady: Phase) -> dict:
    mem = [p.memory() for p in pods]
    cpu = [100 * (p.cpu() - cpu0[p.name]) / CLK_TCK / steady.seconds for p in pods]

    def mb(key: str) -> dict:
        vals = [m[key] / 1024 for m in mem if key in m]
        return {"p50": round(statistics.median(vals), 1), "max": round(max(vals), 1)}

    return {"agents": len(pods), "rss_mb": mb("VmRSS"), "pss_mb": mb("Pss"),
            "anon_mb": mb("RssAnon"), "file_mb": mb("RssFile"),
            "cpu_pct": {"p50": round(statistics.median(cpu), 3), "max": round(max(cpu), 3)},
            "steady_s": round(steady.seconds, 1)}


def run(names: list[str], args, workdir: Path) -> dict:
    """One run: these registries' clusters, one fleet whose agents each register in all of
    them (one name: the usual case)."""
    env = source_env(args.source)
    result: dict = {"registries": names, "pods": args.pods, "servers": [], "stops": [],
                    "agents": None, "notes": []}
    with ExitStack() as stack:
        clusters: list[Cluster] = []
        for name in names:
            progress(f"{name}: starting the cluster")
            cluster = STARTERS[name](workdir / name, args.consul_clients)
            stack.callback(cluster.stop)
            for server in cluster.servers:
                server.follow()
                stack.callback(server.close)
            clusters.append(cluster)
            result["notes"] += [f"{name}: {n}" for n in cluster.notes]
        apps = Apps(args.pods)
        stack.callback(apps.stop)
        watch = Watch(clusters)
        stack.callback(watch.stop)
        pods: list[Pod] = []

        def kill_pods() -> None:
            for p in pods:
                p.agent.kill()
        stack.callback(kill_pods)
        everyone = list(range(len(watch.watchers)))

        def sections(i: int) -> list[dict]:
            return [c.sections(i) for c in clusters]

        phases: list[Phase] = []
        start = begin(Phase("start"), clusters)
        progress(f"{'+'.join(names)}: starting {args.pods} agents, {args.batch} at a time")
        start_pods(0, args.pods, apps, workdir / "pods", sections, env, args.batch, progress,
                   pods)
        listed_in = 120 + args.pods
        try:
            wait_until(lambda: watch.all_list([p.addr for p in pods]), listed_in,
                       "every member lists every pod", interval=0.5)
        except TimeoutError:
            counts = [len(set(w.addresses()) & {p.addr for p in pods}) for w in watch.watchers]
            raise TimeoutError(f"after {listed_in}s the members list {counts} of "
                               f"{len(pods)} pods") from None
        progress(f"  every member lists every pod after {time.monotonic() - start.began:.1f}s")
        phases.append(end(start, clusters, pods))

        steady = None
        if "steady" in args.phases:
            cpu0 = {p.name: p.cpu() for p in pods}
            steady = begin(Phase("steady"), clusters)
            progress(f"steady for {args.steady:g}s")
            threading.Event().wait(args.steady)
            phases.append(end(steady, clusters, pods))
            result["agents"] = agent_row(pods, cpu0, steady)

        running = list(pods)
        if "fault" in args.phases:
            tenth = max(1, round(args.pods / 10))
            for mode in args.fault:
                cluster = clusters[0]
                server = cluster.servers[cluster.faulted]
                group, running = running[:tenth], running[tenth:]
                phase = begin(Phase(f"fault:{mode}"), clusters)
                phase.stopped = group
                phase.watchers = [i for i in everyone
                                  if mode != "freeze" or watch.labels[i] != (cluster.name,
                                                                             cluster.faulted)]
                phase.note = f"{mode} {server.name} ({server.role})"
                phase.faulted = (cluster.name, server.name)
                progress(f"{cluster.name}: {phase.note}; stopping {len(group)} pods")
                if mode == "blackhole":
                    hole = Blackhole(cluster.fault_port, gid=AGENT_GID)
                    hole.add()
                else:
                    server.freeze()
                try:
                    threading.Event().wait(1.0)  # the agents meet the fault before the stops
                    stop_pods(group, apps)
                    phase.conns = connections(clusters)  # held while the fault lasts
                finally:
                    if mode == "blackhole":
                        hole.remove()
                    else:
                        server.thaw()
                # The phase ends once the cluster is whole again: what a frozen member had
                # queued (or a cut-off one gets late) is counted in it.
                wait_until(cluster.healthy, 60, f"{cluster.name} is healthy again",
                           interval=0.2, ignore=Exception)
                wait_until(lambda g=group: not any(watch.lists(p.addr, everyone) for p in g),
                           30, "no member lists a stopped pod", interval=0.1)
                phases.append(end(phase, clusters, pods))

        if "rolling" in args.phases:
            quarter = max(1, math.ceil(args.pods / 4))
            phase = begin(Phase("rolling"), clusters)
            phase.watchers = everyone
            phase.note = f"{len(running)} pods, {quarter} at a time"
            progress(f"rolling stop: {phase.note}")
            for at in range(0, len(running), quarter):
                group = running[at:at + quarter]
                stop_pods(group, apps)
                phase.stopped += group
            wait_until(lambda: not any(watch.lists(p.addr, everyone) for p in phase.stopped),
                       30, "no member lists a stopped pod", interval=0.1)
            phases.append(end(phase, clusters, pods))

        for phase in phases:
            result["servers"] += server_rows(phase, clusters, steady)
            if phase.stopped:
                result["stops"].append(stop_row(phase, watch, result["servers"]))
        result["watch_errors"] = watch.errors[:5]
    return result


def fmt(value, width: int, digits: int = 1) -> str:
    if value is None:
        return "-".rjust(width)
    if isinstance(value, float):
        return f"{value:{width}.{digits}f}"
    return str(value).rjust(width)


def table(results: list[dict]) -> str:
    out = []
    for r in results:
        name = "+".join(r["registries"])
        if "error" in r:
            out += [f"== {name}: FAILED: {r['error']}", ""]
            continue
        out.append(f"== {name}: {r['pods']} pods ({r['source']})")
        out += [f"   {n}" for n in r["notes"]]
        out.append(f"{'phase':<16}{'server':<18}{'role':<9}{'s':>6}{'req/s':>9}{'CPU%':>7}"
                   f"{'conns':>7}{'sess':>6}{'req/stop pod':>13}")
        for s in r["servers"]:
            sess = s.get("sessions", s.get("leases"))
            out.append(f"{s['phase']:<16}{s['server']:<18}{s['role']:<9}{fmt(s['seconds'], 6)}"
                       f"{fmt(s['requests_per_s'], 9)}{fmt(s['cpu_pct'], 7)}"
                       f"{fmt(s['connections'], 7)}{fmt(sess, 6)}"
                       f"{fmt(s.get('requests_per_stopping_pod'), 13)}")
        if r["stops"]:
            out.append(f"{'phase':<16}{'pods':>5}{'s':>7}{'req/pod':>8}  "
                       f"{'propagation ms p50/p99/max':<28}"
                       f"{'agent stop ms p50/max':<23}{'agent prop ms p50/p99/max':<27}ok")
            for s in r["stops"]:
                p, a, q = s["propagation_ms"], s["agent_stop_ms"], s["agent_propagation_ms"]
                listed = f" ({s['still_listed']} still listed)" if s["still_listed"] else ""
                out.append(f"{s['phase']:<16}{s['stopped']:>5}{fmt(s['seconds'], 7)}"
                           f"{fmt(s['requests_per_stopping_pod'], 8)}  "
                           f"{'/'.join(fmt(p[k], 1) for k in ('p50', 'p99', 'max')):<28}"
                           f"{'/'.join(fmt(a[k], 1) for k in ('p50', 'max')):<23}"
                           f"{'/'.join(fmt(q[k], 1) for k in ('p50', 'p99', 'max')):<27}"
                           f"{s['confirmed']}/{s['stopped']}{listed}  [{s['note']}; load "
                           f"{s['load'][0]}; agent CPU {fmt(s['agent_cpu_ms_per_stop'], 1)} "
                           "ms per stop]")
                for e in s["errors"]:
                    out.append(f"    {e}")
        if r["agents"]:
            a = r["agents"]
            out.append(f"agents ({a['agents']}, steady {a['steady_s']}s): "
                       f"RSS p50 {a['rss_mb']['p50']} max {a['rss_mb']['max']} MB; "
                       f"PSS p50 {a['pss_mb']['p50']} max {a['pss_mb']['max']} MB "
                       f"(anon p50 {a['anon_mb']['p50']}, file p50 {a['file_mb']['p50']}); "
                       f"CPU p50 {a['cpu_pct']['p50']} max {a['cpu_pct']['max']} % of a core")
        out.append(f"bench: its own CPU {r['bench_cpu_s']} s; load at the end {r['load']}")
        out.append("")
    return "\n".join(out)


def compile_sources(source: Path | None) -> None:
    """Byte-compile the agents' code first, as an install does: under
    PYTHONDONTWRITEBYTECODE (or a read-only checkout) every agent would
    otherwise compile what changed since the last .pyc, and count that in its
    RSS (about 1.5 MB more for a changed config module)."""
    import compileall

    root = source or Path(__file__).resolve().parent.parent
    for sub in ("registrar", "backends", "testing"):
        compileall.compile_dir(str(root / sub), quiet=2, force=False)


def describe_source(source: Path | None) -> str:
    where = source or Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10,
                              check=False).stdout.strip()
    except OSError:
        head = "?"
    return f"agents from {where} at {head or '?'}" + ("" if source else " (work tree)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", choices=[*STARTERS, "all"], default="all")
    parser.add_argument("--pods", type=int, default=200)
    parser.add_argument("--steady", type=float, default=120.0, help="seconds (default 120)")
    parser.add_argument("--phases", default="steady,fault,rolling",
                        help="comma-separated, of steady,fault,rolling (start always runs)")
    parser.add_argument("--fault", choices=["blackhole", "freeze", "both"], default="both")
    parser.add_argument("--all-in-one", action="store_true",
                        help="one fleet whose agents register in the registries of --registry "
                             "at once (a cluster of each); faults are not run")
    parser.add_argument("--consul-clients", type=int, default=1)
    parser.add_argument("--batch", type=int, default=20, help="agents started at a time")
    parser.add_argument("--source", type=Path, help="run the agents from this checkout")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.phases = [p for p in args.phases.split(",") if p]
    if unknown := set(args.phases) - set(PHASES):
        parser.error(f"--phases: unknown {', '.join(sorted(unknown))}")
    args.fault = ["blackhole", "freeze"] if args.fault == "both" else [args.fault]
    if args.all_in_one and "fault" in args.phases:
        args.phases.remove("fault")
    if "fault" in args.phases and "blackhole" in args.fault and not Blackhole.available():
        parser.error("the blackhole fault needs nftables as root (or --fault freeze)")
    if args.source is not None:
        args.source = args.source.resolve()
        if not (args.source / "registrar" / "__init__.py").is_file():
            parser.error(f"--source {args.source}: no registrar/ there")
    names = list(STARTERS) if args.registry == "all" else [args.registry]
    compile_sources(args.source)
    # SIGTERM unwinds like Ctrl-C: the finally blocks stop every process started here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs = [names] if args.all_in_one else [[n] for n in names]
    results = []
    source = describe_source(args.source)
    for group in runs:
        cpu0 = cpu_ticks(os.getpid())
        try:
            with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
                result = run(group, args, Path(tmp))
        except Exception as exc:  # noqa: BLE001 - the other registries still run
            progress(f"{'+'.join(group)}: FAILED: {exc}")
            results.append({"registries": group, "error": str(exc)})
            continue
        result["source"] = source
        result["bench_cpu_s"] = round((cpu_ticks(os.getpid()) - cpu0) / CLK_TCK, 1)
        result["load"] = [round(x, 2) for x in os.getloadavg()]
        results.append(result)
        progress(table([result]))
    text = table(results)
    if args.json:
        print(json.dumps({"runs": results}, default=str))
        progress(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
