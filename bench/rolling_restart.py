#!/usr/bin/env python3
"""Rolling-restart benchmark: requests lost and time per pod while the
three pods of service "web" are restarted one by one, for real, on this
machine.

    .venv/bin/python bench/rolling_restart.py [--rounds 3] [--rate 300]
        [--modes a,b,c,d] [--app-stop graceful|immediate] [--work-ms 5]
        [--min-wait 0] [--hook exec|none] [--grace 30] [--no-member-watch]

What runs (all on 127.0.0.1):
  * a three-member etcd cluster (registrar_testing.etcd);
  * three pods, each a real process tree played by the kubelet simulator
    (registrar_testing.kubelet, terminationGracePeriodSeconds --grace): a wrapper
    around bench/apps/webapp.py on a port of its own, registered as
    /services/web/127.0.0.1:PORT in the gRPC naming format;
  * bench/apps/consumer.py, a client-side load balancer: it watches the
    prefix on ONE member (a follower: the last member that is not the
    leader at the start) and sends --rate short requests per second
    round-robin over the endpoints it knows.

A round of a mode: start 3 pods, wait until the consumer lists them, start
the traffic, 1 s later delete pod 0 (kubelet: preStop hook, SIGTERM, SIGKILL
at the grace period), wait until it exited, start its replacement on a new
port, wait until the consumer lists it, then pod 1, pod 2; 1 s more traffic.

Modes (the app, and what it does on SIGTERM, are the same in all):
  a  deregister-then-exit  bench/apps/naive_wrapper.py --sleep 0: on SIGTERM
                           revoke the lease (deletes the key), SIGTERM the app
  b  deregister+sleep5     the same, sleeping 5 s between the two
  c  registrar-run         `registrar run` (default settings; health gate on
                           the app's /health) + preStop exec `registrar prestop`
  d  registrar-run+drain   the same with stop.drain_connections: true (and
                           stop.min_wait: --min-wait)

Every failed request is attributed, per the stopping pod's own timeline
(the app records SIGTERM and the closing of its listener; the consumer
records when it dropped the endpoint; with the member watch, one thread
reads the consumer's member every 2 ms from the deletion on):
  in-flight       sent before the app stopped accepting, cut by the stop
  stale-endpoint  sent after the app stopped accepting, while the consumer
                  still listed the pod (it had not yet seen the removal)
  after-removal   sent after the consumer dropped the pod (a consumer bug)
  startup         to a new pod before it was ready
  other           anything else
"""
from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from registrar_testing import free_ports
from registrar_testing.etcd import EtcdCluster
from registrar_testing.kubelet import Container, EtcdWatch, Exec, Pod, read_events

PY = sys.executable
APPS = Path(__file__).resolve().parent / "apps"
SERVICE = "web"
PREFIX = f"/services/{SERVICE}/"
PODS = 3
WARMUP = 1.0  # traffic before the first deletion
TAIL = 1.0  # traffic after the last replacement is listed
READY_TIMEOUT = 30.0


@dataclass(frozen=True)
class Mode:
    letter: str
    name: str
    kind: str  # "naive" or "registrar"
    sleep: float = 0.0
    drain: bool = False


MODES = [Mode("a", "deregister-then-exit", "naive"),
         Mode("b", "deregister+sleep5", "naive", sleep=5.0),
         Mode("c", "registrar-run", "registrar"),
         Mode("d", "registrar-run+drain", "registrar", drain=True)]


# -- the consumer -------------------------------------------------------------

