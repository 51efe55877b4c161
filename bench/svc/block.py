"""One block of bench/services.py: a (lag spread, app, strategy) run with
its traffic and rolling restarts behind the Service's virtual IP."""
from __future__ import annotations

import random
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from rr.cli import progress as stderr_progress
from rr.consumers import stop_all

from .consumers import VipConsumer
from .datapath import ServiceVIP
from .endpoints import Endpoints
from .pods import READINESS, SvcPod, make_pod
from .report import Block, PodStop

WARMUP = 1.0  # traffic before the first deletion
TAIL = 1.0  # traffic after the last replacement's endpoint is in
READY_TIMEOUT = 30.0
PAUSE = (0.0, 1.0)  # a random pause before each deletion


def code_version() -> str | None:
    """The commit (and whether the tree is dirty) registrar's pods run."""
    repo = Path(__file__).resolve().parents[2]
    try:
        done = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def wait_in(run: SvcPod, endpoints: Endpoints, strategy: str) -> None:
    """Wait until the pod is ready, then put its endpoint in the Service."""
    run.pod.wait_ready(run.ready, READY_TIMEOUT, READINESS[strategy])
    endpoints.add(run.port)


QUIET = re.compile(r"consumers: quiet ([0-9.]+)s after")


def quiet_seconds(lines: list[str]) -> float | None:
    """registrar's "consumers: quiet X s after the stop began", if it said so."""
    for line in lines:
        m = QUIET.search(line)
        if m:
            return float(m.group(1))
    return None


def stop_lines(run: SvcPod) -> list[str]:
    """What registrar said about the consumers at the pod's stop."""
    out = []
    for line in run.pod.logs().splitlines():
        if ("consumers: " in line or "still sending at the deadline" in line
                or "busy at the deadline" in line):
            out.append(line.strip()[:600])
    return out[-4:]


def run_block(spread: tuple[float, float], label: str, app: str, strategy: str, args,
              vip: ServiceVIP, endpoints: Endpoints, workdir: Path, *,
              progress: Callable[[str], None] = stderr_progress) -> Block:
    block = Block(label, app, strategy, code=code_version())
    tag = f"[lag {label} {app} {strategy}]"
    workdir.mkdir(parents=True)
    began = time.monotonic()
    consumers: list[VipConsumer] = []
    started: list[SvcPod] = []
    taken: set[int] = set()
    lo, hi = spread
    # No deletion starts after `limit`; the consumers stop by themselves at
    # `budget`, which leaves room for a last slow pod stop.
    limit = 4 * args.min_requests / args.rate + 300
    budget = limit + 2 * (args.grace + 10) + hi + 60
    try:
        endpoints.reset()
        pods = [make_pod(strategy, app, args, workdir, f"web-{i}", taken)
                for i in range(args.pods)]
        started += pods
        for run in pods:
            wait_in(run, endpoints, strategy)
        consumers = [VipConsumer(kind, vip.address, workdir / f"{kind}.jsonl", args.rate,
                                 budget) for kind in args.consumers]
        for c in consumers:
            c.wait_ready(30)
        for c in consumers:
            c.command("go")
        block.t_go = time.monotonic()
        time.sleep(WARMUP)
        seq, i = args.pods, 0
        while min(c.sent for c in consumers) < args.min_requests:
            if time.monotonic() - block.t_go > limit:
                raise RuntimeError(f"not {args.min_requests} requests within {limit:.0f}s")
            # Deletions do not overlap: every earlier endpoint is out first.
            if not endpoints.wait_idle(hi + 30):
                raise RuntimeError("an endpoint removal did not happen in time")
            time.sleep(random.uniform(*PAUSE))
            old = pods[i]
            lag = random.uniform(lo, hi)
            removal = endpoints.remove_after(old.port, lag, time.monotonic())
            old.delete()  # returns once the container exited (or was SIGKILLed)
            new = make_pod(strategy, app, args, workdir, f"web-{seq}", taken)
            seq += 1
            started.append(new)
            wait_in(new, endpoints, strategy)
            pods[i] = new
            i = (i + 1) % args.pods
            # The removal may still be ahead (a pod that stopped before its
            # lag ran out): the stop's figures wait for it.
            endpoints.wait_idle(max(removal.due - time.monotonic(), 0) + 30)
            stop = PodStop(old.name, old.port, old.deleted_at, lag,
                           removal.applied(old.deleted_at), old.stop_seconds,
                           stop_lines(old) if strategy == "registrar" else [])
            stop.quiet_s = quiet_seconds(stop.stop_log)
            block.stops.append(stop)
            lag_s = "-" if stop.lag_s is None else f"{stop.lag_s:.2f}"
            stop_s = "-" if stop.stop_s is None else f"{stop.stop_s:.2f}"
            quiet = "" if stop.quiet_s is None else f", registrar: quiet after {stop.quiet_s:.2f} s"
            progress(f"  {tag} {old.name} deleted: lag {lag_s} s, stop {stop_s} s{quiet}; "
                     + ", ".join(f"{c.label} {c.sent} sent {c.failed} lost" for c in consumers)
                     + f"; {time.monotonic() - began:.0f} s")
            for line in stop.stop_log:
                progress(f"    {old.name}: {line}")
        endpoints.wait_idle(hi + 30)
        time.sleep(TAIL)
        block.records.update(stop_all(consumers, tag, progress))
        block.done.update({c.label: c.done or {} for c in consumers})
    except Exception as exc:  # noqa: BLE001 - reported in the row; the next block runs
        block.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        progress(f"  {tag} FAILED: {str(exc)[:3000]}")
    finally:
        for c in consumers:
            c.kill()
        for run in started:
            run.pod.kill()
        try:
            endpoints.reset()
        except Exception as exc:  # noqa: BLE001 - said; the next block resets it again
            progress(f"  could not empty the Service: {exc!r}")
    block.seconds = time.monotonic() - began
    return block
