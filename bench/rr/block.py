"""One block of the rolling-restart bench: a (registry, app, strategy) run
with its traffic and rounds of rolling restarts. bench/rolling_restart.py
runs blocks at full scale; scripts/demo.py runs two small ones (``rounds``
and ``watch`` are the demo's hooks)."""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

from .cli import progress as stderr_progress
from .consumers import Consumer, stop_all
from .pods import PodRun, make_pod
from .registries import Registry
from .report import Block, PodSpan

WARMUP = 1.0  # traffic before the first deletion
TAIL = 1.0  # traffic after the last replacement is listed
READY_TIMEOUT = 30.0
SETTLE_TIMEOUT = 30.0  # the TTLs are 10 s
# A cached consumer lists a change up to its cache's seconds later: both
# timeouts are that much longer for it.


def cache_lag(consumers: list[Consumer]) -> float:
    return max((c.cache_s or 0.0 for c in consumers), default=0.0)


def wait_listed(run: PodRun, consumers: list[Consumer]) -> None:
    run.pod.wait_ready(lambda: all(c.lists(run.addr) for c in consumers),
                       READY_TIMEOUT + cache_lag(consumers), "listed by every consumer")


def settle(deleted: list[PodRun], consumers: list[Consumer], block: Block,
           progress: Callable[[str], None] = stderr_progress) -> None:
    """Between rounds: wait (traffic going on) until no consumer lists a
    deleted pod any more, so that every round starts from the same state
    (naive: until the TTL removed the last one; a cached consumer: until its
    cache dropped it too)."""
    timeout = SETTLE_TIMEOUT + cache_lag(consumers)
    end = time.monotonic() + timeout
    while any(c.lists(run.addr) for c in consumers for run in deleted):
        if time.monotonic() > end:
            block.unsettled += 1
            progress(f"  a deleted pod was still listed {timeout:g} s after its round")
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
    lag = (getattr(args, "cache_s", None) or 0.0) if "cached" in args.consumers else 0.0
    budget = limit + 4 * args.pods * (args.grace + 10 + 2 * lag) + SETTLE_TIMEOUT + lag
    try:
        registry.clear()
        pods = [make_pod(strategy, registry, app, args, workdir, f"web-{i}")
                for i in range(args.pods)]
        started += pods
        cache_s = getattr(args, "cache_s", None)
        consumers = [Consumer(kind, registry, workdir / f"{kind}.jsonl", args.rate, budget,
                              cache_s=cache_s if kind == "cached" else None)
                     for kind in args.consumers]
        block.cache_s = {c.label: c.cache_s for c in consumers if c.cache_s}
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
                if lag:
                    # The wait for a listing ends just after the cached
                    # consumer's refresh: deleting at once would always hit
                    # its worst phase (the pod cached a whole period). A
                    # real rollout does not wait for a consumer's refresh.
                    time.sleep(random.uniform(0, lag))
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
                     + ", ".join(f"{c.label} {c.sent} sent {c.failed} failed" for c in consumers)
                     + f"; {time.monotonic() - began:.0f} s")
        time.sleep(TAIL)
        block.records.update(stop_all(consumers, f"[{registry.name} {strategy} {app}]",
                                      progress))
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
        except Exception as exc:  # noqa: BLE001 - said; the next block clears it again
            progress(f"  could not clear {registry.name}: {exc!r}")
    block.pods = [PodSpan(run.addr, run.started_at, run.deleted_at) for run in started]
    block.seconds = time.monotonic() - began
    return block
