#!/usr/bin/env python3
"""Services benchmark: requests lost, and time per pod stop, while the pods
of a Kubernetes Service are restarted one by one, for real, on this
machine, behind a data path that behaves like kube-proxy's, with no
registry at all.

    .venv/bin/python bench/services.py [--lags 0.1-3[,6-8]] [--min-requests 50000]
        [--strategies nothing,sleep,registrar] [--apps dies,graceful]
        [--rate 300] [--work-ms 20] [--pods 3] [--grace 30] [--json FILE] [--keep]

Needs root and nft (nftables); everything runs on loopback (bench/svc/
holds the parts).

The data path: a virtual service address, 127.0.0.100:80, which nothing
listens on. The kernel load-balances each NEW connection to it over the
pods with nftables DNAT, exactly the shape kube-proxy's nftables mode
programs (bench/svc/datapath.py): a table of the bench's own
(``ip registrar-bench-<pid>``, deleted on exit), a nat chain hooked at
``output`` (locally generated traffic) at priority -100 (dstnat), the
ClusterIP map sending 127.0.0.100 . tcp . 80 to the service chain, whose
one rule is ``numgen random mod N vmap { 0 : goto endpoint-P0, ... }``,
and a chain per endpoint doing ``dnat to 127.0.0.1:<pod port>``. Changing
the endpoint set is one atomic ``nft -f -`` transaction (the service chain
flushed and its vmap rule added again). conntrack keeps every established
connection on the pod it was NATed to: removing an endpoint only stops NEW
connections from reaching the pod, as with kube-proxy. Why this and not the
consumers of bench/rolling_restart.py: a Kubernetes Service user has no
client-side load balancer watching a registry; what takes a pod out of
their traffic is kube-proxy's rules, late, and a kept-alive connection is
never moved at all. The bench checks at start that nft works, that a
connection to the VIP reaches a listener through the DNAT, and that an
established one survives its endpoint's removal; it stops with a one-line
error otherwise.

The endpoints controller (bench/svc/endpoints.py; EndpointSlice controller
and kube-proxy in one): a pod's endpoint goes in when the pod is ready (the
kubelet simulator has no readiness probes, so the bench polls what a
readinessProbe would: GET /health on the app's port answers 200 for
nothing and sleep; for registrar, GET /readyz on its control port answers
200). It goes out a *lag* after the pod's deletion began (the moment the
kubelet simulator starts the deletion and runs the preStop hook), while
the kubelet is already stopping the pod. The lag is drawn per deletion,
uniformly, from the spread of --lags (default 0.1-3 s; several spreads,
comma-separated, give rows of each: --lags 0.1-3,6-8). Why 0.1-3 s: the
deletion reaches kube-proxy through the endpoints / EndpointSlice
controller (it sees the pod's deletionTimestamp from its watch and writes
the slice, its queue rate-limited), the API server's watch fan-out to every
node, then kube-proxy's sync, which waits for its min-sync-period (1 s by
default in both nftables and iptables modes) after the previous sync and
then takes from milliseconds (nftables, a small cluster) to seconds
(iptables-restore of a big ruleset); ingress controllers that follow the
same slices add their own reload or resync. On a small idle cluster the
sum is a tenth of a second; with kube-proxy just past a sync and a busy
control plane it is a few seconds: 0.1-3 s spans the two, and uniform
because no one distribution holds across clusters (what matters is that
the lag varies per deletion, so no fixed wait fits both ends). 6-8 s is a
large or busy cluster, or a slow ingress: longer than the 5 s of the
usual preStop ``sleep 5``. The lag really applied (the deletion until the
nft transaction that removed the endpoint returned) is recorded per pod.

Pods: --pods, each one container played by the kubelet simulator
(registrar_testing.kubelet: preStop hook, SIGTERM, SIGKILL at the grace
period --grace), bench/apps/webapp.py as the app (--work-ms per request)
on a port of its own (never a port an earlier pod of the block had: a
dead pod's endpoint may still be in the Service). Apps (--apps, both by
default): ``dies`` exits at once on SIGTERM (requests in flight are cut);
``graceful`` stops accepting, closes idle connections, finishes the
requests in flight (answering with Connection: close), exits.

Strategies (--strategies, all three by default):
  nothing    no preStop hook: SIGTERM at once;
  sleep      preStop exec ``sleep 5``;
  registrar  ``registrar run -c cfg.yaml -- <app>`` as the container's
             command, with a config of service (name web, the app's port),
             control (a port of its own, no token) and stop.grace_period
             only, and no ``backends`` at all; preStop httpGet /prestop on
             the control port.

Consumers (bench/apps/vip_consumer.py, nothing of registrar's), both at the
same time, each at --rate req/s against the VIP, never retrying, each
bound to a source address of its own so the pods see two peers (two client
pods with their own IPs):
  per-request  from 127.0.0.2: a new TCP connection per request
               (Connection: close);
  keepalive    from 127.0.0.3: a pool of persistent HTTP/1.1 connections to
               the VIP (each stays on the pod it was NATed to); a pooled
               socket the peer closed is dropped before reuse, as urllib3
               does.
A request is lost when it fails: refused (nothing listens on the pod's
port, or no endpoint), reset (RST, EOF or a truncated answer), timeout (5 s,
connect or response), http_status (an answer that is not 2xx), other.

A block is one (lag spread, app, strategy): start the pods and put their
endpoints in, start the consumers and the traffic; 1 s later, rolling
restarts: wait until every earlier deletion's endpoint is out (deletions
never overlap, so each pod's figures are its own), pause 0-1 s at random,
delete the next pod (its endpoint goes out after its lag; preStop,
SIGTERM, SIGKILL at the grace period), once its container exited start its
replacement and wait until the replacement's endpoint is in; next pod;
until each consumer has sent >= --min-requests; 1 s more traffic; stop.
Between blocks every pod is SIGKILLed and the Service emptied.

Output: a markdown table on stdout, a row per block and consumer: lost /
sent, lost by kind, stops (pods deleted), pod stop time p50 / p90 (the
deletion until the container exited), lag p50 (applied), stop - lag p50
and stop / lag p50 (medians of the per-pod difference and ratio: how long
a pod lived past the moment the Service stopped sending it new
connections; the target is registrar's stop within 0.5 s of the lag its
pod really had), and for registrar, quiet - lag p50: registrar's own
"consumers: quiet X s after the stop began" (its log line at the stop)
less the lag, the part of its stop that waited for the consumers (the rest
is its wait for busy connections and the app's exit). --json FILE writes
one JSON line per row with the same figures, lost_per_stop, the keepalive
consumer's connections opened and found closed, ``code``, and
``per_pod``: per deleted pod, [stop_s, lag_s applied, lag drawn, requests
this consumer lost from that deletion until the next, registrar's quiet_s
or null].
Progress goes to stderr: a line per deleted pod (and for registrar, its own
log lines about the consumers at the stop).
Every process the bench starts is stopped on exit, Ctrl-C or SIGTERM, and
its nftables table deleted.

Time: a block lasts about --min-requests / --rate seconds plus its last
pod stop; the default run (6 blocks, one lag spread) took 17 minutes on
this 2-core machine (2026-12-06), each added spread as much again. Each
row's ``code`` (JSON) is ``git describe --always --dirty`` of the tree when
its block began: registrar runs from this checkout.
"""
from __future__ import annotations

