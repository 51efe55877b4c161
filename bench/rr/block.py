"""One block of the rolling-restart bench: a (registry, app, strategy) run
with its traffic and rounds of rolling restarts. bench/rolling_restart.py
runs blocks at full scale; scripts/demo.py runs two small ones (``rounds``
and ``watch`` are the demo's hooks)."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from .consumers import Consumer
from .pods import PodRun, make_pod
from .registries import Registry
from .report import Block

WARMUP = 1.0  # traffic before the first deletion
TAIL = 1.0  # traffic after the last replacement is listed
READY_TIMEOUT = 30.0
SETTLE_TIMEOUT = 30.0  # the TTLs are 10 s


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wait_listed(run: PodRun, consumers: list[Consumer]) -> None:
    run.pod.wait_ready(lambda: all(c.lists(run.addr) for c in consumers), READY_TIMEOUT,
                       "listed by every consumer")


def settle(deleted: list[PodRun], consumers: list[Consumer], block: Block,
           progress: Callable[[str], None] = stderr_progress) -> None:
    """Between rounds: wait (traffic going on) until no consumer lists a
    deleted pod any more, so that every round starts from the same state
    (naive: until the TTL removed the last one)."""
    end = time.monotonic() + SETTLE_TIMEOUT
    while any(c.lists(run.addr) for c in consumers for run in deleted):
        if time.monotonic() > end:
            block.unsettled += 1
            progress(f"  a deleted pod was still listed {SETTLE_TIMEOUT:g} s after its round")
            return
        time.sleep(0.05)


def run_block(registry: Registry, strategy: str, app: str, args, workdir: Path, *,
              progress: Callable[[str], None] = stderr_progress, rounds: int | None = None,
              watch: Callable[[list[Consumer], list[PodRun]], None] | None = None) -> Block:
    """Rounds go on until every consumer sent ``args.min_requests``, or,
    with ``rounds``, that many rounds. ``watch`` is called once, when the
    traffic starts, with the live consumers and the list of every pod
    started so far (replacements are appended to it as they start)."""
    block = Block(registry.name, strategy, app)
    workdir.mkdir(parents=True)
    began = time.monotonic()
    consumers: list[Consumer] = []
    started: list[PodRun] = []
    # No round starts after `limit`; the consumers stop by themselves at
    # `budget`, which leaves room for a last round of slow pod stops.
    limit = 4 * args.min_requests / args.rate + 300
    budget = limit + 4 * args.pods * (args.grace + 10) + SETTLE_TIMEOUT
    try:
        registry.clear()
        pods = [make_pod(strategy, registry, app, args, workdir, f"web-{i}")
                for i in range(args.pods)]
        started += pods
        consumers = [Consumer(kind, registry, workdir / f"{kind}.jsonl", args.rate, budget)
                     for kind in args.consumers]
        for c in consumers:
            c.wait_ready(30)
        for run in pods:
            wait_listed(run, consumers)
        for c in consumers:
            c.command("go")
        block.t_go = time.monotonic()
        if watch is not None:
            watch(consumers, started)
        time.sleep(WARMUP)
        seq = args.pods
        while (block.rounds < rounds if rounds is not None
               else min(c.sent for c in consumers) < args.min_requests):
            if time.monotonic() - block.t_go > limit:
                raise RuntimeError(f"not {args.min_requests} requests within {limit:.0f}s")
            round_pods = []
            for i in range(args.pods):
                old = pods[i]
                round_pods.append(old)
                old.delete()
                block.deletions.append(old.deleted_at)
                if old.stop_seconds is not None:
                    block.stops.append(old.stop_seconds)
                new = make_pod(strategy, registry, app, args, workdir, f"web-{seq}")
                seq += 1
                started.append(new)
                wait_listed(new, consumers)
                pods[i] = new
            block.rounds += 1
            settle(round_pods, consumers, block, progress)
            progress(f"  [{registry.name} {strategy} {app}] round {block.rounds}: "
                     + ", ".join(f"{c.client} {c.sent} sent {c.failed} failed" for c in consumers)
                     + f"; {time.monotonic() - began:.0f} s")
        time.sleep(TAIL)
        for c in consumers:  # both at once: the same traffic window for every row
            c.request_stop()
        for c in consumers:
            block.records[c.client] = c.stop()
            done = c.done or {}
            if "opened" in done:
                progress(f"  [{registry.name} {strategy} {app}] {c.client}: {done['opened']} "
                         f"connections opened, {done['dropped']} found closed before reuse")
            if done.get("fell_behind"):
                progress(f"  [{registry.name} {strategy} {app}] {c.client}: fell > 200 ms behind "
                         f"its schedule {done['fell_behind']} time(s) (the machine is too busy)")
    except Exception as exc:  # noqa: BLE001 - reported in the row; the next block runs
        block.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        progress(f"  [{registry.name} {strategy} {app}] FAILED: {str(exc)[:3000]}")
    finally:
        for c in consumers:
            c.kill()
        for run in started:
            run.pod.kill()
        try:
            registry.clear()  # what the SIGKILLed pods left behind
        except Exception as exc:  # noqa: BLE001
            progress(f"  could not clear {registry.name}: {exc!r}")
    block.seconds = time.monotonic() - began
    return block
