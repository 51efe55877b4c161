"""`./dev demo` end to end on etcd: the rolling restart it plays must show
registrar losing no request, beside the naive way's loss, in its table.
And, without a registry, the parts of the bench the demo's --cache uses:
the cached consumer's copy and its schedule, and which requests were late."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scripts" / "demo.py"
APPS = ROOT / "bench" / "apps"


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_demo_rolling_restart_on_etcd(tmp_path):
    plot = tmp_path / "timeline.png"
    done = subprocess.run([sys.executable, str(DEMO), "--plot", str(plot)],
                          check=False, capture_output=True, text=True, timeout=180)
    out = done.stdout
    totals = {m["strategy"]: (int(m["sent"]), int(m["lost"])) for m in re.finditer(
        r"^(?P<strategy>naive|registrar) +all +(?P<sent>\d+) +(?P<lost>\d+) +stop p50", out,
        re.MULTILINE)}
    assert set(totals) == {"naive", "registrar"}, f"no closing table:\n{out}\n{done.stderr}"
    assert totals["registrar"][0] > 0 and totals["registrar"][1] == 0, out
    assert totals["naive"][1] > 0, out  # the TTL keeps a dead pod listed for 10 s
    assert done.returncode == 0, out + done.stderr
    if importlib.util.find_spec("matplotlib"):
        assert f"timeline plot: {plot}" in out and plot.stat().st_size > 0, out


@pytest.fixture
def consumer(monkeypatch):
    monkeypatch.syspath_prepend(str(APPS))  # it imports http_clients beside it
    return load(APPS / "consumer.py", "bench_consumer")


def test_cached_balancer_picks_from_its_copy_until_refreshed(consumer):
    truth, events = ["127.0.0.1:1", "127.0.0.1:2"], []
    cache = consumer.CachedBalancer(lambda: truth, 2.0, phase=0.5,
                                    notify=lambda kind, addr: events.append((kind, addr)))
    assert cache.pick() is None and events == []
    cache.refresh()
    assert events == [("add", "127.0.0.1:1"), ("add", "127.0.0.1:2")]
    truth = ["127.0.0.1:2", "127.0.0.1:3"]  # the registry changed: the copy did not
    assert {cache.pick() for _ in range(4)} == {"127.0.0.1:1", "127.0.0.1:2"}
    events.clear()
    cache.refresh()
    assert events == [("add", "127.0.0.1:3"), ("del", "127.0.0.1:1")]
    assert {cache.pick() for _ in range(4)} == {"127.0.0.1:2", "127.0.0.1:3"}
    events.clear()
    cache.refresh()  # nothing changed: nothing told
    assert events == [] and cache.refreshes == 3


def test_cached_balancer_schedule(consumer):
    cache = consumer.CachedBalancer(list, 2.0, phase=0.5, notify=lambda *_: None)
    # began + phase, then every ttl after it, whenever "now" is
    assert [cache.next_refresh(10.0, now) for now in (10.0, 10.49, 10.5, 12.49, 12.5, 20.0)] \
        == [10.5, 10.5, 12.5, 12.5, 14.5, 20.5]
    phases = {consumer.CachedBalancer(list, 2.0, notify=lambda *_: None).phase
              for _ in range(20)}
    assert all(0 <= p < 2.0 for p in phases) and len(phases) > 1  # drawn per consumer


def test_cached_balancer_refreshes_by_itself(consumer):
    truth, seen = ["127.0.0.1:1"], threading.Event()

    def notify(kind, addr):
        if (kind, addr) == ("del", "127.0.0.1:1"):
            seen.set()

    cache = consumer.CachedBalancer(lambda: truth, 0.05, notify=notify).start()
    try:
        assert cache.snapshot() == ["127.0.0.1:1"]  # start() took the first copy
        truth = []
        assert seen.wait(2.0) and cache.snapshot() == []
    finally:
        cache.stop()


@pytest.fixture
def report():
    """bench/rr/report.py, loaded as the demo loads it (as package "rr"), and
    unloaded after."""
    before = set(sys.modules)
    demo = load(DEMO, "registrar_demo")
    yield demo.load_bench_parts()[2]
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_late_requests_belong_to_the_pod_that_had_the_address(report):
    a, b = "127.0.0.1:1", "127.0.0.1:2"
    block = report.Block("etcd", "naive", "dies", t_go=0.0)
    # a is deleted at 5, its port taken again by a new pod at 8; b never deleted
    block.pods = [report.PodSpan(a, 0.0, 5.0), report.PodSpan(b, 0.0),
                  report.PodSpan(a, 8.0)]
    block.deletions = [5.0]
    recs = [[t, t, t + 0.1, addr, outcome, False, ""] for t, addr, outcome in [
        (4.0, a, "ok"), (4.95, a, "reset"),  # before the deletion (one cut in flight)
        (6.0, a, "refused"), (7.0, a, "ok"),  # late: after a's deletion
        (6.0, b, "ok"), (9.0, a, "ok"), (9.5, None, "no_instance")]]
    assert report.late_flags(block, recs) == [False, False, True, True, False, False, False]
    assert report.failed_after_deletions(block, recs) == [(5.0, 2)]
    block.records["cached 2s"] = recs
    block.cache_s = {"cached 2s": 2.0}
    (row,) = report.rows(block, ["cached 2s"])
    assert (row["late_requests"], row["late_failed"], row["failed"]) == (2, 1, 3)
    assert row["cache_s"] == 2.0 and row["failed_after_deletion"] == [2]
    assert "cached 2s" in report.table([row])