import argparse
import datetime
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rr.cli import add_load_arguments, progress, split
from svc.block import run_block
from svc.consumers import CLIENTS
from svc.datapath import DataPathError, ServiceVIP, stale_entries
from svc.endpoints import Endpoints
from svc.pods import PY, STRATEGIES, registrar_config
from svc.report import Block, json_lines, rows, table


def spreads(text: str) -> list[tuple[str, tuple[float, float]]]:
    """"0.1-3,6-8" -> [("0.1-3", (0.1, 3.0)), ("6-8", (6.0, 8.0))]."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        try:
            lo, hi = (float(v) for v in part.split("-"))
        except ValueError:
            raise SystemExit(f"a lag spread is LOW-HIGH in seconds (0.1-3), not {part!r}") \
                from None
        if not 0 <= lo <= hi:
            raise SystemExit(f"a lag spread needs 0 <= LOW <= HIGH, not {part!r}")
        out.append((part, (lo, hi)))
    return out


def registrar_refusal(workdir: Path, grace: float) -> str | None:
    """Why ``registrar check`` refuses a config without backends, or None."""
    cfg = workdir / "check.yaml"
    cfg.write_text(yaml.safe_dump(registrar_config(18080, "127.0.0.1:18081", grace)))
    done = subprocess.run([PY, "-m", "registrar", "check", "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60, check=False)
    if done.returncode == 0:
        return None
    err = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    return f"exit {done.returncode}: {err[-1][:300] if err else ''}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lags", "--lag", dest="lags", default="0.1-3",
                        help="the endpoint removal's lag after a deletion, LOW-HIGH seconds "
                             "(uniform); several spreads comma-separated, rows for each")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help="comma-separated, of: " + ", ".join(STRATEGIES))
    parser.add_argument("--consumers", default=",".join(CLIENTS),
                        help="comma-separated, of: " + ", ".join(CLIENTS))
    parser.add_argument("--apps", default="dies,graceful",
                        help="comma-separated, of: dies, graceful")
    add_load_arguments(parser, "deletions")
    parser.add_argument("--json", metavar="FILE", help="also write one JSON line per row")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.pods < 1 or args.rate <= 0 or args.min_requests < 1:
        parser.error("--pods, --rate and --min-requests must be positive")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    lag_spreads = spreads(args.lags)
    strategies = split(args.strategies, list(STRATEGIES), "strategy")
    args.consumers = split(args.consumers, list(CLIENTS), "consumer")
    apps = split(args.apps, ["dies", "graceful"], "app")

    t0 = time.monotonic()
    vip = ServiceVIP()
    try:
        vip.create()
        vip.check()
    except DataPathError as exc:
        vip.delete()
        print(f"services.py: the Service data path does not work here: {exc}", file=sys.stderr)
        return 2
    stale = stale_entries()
    if stale:
        progress(f"warning: {stale} conntrack entries to {vip.address} left open by an earlier "
                 "run: each can cost one refused request (a reused source port)")
    endpoints = Endpoints(vip)
    tmp = Path(tempfile.mkdtemp(prefix="bench-services-"))
    blocks: list[Block] = []
    progress(f"Service {vip.address}: nftables table ip {vip.table} (DNAT at output, "
             f"numgen random vmap per endpoint; conntrack checked); traffic: {args.rate:g} "
             f"req/s per consumer ({', '.join(args.consumers)}, at the same time), no retries; "
             f"app: {args.work_ms:g} ms per request; {args.pods} pods; grace period "
             f"{args.grace:g} s; >= {args.min_requests} requests per row")
    try:
        refused = registrar_refusal(tmp, args.grace) if "registrar" in strategies else None
        if refused:
            progress(f"registrar refuses a config without backends ({refused}): its rows "
                     "are left out")
        for label, spread in lag_spreads:
            for app in apps:
                for strategy in strategies:
                    if strategy == "registrar" and refused:
                        blocks.append(Block(label, app, strategy,
                                            error=f"registrar check refused the config: "
                                                  f"{refused}"))
                        continue
                    block = run_block(spread, label, app, strategy, args, vip, endpoints,
                                      tmp / f"{label}-{app}-{strategy}")
                    blocks.append(block)
                    progress(f"  [lag {label} {app} {strategy}] done: {len(block.stops)} "
                             f"pods deleted, {block.seconds:.0f} s")
    finally:
        endpoints.close()
        vip.delete()
        if args.keep:
            progress(f"work directory kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    all_rows = [r for b in blocks for r in rows(b, args.consumers)]
    print(table(all_rows), flush=True)
    if args.json:
        run = {"date": datetime.date.today().isoformat(), "rate": args.rate,
               "min_requests": args.min_requests, "pods": args.pods, "grace": args.grace,
               "work_ms": args.work_ms}
        Path(args.json).write_text(json_lines(all_rows, run) + "\n")
        progress(f"JSON lines: {args.json}")
    progress(f"total bench time {time.monotonic() - t0:.1f} s")
    return 1 if any(b.error for b in blocks) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # everything was stopped on the way out
        print("interrupted", file=sys.stderr)
        sys.exit(130)
