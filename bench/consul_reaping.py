#!/usr/bin/env python3
"""Consul reaping benchmark: how long a SIGKILLed pod stays in consumers' view.

A real cluster (3 servers + 1 client agent), a real `registrar agent`
process per run registered at the client agent with a 3 s TTL; once every
server lists it as passing, the process is SIGKILLed at a random moment of
its heartbeat cycle. Every server's own replica (`?passing&stale`) and the
client agent's check are then polled every ~20 ms. Prints p50/p90/max of
kill -> the agent marks the check critical, kill -> gone from ?passing on
the last server, and kill -> gone from the catalog entirely (reaped by
DeregisterCriticalServiceAfter, Consul's minimum 1m, checked by the agent's
reaper every 30 s).

The bound: a TTL check goes critical TTL after its last pass (Consul resets
a timer on every pass), and the last pass came at most one heartbeat
interval (ttl/3) before the kill, so kill -> critical lies in
[TTL - ttl/3, TTL]; the agent syncs a status change to the servers at once
(a few ms), and followers apply it within a raft round.

    .venv/bin/python bench/consul_reaping.py [--runs 20] [--ttl 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import requests
import yaml

from registrar_testing import wait_until
from registrar_testing.consul import ConsulCluster

POLL = 0.02
#: Reaping: DeregisterCriticalServiceAfter (1m minimum) + the reaper's 30 s
#: period + slack.
REAP_LIMIT = 60 + 30 + 15


class Views:
    """Keep-alive sessions to every server and the client agent."""

    def __init__(self, cluster: ConsulCluster):
        self.cluster = cluster
        addrs = [*cluster.server_addrs, cluster.client_addr]
        self.sessions = {a: requests.Session() for a in addrs}
        for session in self.sessions.values():
            if cluster.management_token:
                session.headers["X-Consul-Token"] = cluster.management_token

    def _get(self, addr: str, path: str, **params) -> list | dict:
        r = self.sessions[addr].get(addr + path, params=params, timeout=2)
        r.raise_for_status()
        return r.json()

    def passing(self, addr: str, service: str, pod: str) -> bool:
        entries = self._get(addr, f"/v1/health/service/{service}", passing="", stale="")
        return any(e["Service"]["ID"] == pod for e in entries)

    def in_catalog(self, addr: str, service: str, pod: str) -> bool:
        entries = self._get(addr, f"/v1/catalog/service/{service}", stale="")
        return any(e["ServiceID"] == pod for e in entries)

    def critical_at_agent(self, pod: str) -> bool:
        checks = self._get(self.cluster.client_addr, "/v1/agent/checks")
        check = checks.get(f"service:{pod}")
        return check is None or check["Status"] == "critical"


def spawn_agent(tmp: Path, cluster: ConsulCluster, service: str, pod: str,
                ttl: float) -> subprocess.Popen:
    section = {"type": "consul", "address": cluster.client_addr,
               "observers": cluster.server_addrs, "ttl": f"{ttl:g}s", "timeout": "1s"}
    if cluster.management_token:
        token_file = tmp / f"{pod}.token"
        token_file.write_text(cluster.create_token(
            f'service "{service}" {{ policy = "write" }}\nnode_prefix "" {{ policy = "read" }}'))
        section["token_file"] = str(token_file)
    path = tmp / f"{pod}.yaml"
    path.write_text(yaml.safe_dump({
        "service": {"name": service, "port": 8080},
        "backends": [section],
        "control": {"listen": None},
        "health": False,  # no app here: register at once
    }))
    env = {**os.environ, "POD_NAME": pod, "POD_IP": "10.20.30.40"}
    for var in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"):
        env.pop(var, None)
    return subprocess.Popen([sys.executable, "-m", "registrar", "agent", "--config", str(path)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Reaper(threading.Thread):
    """Polls the catalog (every server's replica) for killed pods until
    Consul has reaped each one; records kill -> gone from the last server."""

    def __init__(self, views: Views):
        super().__init__(daemon=True, name="reap-poll")
        self.views = views
        self.pending: dict[str, tuple[str, float]] = {}  # pod -> (service, killed at)
        self.reaped: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def add(self, service: str, pod: str, killed: float) -> None:
        with self.lock:
            self.pending[pod] = (service, killed)

    def run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                todo = list(self.pending.items())
            for pod, (service, killed) in todo:
                try:
                    listed = any(self.views.in_catalog(a, service, pod)
                                 for a in self.views.cluster.server_addrs)
                except requests.RequestException:
                    continue
                if not listed:
                    with self.lock:
                        self.reaped[pod] = time.monotonic() - killed
                        del self.pending[pod]
            self.stop.wait(0.1)

    def wait(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while self.pending and time.monotonic() < end:
            time.sleep(0.2)


def restart_follower(cluster: ConsulCluster) -> None:
    """SIGKILL a follower and start it again: when it rejoins, the client
    agent schedules a full anti-entropy sync after a random stagger of up to
    3 s, and serves no partial sync (a check's status change) meanwhile."""
    leader = cluster.servers[0].leader()  # "127.0.0.1:<its server (RPC) port>"

    def rpc_port(server) -> int:
        config = json.loads((server.process.workdir / "config.json").read_text())
        return config["ports"]["server"]

    follower = next(s for s in cluster.servers if not leader.endswith(f":{rpc_port(s)}"))
    follower.restart(timeout=None)


def one_run(tmp: Path, cluster: ConsulCluster, views: Views, ttl: float,
            rejoin: bool = False) -> dict:
    service, pod = f"reap-{uuid.uuid4().hex[:8]}", f"pod-{uuid.uuid4().hex[:8]}"
    proc = spawn_agent(tmp, cluster, service, pod, ttl)
    try:
        wait_until(lambda: all(views.passing(a, service, pod) for a in cluster.server_addrs),
                   15, f"{pod} is passing on every server", interval=POLL)
        # Kill at a random moment of the heartbeat cycle (interval ttl/3).
        time.sleep(random.uniform(0, ttl / 3) + ttl / 3)
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
    finally:
        proc.kill()
        proc.wait(timeout=5)
    if rejoin:
        restart_follower(cluster)
    gone: dict[str, float] = {}
    critical = None
    end = killed + ttl + 10
    while (critical is None or len(gone) < len(cluster.server_addrs)) and time.monotonic() < end:
        now = time.monotonic()
        if critical is None and views.critical_at_agent(pod):
            critical = now - killed
        for addr in cluster.server_addrs:
            try:
                if addr not in gone and not views.passing(addr, service, pod):
                    gone[addr] = time.monotonic() - killed
            except requests.RequestException:
                pass  # a restarting server (--rejoin): not gone until it says so
        time.sleep(POLL)
    if len(gone) < len(cluster.server_addrs):
        raise SystemExit(f"{pod}: still passing {ttl + 10:g}s after SIGKILL")
    return {"service": service, "pod": pod, "killed": killed, "critical_at_agent": critical,
            "gone_first_server": min(gone.values()), "gone_last_server": max(gone.values())}


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 3), "p90": round(p90, 3),
            "max": round(ordered[-1], 3), "min": round(ordered[0], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--ttl", type=float, default=3.0)
    parser.add_argument("--no-reap", action="store_true",
                        help="skip waiting for DeregisterCriticalServiceAfter (~1-1.5 min)")
    parser.add_argument("--acl", action="store_true",
                        help="ACLs on (default deny), the agent with a service token")
    parser.add_argument("--rejoin", action="store_true",
                        help="restart a follower server at each kill (a server (re)joining "
                             "delays the agent's syncs by up to 3 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    # SIGTERM (a CI timeout, say) unwinds like Ctrl-C: the finally blocks
    # stop what was started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="consul-reaping-") as tmp, \
            ConsulCluster(Path(tmp) / "cluster", servers=3, clients=1,
                          acl=args.acl) as cluster:
        views = Views(cluster)
        reaper = Reaper(views)
        if not args.no_reap:
            reaper.start()
        runs = []
        for i in range(args.runs):
            run = one_run(Path(tmp), cluster, views, args.ttl, args.rejoin)
            reaper.add(run["service"], run["pod"], run["killed"])
            runs.append(run)
            if not args.json:
                print(f"run {i + 1:2}: critical at the agent {run['critical_at_agent']:.3f}s, "
                      f"gone from ?passing on the last server {run['gone_last_server']:.3f}s",
                      file=sys.stderr)
        if not args.no_reap:
            reaper.wait(REAP_LIMIT)
            reaper.stop.set()
        for run in runs:
            run["reaped"] = reaper.reaped.get(run["pod"])
            del run["killed"]
    result = {"ttl": args.ttl, "acl": args.acl, "rejoin": args.rejoin,
              "heartbeat_interval": args.ttl / 3, "runs": len(runs),
              "critical_at_agent": summary([r["critical_at_agent"] for r in runs]),
              "gone_from_passing_last_server": summary([r["gone_last_server"] for r in runs])}
    reaped = [r["reaped"] for r in runs if r["reaped"] is not None]
    if reaped:
        result["gone_from_catalog"] = summary(reaped)
    if not args.no_reap and len(reaped) < len(runs):
        result["not_reaped"] = len(runs) - len(reaped)
    if args.json:
        print(json.dumps({**result, "per_run": runs}, indent=2))
        return 0
    print(f"Consul 1.8.7, 3 servers + 1 client agent{' with ACLs' if args.acl else ''}, "
          f"TTL {args.ttl:g}s, "
          f"heartbeat every {args.ttl / 3:g}s, {len(runs)} SIGKILLs:")
    for key, label in (("critical_at_agent", "kill -> check critical at the agent"),
                       ("gone_from_passing_last_server",
                        "kill -> gone from ?passing (last server)"),
                       ("gone_from_catalog", "kill -> gone from the catalog (reaped)")):
        if key in result:
            s = result[key]
            print(f"  {label:42} p50 {s['p50']:7.3f}s  p90 {s['p90']:7.3f}s  max {s['max']:7.3f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