class Consumer:
    """bench/apps/consumer.py as a subprocess; its view, as it reports it."""

    def __init__(self, member: str, out: Path, rate: float, max_seconds: float):
        self.out = out
        self.endpoints: set[str] = set()
        self.added: dict[str, float] = {}
        self.removed: dict[str, float] = {}
        self.errors: list[str] = []
        self.done: dict | None = None
        self._ready = threading.Event()
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._stderr = open(out.with_suffix(".err"), "w")
        self.proc = subprocess.Popen(
            [PY, str(APPS / "consumer.py"), "--etcd", member, "--prefix", PREFIX,
             "--out", str(out), "--rate", str(rate), "--max-seconds", str(max_seconds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True, name="consumer-out").start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            ev = msg.get("ev")
            with self._lock:
                if ev == "ready":
                    self.endpoints = set(msg["endpoints"])
                    for ep in msg["endpoints"]:
                        self.added.setdefault(ep, msg["t"])
                    self._ready.set()
                elif ev == "add":
                    self.endpoints.add(msg["ep"])
                    self.added.setdefault(msg["ep"], msg["t"])
                elif ev == "del":
                    self.endpoints.discard(msg["ep"])
                    self.removed.setdefault(msg["ep"], msg["t"])
                elif ev == "error":
                    self.errors.append(msg["what"])
                elif ev == "done":
                    self.done = msg
        self._finished.set()

    def wait_ready(self, timeout: float) -> None:
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the consumer did not start within {timeout}s")

    def lists(self, ep: str) -> bool:
        if self.errors:
            raise RuntimeError(f"consumer: {self.errors[0]}")
        with self._lock:
            return ep in self.endpoints

    def command(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 15.0) -> list[tuple]:
        self.command("stop")
        if not self._finished.wait(timeout):
            raise RuntimeError("the consumer did not finish in time")
        self.proc.wait(5)
        return [tuple(json.loads(line)) for line in self.out.read_text().splitlines()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._stderr.close()


# -- pods ---------------------------------------------------------------------

@dataclass
class PodRun:
    name: str
    port: int
    pod: Pod
    events: Path
    watch: EtcdWatch | None = None
    started_at: float = 0.0
    listed_at: float | None = None  # the consumer listed it
    deleted_at: float | None = None
    exited_at: float | None = None
    removed_at: float | None = None  # the consumer dropped it
    hook_output: str = ""
    hook_seconds: float | None = None

    @property
    def ep(self) -> str:
        return f"127.0.0.1:{self.port}"

    def app_event(self, name: str) -> float | None:
        found = [e for e in read_events(self.events) if e["event"] == name]
        return found[0]["mono"] if found else None


def make_pod(mode: Mode, args, cluster: EtcdCluster, workdir: Path, name: str) -> PodRun:
    port, control_port = free_ports(2)
    ep = f"127.0.0.1:{port}"
    events = workdir / f"{name}.events.jsonl"
    app = [PY, str(APPS / "webapp.py"), "--port", str(port), "--events", str(events),
           "--on-term", args.app_stop, "--work-ms", str(args.work_ms)]
    if mode.kind == "naive":
        argv = [PY, str(APPS / "naive_wrapper.py"), "--etcd", ",".join(cluster.endpoints),
                "--key", PREFIX + ep, "--addr", ep, "--health", f"http://{ep}/health",
                "--sleep", str(mode.sleep), "--", *app]
        hook = None
    else:
        control = f"127.0.0.1:{control_port}"
        stop: dict = {"grace_period": f"{args.grace}s"}
        if mode.drain:
            stop["drain_connections"] = True
            if args.min_wait:
                stop["min_wait"] = f"{args.min_wait}s"
        config = workdir / f"{name}.yaml"
        config.write_text(yaml.safe_dump({
            "service": {"name": SERVICE, "port": port},
            "backends": [{"type": "etcd", "endpoints": cluster.endpoints, "ttl": "10s"}],
            "stop": stop,
            "control": {"listen": control},
            "health": {"http": f"http://{ep}/health", "interval": "200ms"},
        }))
        argv = [PY, "-m", "registrar", "run", "--config", str(config), "--", *app]
        hook = (Exec([PY, "-m", "registrar", "prestop", "--control", control])
                if args.hook == "exec" else None)
    pod = Pod(name, [Container("app", argv, pre_stop=hook)], workdir / name,
              grace_period=args.grace, env={"POD_IP": "127.0.0.1"})
    run = PodRun(name, port, pod, events)
    if args.member_watch:
        run.watch = pod.watch(EtcdWatch([args.consumer_member], PREFIX + ep))
    pod.start()
    run.started_at = pod.timeline.first("start", "app").t
    return run


def wait_listed(run: PodRun, consumer: Consumer) -> None:
    run.pod.wait_ready(lambda: consumer.lists(run.ep), READY_TIMEOUT, "listed by the consumer")
    run.listed_at = consumer.added.get(run.ep, time.monotonic())


def delete(run: PodRun) -> None:
    timeline = run.pod.delete()
    run.deleted_at = run.pod.deleted_at
    exit_event = timeline.first("exit", "app")
    run.exited_at = exit_event.t if exit_event else None
    hook = timeline.first("hook_end", "app")
    run.hook_output = hook.detail.get("output", "") if hook else ""
    run.hook_seconds = hook.detail.get("seconds") if hook else None
    if run.watch is not None:
        # Keep reading until the member dropped the key (bounded), then stop.
        end = time.monotonic() + 3
        while run.watch.members[0].gone_at is None and time.monotonic() < end:
            time.sleep(0.01)
        run.watch.stop()


def clear_prefix(endpoint: str) -> None:
    import urllib.request

    key = PREFIX.encode()
    body = {"key": base64.b64encode(key).decode(),
            "range_end": base64.b64encode(key[:-1] + bytes([key[-1] + 1])).decode()}
    req = urllib.request.Request(endpoint + "/v3/kv/deleterange", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        resp.read()


# -- one round ----------------------------------------------------------------

@dataclass
class Round:
    mode: Mode
    records: list[tuple] = field(default_factory=list)
    stopped: list[PodRun] = field(default_factory=list)  # the pods deleted, in order
    started: list[PodRun] = field(default_factory=list)  # every pod
    restart_seconds: float = 0.0
    fell_behind: int = 0


def run_round(mode: Mode, args, cluster: EtcdCluster, workdir: Path) -> Round:
    workdir.mkdir(parents=True)
    result = Round(mode)
    consumer: Consumer | None = None
    try:
        clear_prefix(cluster.endpoints[0])
        pods = [make_pod(mode, args, cluster, workdir, f"web-{i}") for i in range(PODS)]
        result.started += pods
        consumer = Consumer(args.consumer_member, workdir / "requests.jsonl", args.rate,
                            max_seconds=120)
        consumer.wait_ready(20)
        for run in pods:
            wait_listed(run, consumer)
        consumer.command("go")
        time.sleep(WARMUP)
        began = time.monotonic()
        for i in range(PODS):
            delete(pods[i])
            result.stopped.append(pods[i])
            new = make_pod(mode, args, cluster, workdir, f"web-{i}-new")
            result.started.append(new)
            wait_listed(new, consumer)
            pods[i] = new
        result.restart_seconds = time.monotonic() - began
        time.sleep(TAIL)
        result.records = consumer.stop()
        result.fell_behind = (consumer.done or {}).get("fell_behind", 0)
        for run in result.stopped:
            run.removed_at = consumer.removed.get(run.ep)
        return result
    finally:
        if consumer is not None:
            consumer.kill()
        for run in result.started:
            run.pod.kill()
        try:
            clear_prefix(cluster.endpoints[0])  # what the SIGKILLed pods left behind
        except OSError:
            pass


# -- analysis -----------------------------------------------------------------

KINDS = ["refused", "reset", "timeout", "http5xx", "protocol", "other", "noendpoint"]
CAUSES = ["in-flight", "stale-endpoint", "after-removal", "startup", "other"]


def stop_moment(run: PodRun) -> float | None:
    """When the app stopped accepting (graceful) or died (immediate)."""
    return run.app_event("listener_closed") or run.app_event("sigterm")


def cause(record: tuple, by_ep: dict[str, PodRun]) -> str:
    _, t_start, t_end, ep, kind, _, _ = record
    run = by_ep.get(ep)
    if run is None:
        return "other"
    if run.deleted_at is not None and t_end >= run.deleted_at:
        removed = run.removed_at
        if removed is not None and t_start >= removed:
            return "after-removal"
        stopped = stop_moment(run)
        if stopped is not None and t_start >= stopped:
            return "stale-endpoint"
        return "in-flight"
    if run.listed_at is None or t_start < run.listed_at:
        return "startup"
    return "other"


def ms(values: list[float]) -> str:
    if not values:
        return "n/a"
    v = sorted(x * 1000 for x in values)
    return f"p50 {statistics.median(v):7.1f} ms  max {v[-1]:7.1f} ms"


def signed_ms(values: list[float]) -> str:
    if not values:
        return "n/a"
    v = sorted(x * 1000 for x in values)
    return f"p50 {statistics.median(v):+7.1f} ms  min {v[0]:+7.1f} ms  max {v[-1]:+7.1f} ms"


def report(mode: Mode, rounds: list[Round], args) -> dict:
    sent = sum(len(r.records) for r in rounds)
    kinds = {k: 0 for k in KINDS}
    causes = {c: 0 for c in CAUSES}
    failures: list[str] = []
    for r in rounds:
        by_ep = {run.ep: run for run in r.started}
        for rec in r.records:
            if rec[4] == "ok":
                continue
            kinds[rec[4]] = kinds.get(rec[4], 0) + 1
            c = cause(rec, by_ep)
            causes[c] += 1
            run = by_ep.get(rec[3])
            if run is not None and run.deleted_at is not None:
                rel = lambda t: "n/a" if t is None else f"{1000 * (t - run.deleted_at):+.1f}ms"  # noqa: E731
                failures.append(
                    f"{rec[4]:8} {c:14} {run.name:9} sent {rel(rec[1])} after delete"
                    f" (app SIGTERM {rel(run.app_event('sigterm'))}, stopped accepting "
                    f"{rel(stop_moment(run))}, consumer dropped it {rel(run.removed_at)},"
                    f" connected={rec[5]}{' ' + rec[6] if rec[6] else ''})")
            else:
                failures.append(f"{rec[4]:8} {c:14} {rec[3]}")
    failed = sum(kinds.values())
    stopped = [run for r in rounds for run in r.stopped]
    stop_s = [run.exited_at - run.deleted_at for run in stopped if run.exited_at]
    sigterm_s = [t - run.deleted_at for run in stopped if (t := run.app_event("sigterm"))]
    hook_s = [run.hook_seconds for run in stopped if run.hook_seconds is not None]
    app_exit_s = [e - t for run in stopped
                  if (t := run.app_event("sigterm")) and (e := run.app_event("exit"))]
    wrapper_s = [run.exited_at - e for run in stopped
                 if run.exited_at and (e := run.app_event("exit"))]
    removed_s = [run.removed_at - run.deleted_at for run in stopped
                 if run.removed_at]
    # > 0: the consumer dropped the pod before the app stopped accepting.
    margin = [stop_moment(run) - run.removed_at for run in stopped
              if run.removed_at and stop_moment(run)]
    member_gone = [run.watch.members[0].gone_at - run.deleted_at for run in stopped
                   if run.watch is not None and run.watch.members[0].gone_at]
    lag = [run.removed_at - run.watch.members[0].gone_at for run in stopped
           if run.watch is not None and run.watch.members[0].gone_at
           and run.removed_at]
    restart = [r.restart_seconds for r in rounds]
    replaced = [run for r in rounds for run in r.started[PODS:]]
    startup_s = [run.listed_at - run.started_at for run in replaced if run.listed_at]
    per_pod = failed / len(stopped) if stopped else 0.0

    print(f"\n[{mode.letter}] {mode.name}: {len(rounds)} round(s) x {PODS} pods")
    print(f"  requests sent {sent}, ok {sent - failed}, FAILED {failed} "
          f"({per_pod:.2f} per pod restart)")
    if failed:
        print("    by kind:  " + ", ".join(f"{k} {v}" for k, v in kinds.items() if v))
        print("    by cause: " + ", ".join(f"{k} {v}" for k, v in causes.items() if v))
    print(f"  per-pod stop, delete -> container exit   {ms(stop_s)}")
    print(f"  rolling restart of {PODS} pods               "
          f"p50 {statistics.median(restart):6.2f} s   max {max(restart):6.2f} s")
    print(f"    new pod: start -> listed by consumer   {ms(startup_s)}")
    if hook_s:
        print(f"    preStop hook (exec) ran                {ms(hook_s)}")
    print(f"    delete -> app got SIGTERM              {ms(sigterm_s)}")
    print(f"    app SIGTERM -> app exited              {ms(app_exit_s)}")
    print(f"    app exited -> container exited         {ms(wrapper_s)}")
    if member_gone:
        print(f"  delete -> consumer's member no longer lists the key  {ms(member_gone)}"
              "  (bench poll every 2 ms: upper bound)")
    print(f"  delete -> consumer dropped the endpoint  {ms(removed_s)}")
    if lag:
        print(f"  consumer dropped - member poll saw it    {signed_ms(lag)}"
              "  (<= 0: no consumer lag measurable)")
    print(f"  app stopped accepting - consumer dropped {signed_ms(margin)}"
          "  (< 0: the consumer still sent it requests)")
    behind = sum(r.fell_behind for r in rounds)
    if behind:
        print(f"  note: the sender fell >200 ms behind schedule {behind} time(s)")
    if args.verbose and failures:
        print("  failures:")
        for line in failures[:60]:
            print("    " + line)
    if args.verbose:
        hooks = [run.hook_output for run in stopped if run.hook_output]
        for line in hooks[:3]:
            print(f"    preStop hook said: {line}")
    return {"mode": mode.name, "sent": sent, "failed": failed, "kinds": kinds, "causes": causes,
            "stop_p50_ms": 1000 * statistics.median(stop_s) if stop_s else None,
            "stop_max_ms": 1000 * max(stop_s) if stop_s else None,
            "restart_p50_s": statistics.median(restart)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rolling restarts per mode")
    parser.add_argument("--rate", type=float, default=300.0, help="requests per second")
    parser.add_argument("--modes", default="a,b,c,d", help="comma-separated letters or names")
    parser.add_argument("--app-stop", choices=["graceful", "immediate"], default="graceful",
                        help="the app on SIGTERM: stop accepting and finish in-flight "
                             "requests, or exit at once (default: graceful)")
    parser.add_argument("--work-ms", type=float, default=5.0, help="the app's time per request")
    parser.add_argument("--min-wait", type=float, default=0.0,
                        help="stop.min_wait (seconds) in mode d")
    parser.add_argument("--hook", choices=["exec", "none"], default="exec",
                        help="registrar modes: preStop exec `registrar prestop`, or SIGTERM only")
    parser.add_argument("--grace", type=int, default=30, help="terminationGracePeriodSeconds")
    parser.add_argument("--no-member-watch", dest="member_watch", action="store_false",
                        help="do not poll the consumer's etcd member during deletions")
    parser.add_argument("--verbose", "-v", action="store_true", help="list every failure")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    # SIGTERM (a CI timeout, say) unwinds like Ctrl-C: the finally blocks
    # stop every server and process this bench started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.WARNING)
    wanted = [w.strip() for w in args.modes.split(",") if w.strip()]
    modes = [m for m in MODES if m.letter in wanted or m.name in wanted]
    if not modes:
        parser.error(f"no mode among {wanted}; known: "
                     + ", ".join(f"{m.letter}={m.name}" for m in MODES))

    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bench-rolling-"))
    results: dict[str, list[Round]] = {m.name: [] for m in modes}
    cluster = EtcdCluster(3, tmp / "etcd")
    try:
        cluster.start()
        leader = cluster.leader_index()
        # The consumer reads one member: the last follower (a follower applies
        # a removal after the leader does; most consumers are on followers).
        watched = max(i for i in range(len(cluster.members)) if i != leader)
        args.consumer_member = cluster.endpoints[watched]
        print(f"etcd: 3 members, leader etcd{leader}; the pods write to etcd0 first; the consumer "
              f"reads etcd{watched} (a follower) only")
        print(f"traffic: {args.rate:g} req/s, Connection: close, round-robin; app: "
              f"{args.work_ms:g} ms per request, on SIGTERM {args.app_stop}; grace period "
              f"{args.grace}s")
        print(f"registrar modes: preStop {args.hook}"
              + (" `registrar prestop`" if args.hook == "exec" else " (SIGTERM only)")
              + "; health gate GET /health every 200 ms; etcd ttl 10s; other settings default"
              + (f"; mode d min_wait {args.min_wait:g}s" if args.min_wait else ""))
        for rnd in range(args.rounds):  # modes interleaved: a drift hits them all alike
            for mode in modes:
                r = run_round(mode, args, cluster, tmp / f"{mode.letter}-{rnd}")
                results[mode.name].append(r)
                failed = sum(1 for rec in r.records if rec[4] != "ok")
                print(f"  round {rnd + 1} {mode.name:22} {len(r.records):5} sent, {failed:3} failed,"
                      f" restart {r.restart_seconds:5.2f} s", flush=True)
        summary = [report(m, results[m.name], args) for m in modes]
    finally:
        cluster.stop()
        if not args.keep:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"work directory kept: {tmp}")
    print("\nsummary  (mode: failed/sent, per-pod stop p50/max, rolling restart p50)")
    for s in summary:
        print(f"  {s['mode']:22} {s['failed']:4}/{s['sent']:<6} "
              f"stop {s['stop_p50_ms']:7.1f} / {s['stop_max_ms']:7.1f} ms   "
              f"restart {s['restart_p50_s']:5.2f} s")
    print(f"total bench time {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
