"""Interop with the real Apache Curator 5.4 (Debian's libcurator-discovery-java
and libcurator-recipes-java): a Java application's ServiceCache lists the pod a
real `registrar agent` registers, and sees it gone before the agent exits
(with `stop.min_wait`, the setting for client caches: see MIN_WAIT).

One JVM watches the service through three caches at once, built with
ServiceDiscoveryBuilder.builder(Object.class), (Map.class) and (Void.class).
A cache typed Void drops any instance whose payload is not null (Curator logs
a ClassCastException and swallows it): that is what `payload: none` is for."""
from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from registrar_testing.curator import CacheWatch, listed, wall_us

CLASSES = ["Object", "Map", "Void"]
SERVICE = f"interop-{uuid.uuid4().hex[:8]}"
# A ServiceCache is a client cache, which the agent cannot ask: its stop waits
# until every server applied the removal, then `stop.min_wait` for such
# consumers. Without it the caches here reported the removal 30-110 ms before
# the agent exited, but once 9.5 ms after (load average 8.6 on two cores): a
# cache that read the draining rewrite learns of the removal one more round
# trip later, then hands it to its listener on a thread of its own.
MIN_WAIT = 0.25


@pytest.fixture(scope="module")
def watch(zk_ensemble, curator_watch, tmp_path_factory):
    watch = CacheWatch(curator_watch, zk_ensemble.connect_string, "/services", SERVICE, CLASSES,
                       tmp_path_factory.mktemp("curator-watch") / "watch.log")
    try:
        watch.wait_for(lambda e: e["event"] == "ready", 30, "the Curator caches to start")
        yield watch
    finally:
        watch.close()


def run_agent(zk_ensemble, tmp_path: Path, watch: CacheWatch, pod: str, caches: list[str],
              **section) -> tuple[int, dict[str, list[dict]]]:
    """Start `registrar agent`, wait until every cache in ``caches`` lists
    ``pod``, SIGTERM it and note when it exited (the wall clock, as the
    watch's "t_us"). Returns (exit time, each cache's events)."""
    config = {"service": {"name": SERVICE, "id": pod, "address": "10.4.4.4", "port": 8080,
                          "tags": ["http"], "meta": {"version": "1"}},
              "backends": [{"type": "zookeeper", "hosts": zk_ensemble.hosts,
                            "session_timeout": "2s", "timeout": "1s", **section}],
              "stop": {"grace_period": "10s", "propagation_timeout": "5s",
                       "min_wait": f"{MIN_WAIT}s"},
              "control": {"listen": None},
              "health": False}  # no app listens here: register at once
    path = tmp_path / f"{pod}.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / f"{pod}.log"
    with open(log_path, "wb") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "registrar", "agent", "--config", str(path)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        for cache in caches:
            watch.wait_for(lambda e, c=cache: e.get("cache") == c and pod in listed(e), 20,
                           f"the {cache} cache to list {pod}")
        assert agent.poll() is None, log_path.read_text()
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=15)
        exited_us = wall_us()  # at or after the exit: a strict bound for "before exit"
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(timeout=10)
    text = log_path.read_text(errors="replace")
    assert code == 0, text
    for cache in caches:  # the lines may arrive after the exit; their t_us says when
        watch.wait_for(lambda e, c=cache: e.get("cache") == c and e["event"] == "changed"
                       and pod not in listed(e) and _after_listing(watch, c, pod, e), 10,
                       f"the {cache} cache to drop {pod}")
    per_cache = {c: [e for e in watch.snapshot() if e.get("cache") == c] for c in CLASSES}
    return exited_us, per_cache


def _after_listing(watch: CacheWatch, cache: str, pod: str, event: dict) -> bool:
    events = [e for e in watch.snapshot() if e.get("cache") == cache]
    first = next(i for i, e in enumerate(events) if pod in listed(e))
    return event in events[first + 1:]


def gone_before_exit(events: list[dict], pod: str, exited_us: int) -> int:
    """Microseconds between the cache dropping ``pod`` and the agent's exit
    (asserted positive)."""
    first = next(i for i, e in enumerate(events) if pod in listed(e))
    gone = next(e for e in events[first + 1:] if pod not in listed(e))
    margin = exited_us - gone["t_us"]
    assert margin > 0, f"the cache dropped {pod} {-margin} µs after the agent exited: {events}"
    return margin


def payloads(events: list[dict], pod: str) -> list:
    """Each distinct payload the cache listed for ``pod``, in order."""
    seen: list = []
    for e in events:
        for i in e.get("instances") or ():
            if i["id"] == pod and (not seen or seen[-1] != i["payload"]):
                seen.append(i["payload"])
    return seen


def test_map_payload_object_and_map_caches_see_it_come_and_go_void_never(
        zk_ensemble, watch, tmp_path):
    pod = f"pod-{uuid.uuid4().hex[:8]}"
    exited_us, events = run_agent(zk_ensemble, tmp_path, watch, pod, ["Object", "Map"])
    margins = {c: gone_before_exit(events[c], pod, exited_us) for c in ("Object", "Map")}
    for cache in ("Object", "Map"):
        seen = payloads(events[cache], pod)
        assert seen[0] == {"tags": ["http"], "meta": {"version": "1"}}, seen
        # The draining rewrite is followed at once by the removal: a cache
        # may read the node only once it is gone, so it is not asserted.
        assert all(p in (seen[0], {**seen[0], "status": "draining"}) for p in seen), seen
    # Void: the instance was never listed, though the cache was up throughout.
    assert not any(pod in listed(e) for e in events["Void"]), events["Void"]
    assert "Cannot cast java.util.LinkedHashMap to java.lang.Void" in watch.log, watch.log[-3000:]
    print(f"gone before exit by {margins} µs (min_wait {MIN_WAIT}s); draining seen: "
          f"{ {c: len(payloads(events[c], pod)) > 1 for c in margins} }")


def test_payload_none_every_cache_void_included_sees_it_come_and_go(zk_ensemble, watch, tmp_path):
    pod = f"pod-{uuid.uuid4().hex[:8]}"
    exited_us, events = run_agent(zk_ensemble, tmp_path, watch, pod, CLASSES,
                                       payload="none")
    margins = {c: gone_before_exit(events[c], pod, exited_us) for c in CLASSES}
    for cache in CLASSES:
        assert payloads(events[cache], pod) == [None], events[cache]
    print(f"gone before exit by {margins} µs (min_wait {MIN_WAIT}s)")
