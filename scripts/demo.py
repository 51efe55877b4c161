#!/usr/bin/env python3
"""The demo behind `./dev demo`: a short rolling restart under load, the
naive way beside registrar, on a real registry on 127.0.0.1.

    .venv/bin/python scripts/demo.py [--registry etcd|zookeeper|consul] [--plot FILE.png]
        [--rate 100] [--cache SECONDS] [--strategies naive,registrar] [--keep]

It is bench/rolling_restart.py's machinery (bench/rr/) at a small scale:
the registry's three-member cluster from the testing kit (etcd by default,
no config to write), three pods of an app that dies at once on SIGTERM,
each played by the kubelet simulator, and one consumer that watches one
member of the registry and sends --rate requests per second round-robin,
never retrying. With --cache SECONDS the consumer is the bench's cached
one instead: it picks from a copy of what the watch lists, refreshed every
SECONDS (as Spring Cloud LoadBalancer's cache, Ribbon or a DNS cache do),
so it learns of a removal up to SECONDS late. Each strategy (--strategies,
any of the bench's, default naive,registrar) gets one round: every pod
deleted in turn (preStop, SIGTERM) and replaced, then the traffic goes on
until the consumer no longer lists a deleted pod.

  naive          a wrapper registers the app; on SIGTERM it stops the app and
                 deregisters nothing: only the registry's 10 s TTL removes it;
  sigterm-dereg  the same wrapper deregisters on SIGTERM, then stops the app;
  sleep          the same wrapper as naive, a preStop exec that deregisters
                 with the registry's own tool, then `sleep 5`;
  registrar      `registrar run` with a preStop httpGet to /prestop.

It prints a live progress line (updated in place on a terminal, a plain
line every few seconds otherwise), then a table per strategy and per pod
(requests, lost, stop time: from the deletion until the pod's last process
exited), and writes the timeline plot that the bench draws with --plot.
Exit status 1 when registrar lost a request or a strategy could not run.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_PARTS = ROOT / "bench" / "rr"
STRATEGIES = ("naive", "registrar")  # the default of --strategies
EXPIRY = {"etcd": "its 10 s lease expired", "zookeeper": "its 10 s session expired",
          "consul": "its 10 s TTL check failed"}


def load_bench_parts():
    """bench/rr is no installed package: the bench runs as a script and finds
    it beside itself. Load it from the tree under its own name, so that its
    modules import each other as they do there."""
    spec = importlib.util.spec_from_file_location(
        "rr", BENCH_PARTS / "__init__.py", submodule_search_locations=[str(BENCH_PARTS)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["rr"] = module
    spec.loader.exec_module(module)
    return (importlib.import_module("rr.block"), importlib.import_module("rr.registries"),
            importlib.import_module("rr.report"), importlib.import_module("rr.pods"),
            importlib.import_module("rr.consumers"))


class Live:
    """The progress line of the block that runs: what the consumer sent and
    lost so far, and every pod that is not simply serving."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.every = 0.25 if tty else 3.0
        self.lock = threading.Lock()
        self.shown = False  # a line without its newline is on screen
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self, strategy: str) -> None:
        self.strategy, self.began = strategy, time.monotonic()
        self.consumers: list = []
        self.pods: list = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._tick, daemon=True, name="live")
        self._thread.start()

    def watch(self, consumers: list, pods: list) -> None:
        self.consumers, self.pods = consumers, pods

    def end(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def say(self, text: str) -> None:
        """A whole line, above the live one."""
        with self.lock:
            if self.shown:
                sys.stdout.write("\r\x1b[K")
                self.shown = False
            print(text, flush=True)

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            text = self.render()
            with self.lock:
                if self.tty:
                    width = shutil.get_terminal_size().columns - 1
                    sys.stdout.write("\r" + text[:width] + "\x1b[K")
                    sys.stdout.flush()
                    self.shown = True
                else:
                    print(text, flush=True)

    def render(self) -> str:
        head = f"  {self.strategy:9} {time.monotonic() - self.began:5.1f} s"
        if not self.consumers:
            return f"{head}  starting 3 pods and the consumer"
        sent = sum(c.sent for c in self.consumers)
        lost = sum(c.failed for c in self.consumers)
        groups: dict[str, list[str]] = {"stopping": [], "dead, still listed": [],
                                         "starting": []}
        for run in list(self.pods):
            try:
                listed = all(c.lists(run.addr) for c in self.consumers)
            except RuntimeError:  # the consumer reported an error: the block will say
                listed = False
            if run.pod.deleted_at is None:
                if not listed:
                    groups["starting"].append(run.name)
            elif run.exited_at is None:
                groups["stopping"].append(run.name)
            elif listed:
                groups["dead, still listed"].append(run.name)
        state = "; ".join(f"{what}: {' '.join(names)}" for what, names in groups.items()
                          if names) or "every pod serving"
        return f"{head}  sent {sent:5}  lost {lost:5}  | {state}"


def pod_rows(block, pods: list, consumer: str) -> list[tuple[str, int, int, float | None]]:
    """(pod, requests, lost, stop seconds) per pod, in start order; a request
    belongs to the pod that had its address when it was sent (a port can be
    used again by a later pod)."""
    counts = {run.name: [0, 0] for run in pods}
    orphans = [0, 0]
    for rec in block.records.get(consumer, []):
        t_start, addr, outcome = rec[1], rec[3], rec[4]
        owner = None
        for run in pods:
            if run.addr == addr and run.started_at <= t_start:
                owner = run.name
        slot = counts[owner] if owner else orphans
        slot[0] += 1
        slot[1] += outcome != "ok"
    rows = [(run.name, *counts[run.name], run.stop_seconds) for run in pods]
    if orphans[0]:
        rows.append(("(no pod)", *orphans, None))
    return rows


def secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(results: list[tuple], consumer: str) -> str:
    w = max([10, *(len(block.strategy) for block, _ in results)])
    head = f"{'strategy':{w}} {'pod':9} {'requests':>8} {'lost':>6}  {'stop':>6}"
    lines = [head, "-" * len(head)]
    for block, pods in results:
        rows = pod_rows(block, pods, consumer)
        for name, sent, lost, stop in rows:
            lines.append(f"{block.strategy:{w}} {name:9} {sent:8} {lost:6}  {secs(stop):>6}")
        sent = sum(r[1] for r in rows)
        lost = sum(r[2] for r in rows)
        stops = sorted(block.stops)
        summary = (f"p50 {statistics.median(stops):.2f} max {stops[-1]:.2f}" if stops
                   else "-")
        pct = f"{100 * lost / sent:.0f}%" if sent else "-"
        lines.append(f"{block.strategy:{w}} {'all':9} {sent:8} {lost:6}  stop {summary}"
                     f"  ({pct} lost)")
        lines.append("")
    lines.append("stop: s from the pod's deletion until its last process exited; "
                 "'-': not deleted (a replacement)")
    return "\n".join(lines)


def verdict(registry: str, results: list[tuple], consumer: str,
            cache: float | None = None) -> tuple[list[str], bool]:
    """What this run showed, in words, from its own figures; and whether
    registrar kept its promise (no request lost)."""
    said, kept = [], True
    cached = f" (and its {cache:g} s cache after that)" if cache else ""
    for block, _pods in results:
        if block.error:
            said.append(f"{block.strategy}: could not run ({block.error})")
            kept = False
            continue
        records = block.records.get(consumer, [])
        sent, lost = len(records), sum(r[4] != "ok" for r in records)
        stops = sorted(block.stops)
        if block.strategy == "naive":
            said.append(
                f"naive lost {lost} of {sent}: the consumer kept sending to stopped pods "
                f"until {EXPIRY[registry]}{cached}" if lost else
                f"naive lost nothing this time: a loss was expected (the consumer lists a "
                f"stopped pod until {EXPIRY[registry]}{cached}); the table shows what happened")
        elif block.strategy != "registrar":
            stop = f"; its pods stopped {statistics.median(stops):.2f} s (p50) after their " \
                   f"deletion" if stops else ""
            said.append(f"{block.strategy} lost {lost} of {sent}{stop}")
        elif lost:
            kept = False
            said.append(f"registrar LOST {lost} of {sent} requests in this run: that is not "
                        f"what it promises (run again with --keep to keep the logs)")
        else:
            slowest = stops[-1] if stops else None
            said.append(f"registrar lost 0 of {sent}; its pods stopped "
                        f"{statistics.median(stops):.2f} s (p50; max {slowest:.2f} s) after "
                        f"their deletion" if stops else f"registrar lost 0 of {sent}")
            # A cache keeps sending to a pod up to its seconds after the
            # registry dropped it: a stop that waits for that takes as long.
            expected = 1.0 + (cache or 0.0)
            if slowest is not None and slowest >= expected:
                said.append(f"  (its slowest stop took {slowest:.2f} s here, not under "
                            + (f"{expected:g} s (the consumer's cache + 1 s)" if cache
                               else "a second") + ": is the machine busy?)")
    return said, kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default="etcd", choices=["etcd", "zookeeper", "consul"])
    parser.add_argument("--plot", metavar="FILE.png",
                        help="where to write the timeline (default: registrar-demo-REGISTRY.png "
                             "in the temp directory)")
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second")
    parser.add_argument("--cache", type=float, metavar="SECONDS",
                        help="the consumer caches what it discovered this long (default: "
                             "none, it uses the watch's list as it is)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help="comma-separated, in order, of: naive, sigterm-dereg, sleep, "
                             "registrar")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    if args.rate <= 0:
        parser.error("--rate must be positive")
    if args.cache is not None and args.cache <= 0:
        parser.error("--cache must be positive")
    block_mod, registries, report, pods_mod, consumers_mod = load_bench_parts()
    strategies = [w.strip() for w in args.strategies.split(",") if w.strip()]
    unknown = [w for w in strategies if w not in pods_mod.STRATEGIES]
    if unknown or not strategies:
        parser.error(f"unknown strategy {unknown or args.strategies!r}; known: "
                     f"{', '.join(pods_mod.STRATEGIES)}")
    kind = "per-request" if args.cache is None else "cached"
    consumer = consumers_mod.label(kind, args.cache)
    plot_path = Path(args.plot or Path(tempfile.gettempdir())
                     / f"registrar-demo-{args.registry}.png").resolve()
    # SIGTERM unwinds like Ctrl-C: every server and process started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # What bench/rr reads of the bench's command line, at the demo's scale.
    params = Namespace(pods=3, rate=args.rate, work_ms=20.0, grace=30.0, min_requests=1,
                       consumers=[kind], cache_s=args.cache)
    live = Live(sys.stdout.isatty())

    t0 = time.monotonic()
    ways = ", then ".join("the naive way" if s == "naive" else "with registrar"
                          if s == "registrar" else f"with {s}" for s in strategies)
    print(f"registrar demo: a rolling restart of 3 pods under {args.rate:g} req/s on "
          f"{args.registry}, {ways}", flush=True)
    print("the app dies at once on SIGTERM; one consumer watches one registry member"
          + (f", picks from a copy of its list refreshed every {args.cache:g} s (a cache),"
             if args.cache else "")
          + " and sends round-robin, never retrying", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="registrar-demo-"))
    registry = registries.REGISTRIES[args.registry]()
    results: list[tuple] = []
    try:
        began = time.monotonic()
        registry.start(tmp / args.registry)
        print(f"{registry.describe()}; up in {time.monotonic() - began:.1f} s", flush=True)
        for strategy in strategies:
            live.say(f"\n{strategy}: delete the 3 pods one by one, each replaced, then wait "
                     f"until the consumer lists no deleted pod"
                     + (" (in its cache)" if args.cache else ""))
            live.begin(strategy)
            try:
                block = block_mod.run_block(
                    registry, strategy, "dies", params, tmp / args.registry / strategy,
                    progress=live.say, rounds=1, watch=live.watch)
            finally:
                live.end()
            results.append((block, list(live.pods)))
            records = block.records.get(consumer, [])
            live.say(f"  {strategy}: done in {block.seconds:.1f} s, {len(records)} sent, "
                     f"{sum(r[4] != 'ok' for r in records)} lost")
    finally:
        registry.stop()
        if args.keep:
            print(f"work directory kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(table(results, consumer))
    said, kept = verdict(args.registry, results, consumer, args.cache)
    print("\n".join(said))
    blocks = [block for block, _ in results if not block.error]
    try:
        report.plot(blocks, [consumer], str(plot_path))
        print(f"timeline plot: {plot_path}")
    except ImportError as exc:
        print(f"no plot: {exc} (`./dev setup` installs matplotlib)")
    print(f"demo time {time.monotonic() - t0:.1f} s")
    return 0 if kept else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # everything was stopped on the way out
        print("interrupted", file=sys.stderr)
        sys.exit(130)
