"""The core (Registrar, stop sequence, deadline) against the in-memory backend."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from registrar import Instance, Registrar
from registrar.clock import Clock, Deadline
from registrar.config import HeartbeatConfig, StopConfig
from registrar.errors import RegistrarError, RegistrationRejected, RegistryUnavailable
from registrar_testing import wait_until
from registrar_testing.memory import (FakeClock, MemoryBackend, MemoryConfig, MemoryObserver,
                                      MemoryRegistry)

INSTANCE = Instance("web", "web-0", "10.0.0.5", 8080, tags=["a"], meta={"v": "1"})


def make(registry=None, *, ttl=1.0, stop=None, clock=None, backends=None, **kw):
    registry = registry or MemoryRegistry()
    backends = backends or [MemoryBackend(INSTANCE, MemoryConfig(type="memory", ttl=ttl), registry)]
    return Registrar(INSTANCE, backends, stop=stop or StopConfig(grace_period=5, safety_margin=1),
                     clock=clock, **kw), registry


def test_start_registers_and_stop_confirms_on_every_member():
    registrar, registry = make(MemoryRegistry(members=3, lag=0.05))
    registrar.start(wait=True, timeout=5)
    assert registrar.registered
    assert registry.committed("web-0") == "up"
    wait_until(lambda: all(registry.view(m, "web-0") for m in range(3)), 5,
               "every member lists web-0")
    report = registrar.stop()
    assert report.ok and report.trigger == "stop"
    (b,) = report.backends
    assert b.removed and b.confirmed and not b.cut and not b.errors
    assert len(b.observers_confirmed) == 3
    # The members lag 50 ms behind: the sequence waited for them.
    assert b.propagation_seconds >= 0.05
    assert all(registry.view(m, "web-0") is None for m in range(3))
    assert registry.calls[-2:] == ["drain", "deregister"]
    assert not registrar.registered


def test_start_retries_while_registry_unreachable(caplog):
    registrar, registry = make()
    registry.unavailable = True
    registrar.start()
    wait_until(lambda: registry.count("register") >= 3, 5, "three register calls")
    assert not registrar.registered
    registry.unavailable = False
    registrar.wait_registered(timeout=10)
    assert registrar.registered
    assert "register failed, retrying with backoff" in caplog.text
    registrar.stop()


def test_start_wait_times_out_with_registry_unavailable():
    registrar, registry = make()
    registry.unavailable = True
    with pytest.raises(RegistryUnavailable, match="not registered after 0.3s"):
        registrar.start(wait=True, timeout=0.3)
    registrar.stop()


def test_rejection_is_not_retried_and_is_fatal():
    fatal = []
    registrar, registry = make(on_fatal=fatal.append)
    registry.reject = True
    with pytest.raises(RegistrationRejected, match="refused register"):
        registrar.start(wait=True, timeout=5)
    assert registry.count("register") == 1
    assert len(fatal) == 1 and isinstance(fatal[0], RegistrationRejected)
    report = registrar.stop()
    # Nothing of ours is there: the stop does not ask again with what was refused.
    assert registry.count("drain") == registry.count("deregister") == 0
    assert not report.ok and report.backends[0].never_registered
    assert "memory: never registered (registration was rejected: " \
        in report.summary()


def test_heartbeats_run_and_repair():
    registrar, registry = make(ttl=0.3)  # heartbeat every 0.1 s
    registrar.start(wait=True, timeout=5)
    wait_until(lambda: registry.count("heartbeat") >= 2, 5, "two heartbeats")
    registry.write("web-0", None)  # the registry forgot us
    wait_until(lambda: registry.committed("web-0") == "up", 5, "web-0 is up")
    assert registrar.status(observe=False)["backends"][0]["repairs"] == 1
    registrar.stop()


def test_failed_heartbeats_are_counted_and_do_not_stop_the_agent(caplog):
    caplog.set_level(logging.INFO, logger="registrar.registration")
    registrar, registry = make(ttl=0.3, heartbeat=HeartbeatConfig(interval=0.05))
    registrar.start(wait=True, timeout=5)
    registry.unavailable = True
    wait_until(lambda: registrar.status(observe=False)["backends"][0]["heartbeat_failures"] >= 1,
               5, "a heartbeat failure")
    registry.unavailable = False
    before = registry.count("heartbeat")
    wait_until(lambda: registry.count("heartbeat") > before + 1, 5, "two more heartbeats")
    assert registrar.status(observe=False)["backends"][0]["last_error"] is None
    assert registrar.stop().ok
    # After the warnings, one line says they are over (not silence).
    back = [r.getMessage() for r in caplog.records if "heartbeats land again" in r.getMessage()]
    assert len(back) == 1 and back[0].startswith("memory: heartbeats land again, after "), back


def test_failing_heartbeats_back_off_and_say_so_once_per_change(caplog):
    # Issue 25: with a registry cut off and a 3 s TTL, the log had 57 lines a
    # minute (38 of them APScheduler's "skipped: maximum number of running
    # instances"). Now: one line when the failures begin, one when the entry
    # may have expired, one when they end; the tries back off in between.
    caplog.set_level(logging.DEBUG)
    registrar, registry = make(ttl=0.6, heartbeat=HeartbeatConfig(interval=0.05))
    registrar.start(wait=True, timeout=5)
    registry.unavailable = True
    began = time.monotonic()
    wait_until(lambda: registrar.status(observe=False)["backends"][0]["heartbeat_failures"] >= 4,
               10, "four failed heartbeats")
    tries = registrar.status(observe=False)["backends"][0]["heartbeat_failures"]
    # Backing off: 0.25 + 0.5 + 1 s (less jitter) between the first four tries,
    # where the interval alone would have made ~30.
    assert time.monotonic() - began >= 0.25 * 0.8 + 0.5 * 0.8 + 1.0 * 0.8
    registry.unavailable = False
    wait_until(lambda: any("heartbeats land again" in r.getMessage() for r in caplog.records),
               10, "heartbeats land again")
    assert registrar.stop().ok
    said = [r.getMessage() for r in caplog.records if r.name == "registrar.registration"
            and r.levelno >= logging.INFO and " registered " not in r.getMessage()]
    assert len(said) == 3, said
    assert said[0].startswith("memory: heartbeat failed, retrying with backoff (next try in ")
    assert "may be gone" in said[1] and "/readyz 503" in said[1]
    assert said[2].startswith("memory: heartbeats land again, after ")
    assert tries >= 4 and not [r for r in caplog.records if r.name.startswith("apscheduler")
                               and r.levelno >= logging.WARNING]


def test_a_heartbeat_that_raises_a_bug_does_not_end_the_heartbeats(caplog):
    # Each heartbeat arms the next: one that fails with something no backend
    # should raise (a bug) is logged with its traceback, and the next comes.
    registrar, registry = make(ttl=0.3)  # a heartbeat every 0.1 s
    backend = registrar.backends[0]
    real, calls = backend.heartbeat, []

    def buggy():
        calls.append(1)
        if len(calls) == 1:
            raise ZeroDivisionError("a bug")
        return real()

    backend.heartbeat = buggy
    registrar.start(wait=True, timeout=5)
    wait_until(lambda: len(calls) >= 3, 5, "heartbeats after the one that raised")
    assert registrar.stop().ok
    [record] = [r for r in caplog.records if "heartbeat failed unexpectedly" in r.getMessage()]
    assert record.exc_info and record.exc_info[0] is ZeroDivisionError


def test_concurrent_stop_runs_once_and_everyone_gets_the_same_report():
    registrar, registry = make(MemoryRegistry(lag=0.05))
    registrar.start(wait=True, timeout=5)
    reports = []
    threads = [threading.Thread(target=lambda: reports.append(registrar.stop("t")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(reports) == 8 and all(r is reports[0] for r in reports)
    assert registry.count("deregister") == 1
    assert registrar.stop() is reports[0]  # later callers too


def test_observer_that_never_confirms_is_cut_by_the_deadline():
    registrar, registry = make(MemoryRegistry(members=2))
    registrar.start(wait=True, timeout=5)
    registry.freeze(1)  # member 1 never applies the removal
    began = time.monotonic()
    report = registrar.stop(deadline=Deadline.after(0.3, Clock()))
    assert time.monotonic() - began < 1.0
    assert not report.ok
    (b,) = report.backends
    assert b.removed and not b.confirmed
    assert b.observers_confirmed == ["memory member 0"]
    assert b.observers_unconfirmed == ["memory member 1"]
    assert b.cut == ["propagation (deadline)"]
    assert "removed, unconfirmed 1/2 observers" in report.summary()


def test_propagation_timeout_applies_before_the_deadline():
    registrar, registry = make(MemoryRegistry(members=1),
                               stop=StopConfig(grace_period=30, propagation_timeout=0.2))
    registrar.start(wait=True, timeout=5)
    registry.freeze(0)
    began = time.monotonic()
    report = registrar.stop()
    assert time.monotonic() - began < 1.0
    assert report.backends[0].cut == ["propagation (propagation_timeout)"]


def test_registry_unreachable_at_stop_returns_by_the_deadline():
    registrar, registry = make()
    registrar.start(wait=True, timeout=5)
    registry.unavailable = True
    began = time.monotonic()
    report = registrar.stop(deadline=Deadline.after(0.5, Clock()))
    assert time.monotonic() - began < 1.0
    (b,) = report.backends
    assert not report.ok and not b.removed
    assert registry.count("deregister") > 1  # retried while the budget lasted
    assert any("deregister failed" in e for e in b.errors)


def test_a_hanging_backend_cannot_hold_stop_past_the_deadline():
    registrar, registry = make()
    registrar.start(wait=True, timeout=5)
    registry.hang.set()  # every call now blocks
    began = time.monotonic()
    report = registrar.stop(deadline=Deadline.after(0.3, Clock()))
    assert time.monotonic() - began < 1.0
    assert not report.ok
    assert "deadline reached before the backend finished" in report.backends[0].cut
    registry.release.set()


def test_a_stop_waiting_on_a_stalled_registry_says_so_every_second(caplog):
    registrar, registry = make()
    registrar.start(wait=True, timeout=5)
    registry.hang.set()
    with caplog.at_level(logging.INFO, logger="registrar.stopping"):
        report = registrar.stop(deadline=Deadline.after(2.5, Clock()))
    registry.release.set()
    assert not report.ok
    notes = [r.getMessage() for r in caplog.records if "still waiting for" in r.getMessage()]
    assert 1 <= len(notes) <= 2, notes  # about every second (at 1 s and 2 s), none after
    assert notes[0].startswith("stopping: still waiting for memory (draining)"), notes


def test_the_progress_line_names_the_observers_still_awaited(caplog):
    registry = MemoryRegistry(members=3)
    registrar, _ = make(registry)
    registrar.start(wait=True, timeout=5)
    registry.freeze(2)  # member 2 never applies the removal
    with caplog.at_level(logging.INFO, logger="registrar.stopping"):
        report = registrar.stop(deadline=Deadline.after(1.6, Clock()))
    assert not report.ok and report.backends[0].observers_unconfirmed == ["memory member 2"]
    notes = [r for r in caplog.records if "still waiting for" in r.getMessage()]
    assert notes and notes[0].getMessage().startswith(
        "stopping: still waiting for memory (to be confirmed by memory member 2) ("), notes
    assert notes[0].awaiting == ["memory (to be confirmed by memory member 2)"]  # a JSON log field


def test_no_heartbeat_lands_after_deregistration():
    registrar, registry = make(ttl=0.3, heartbeat=HeartbeatConfig(interval=0.02))
    registrar.start(wait=True, timeout=5)
    wait_until(lambda: registry.count("heartbeat") >= 1, 5, "a heartbeat")
    registry.hang.set()  # the next heartbeat is now in flight, holding the backend
    wait_until(lambda: registry.calls[-1] == "heartbeat", 5, "the last call is a heartbeat")
    stopper = threading.Thread(target=registrar.stop)
    stopper.start()
    time.sleep(0.05)
    assert registry.count("deregister") == 0  # waits for the heartbeat in flight
    registry.hang.clear()
    registry.release.set()
    stopper.join(5)
    assert registry.calls[-2:] == ["drain", "deregister"]
    count = len(registry.calls)
    time.sleep(0.1)
    assert len(registry.calls) == count
    assert registry.committed("web-0") is None


def test_min_wait_is_capped_by_the_deadline():
    clock = FakeClock()
    registrar, _ = make(clock=clock, stop=StopConfig(grace_period=30, min_wait=20))
    report = registrar.stop(deadline=Deadline.after(5, clock))
    assert 4.9 < report.min_wait_seconds <= 5
    assert not report.ok and report.cut == [f"min_wait cut to {report.min_wait_seconds:.3f}s"]


def test_min_wait_is_waited_in_full_when_the_budget_allows():
    clock = FakeClock()
    registrar, _ = make(clock=clock, stop=StopConfig(grace_period=30, min_wait=3))
    report = registrar.stop()
    assert report.ok and report.min_wait_seconds == 3 and report.seconds >= 3


def test_stop_without_start_still_deregisters():
    registrar, registry = make()
    registry.write("web-0", "up")  # registered by another process
    report = registrar.stop("deregister command")
    assert report.ok and registry.committed("web-0") is None


def test_stop_on_several_backends_runs_them_in_parallel():
    slow, fast = MemoryRegistry(lag=0.2), MemoryRegistry(lag=0.2)
    backends = [MemoryBackend(INSTANCE, MemoryConfig(type="memory", name=n), r)
                for n, r in (("slow", slow), ("fast", fast))]
    registrar, _ = make(backends=backends)
    registrar.start(wait=True, timeout=5)
    time.sleep(0.25)
    began = time.monotonic()
    report = registrar.stop()
    assert report.ok and [b.name for b in report.backends] == ["slow", "fast"]
    assert time.monotonic() - began < 0.38  # 0.2 each, in parallel


def test_backends_are_closed_after_stop():
    registrar, _ = make()
    registrar.start(wait=True, timeout=5)
    registrar.stop()
    wait_until(lambda: registrar.backends[0].closed, 5, "the backend is closed")


def test_context_manager_registers_and_stops():
    registrar, registry = make()
    with registrar as r:
        r.wait_registered(timeout=5)
        assert registry.committed("web-0") == "up"
    assert registry.committed("web-0") is None
    with pytest.raises(RegistrarError, match="stopping or stopped"):
        registrar.start()


def test_status_reports_what_each_observer_sees():
    registrar, registry = make(MemoryRegistry(members=2))
    registrar.start(wait=True, timeout=5)
    status = registrar.status()
    assert status["state"] == "registered"
    assert [o["sees"] for o in status["backends"][0]["observers"]] == [True, True]
    registry.unavailable = True
    assert all("unreachable" in o["error"] for o in registrar.status()["backends"][0]["observers"])
    registry.unavailable = False
    registrar.stop()
    assert registrar.status(observe=False)["state"] == "stopped"


def test_stop_logs_one_summary_line(caplog):
    caplog.set_level(logging.INFO, logger="registrar")
    registrar, _ = make()
    registrar.start(wait=True, timeout=5)
    registrar.stop("SIGTERM")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("deregistered")]
    assert len(lines) == 1 and "after SIGTERM" in lines[0] and "confirmed 3/3" in lines[0]


def test_pause_takes_the_instance_out_of_rotation_and_resume_puts_it_back():
    registrar, registry = make(ttl=0.3)
    registrar.start(wait=True, timeout=5)
    registrar.pause("health probe failed")
    wait_until(lambda: registry.committed("web-0") is None, 5, "web-0 is gone")
    assert not registrar.registered and not registrar.in_rotation
    status = registrar.status(observe=False)
    assert status["backends"][0]["state"] == "out of rotation"
    # What `registrar status` heads its answer with: the state and /readyz's reason.
    assert status["state"] == "out of rotation" and status["ready"] is False
    assert status["reason"] == "out of rotation: health probe failed", status
    beats = registry.count("heartbeat")
    time.sleep(0.25)
    assert registry.count("heartbeat") == beats  # nothing to keep alive meanwhile
    registrar.resume()
    wait_until(lambda: registrar.registered and registry.committed("web-0") == "up", 5,
               "registered and up")
    wait_until(lambda: registry.count("heartbeat") > beats, 5, "another heartbeat")
    assert registrar.stop().ok


def test_a_failed_resume_is_retried_by_the_heartbeat():
    registrar, registry = make(ttl=0.3)
    registrar.start(wait=True, timeout=5)
    registrar.pause("unhealthy")
    wait_until(lambda: registry.committed("web-0") is None, 5, "web-0 is gone")
    registry.unavailable = True
    registrar.resume()
    # The resume's own attempt failed.
    wait_until(lambda: registry.count("register") >= 2, 5, "a second register call")
    registry.unavailable = False
    wait_until(lambda: registrar.registered, 3, "registered again")
    registrar.stop()


def test_instance_defaults_come_from_the_downward_api():
    inst = Instance.create("web", 80, environ={"POD_NAME": "web-7", "POD_IP": "10.1.2.3"})
    assert (inst.id, inst.address, inst.hostport) == ("web-7", "10.1.2.3", "10.1.2.3:80")
    bare = Instance.create("web", 80, environ={})
    assert (bare.id and bare.address and not bare.address.startswith("127.")
            or bare.address == "127.0.0.1")
    v6 = Instance("web", "x", "fd00::1", 80)
    assert v6.hostport == "[fd00::1]:80"
    with pytest.raises(AttributeError):
        inst.port = 81  # frozen
    assert Instance("a", "b", "c", 1, tags=["t"]) == Instance("a", "b", "c", 1, tags=("t",))


# -- the registered state tells the truth (issue 14) -------------------------------------


def test_registered_state_is_not_believed_past_the_ttl_without_a_heartbeat():
    from registrar.metrics import Metrics

    registrar, registry = make(ttl=0.6, heartbeat=HeartbeatConfig(interval=0.1))
    registrar.start(wait=True, timeout=5)
    assert registrar.readiness() == (True, "registered")
    registry.unavailable = True
    failed_at = time.monotonic()
    # Nothing lands any more: once the TTL has run out since the last
    # heartbeat that did, the entry may be gone, and we must say so.
    wait_until(lambda: not registrar.readiness()[0], 5, "readiness turns false")
    # ... at the latest a TTL after the last heartbeat that landed began.
    assert registrar._slots[0].alive_until <= failed_at + 0.6
    ready, reason = registrar.readiness()
    assert "lost" in reason and "TTL 0.6s" in reason
    assert not registrar.registered
    assert registrar.status(observe=False)["backends"][0]["state"] == "lost"
    body = Metrics(registrar).render()[0].decode()
    assert 'registrar_registered{backend="memory"} 0.0' in body
    registry.unavailable = False
    wait_until(lambda: registrar.readiness()[0], 5, "ready again once a heartbeat landed")
    assert registrar.status(observe=False)["backends"][0]["state"] == "registered"
    assert 'registrar_registered{backend="memory"} 1.0' in Metrics(registrar).render()[0].decode()
    registrar.stop()


def test_a_backend_that_knows_its_entry_is_gone_is_not_ready_until_the_repair():
    registrar, registry = make(ttl=30, heartbeat=HeartbeatConfig(interval=0.2))
    registrar.start(wait=True, timeout=5)
    backend = registrar.backends[0]
    registry.unavailable = True
    backend.registered = False  # e.g. ZooKeeper: the session expired
    assert registrar.readiness()[0] is False
    assert "the registry dropped the entry" in registrar.readiness()[1]
    registry.unavailable = False
    wait_until(lambda: registrar.readiness()[0], 5, "ready once the heartbeat re-registered")
    assert registrar.status(observe=False)["backends"][0]["repairs"] >= 1
    registrar.stop()


def test_a_member_that_refuses_connections_is_reported_down_not_awaited():
    registrar, registry = make(MemoryRegistry(members=3),
                               stop=StopConfig(grace_period=10, safety_margin=1))
    registrar.start(wait=True, timeout=5)
    registry.down.add(2)
    started = time.monotonic()
    report = registrar.stop()
    assert time.monotonic() - started < 2  # not the 9 s budget
    (b,) = report.backends
    assert report.ok and b.confirmed
    assert b.observers_down == ["memory member 2"]
    assert len(b.observers_confirmed) == 2 and not b.observers_unconfirmed
    assert "1 down" in report.summary() and "connection refused" in report.summary()


def test_a_member_that_does_not_answer_is_awaited_until_the_deadline():
    registrar, registry = make(MemoryRegistry(members=3),
                               stop=StopConfig(grace_period=2, safety_margin=1))
    registrar.start(wait=True, timeout=5)
    registry.freeze(1)  # answers, but still lists us: it may be serving consumers
    started = time.monotonic()
    report = registrar.stop()
    assert time.monotonic() - started >= 0.9
    (b,) = report.backends
    assert not report.ok and b.observers_unconfirmed == ["memory member 1"]
    assert not b.observers_down


def test_every_member_down_is_not_a_confirmation():
    registrar, registry = make(MemoryRegistry(members=2))
    registrar.start(wait=True, timeout=5)
    registry.down.update({0, 1})
    report = registrar.stop()
    (b,) = report.backends
    assert b.removed and not b.confirmed and not report.ok
    assert "every observer is down" in report.summary()


class CountingObserver(MemoryObserver):
    """A member's view that counts the questions it was asked."""

    def __init__(self, registry, member):
        super().__init__(registry, member)
        self.asked = 0

    def sees(self, instance, since=None):
        self.asked += 1
        return super().sees(instance, since)


def test_a_lagging_member_is_asked_with_backoff_not_every_few_milliseconds():
    registry = MemoryRegistry(members=2, lag=0.0)
    observers = [CountingObserver(registry, m) for m in range(2)]
    backend = MemoryBackend(INSTANCE, MemoryConfig(type="memory", ttl=1.0), registry)
    backend.make_observers = lambda: observers
    registrar, _ = make(registry, backends=[backend],
                        stop=StopConfig(grace_period=5, safety_margin=1))
    registrar.start(wait=True, timeout=5)
    wait_until(lambda: all(registry.view(m, "web-0") for m in range(2)), 5, "listed")
    registry.freeze(1)  # member 1 applies the removal a second late
    thaw = threading.Timer(1.0, registry.frozen_at.pop, (1,))
    thaw.start()
    report = registrar.stop()
    thaw.join()
    (b,) = report.backends
    assert report.ok and b.propagation_seconds >= 1.0
    assert observers[0].asked <= 2
    # 2 ms doubling to 100 ms: ~16 questions in a second, not 500.
    assert observers[1].asked <= 25, observers[1].asked


class WatchingObserver(MemoryObserver):
    """An observer with a wait of its own (a backend's watch): the stop
    sequence calls it instead of polling sees()."""

    def __init__(self, registry, member):
        super().__init__(registry, member)
        self.waits, self.asked_after_removal = [], 0

    def sees(self, instance, since=None):
        if since is not None:
            self.asked_after_removal += 1
        return super().sees(instance, since)

    def wait_gone(self, instance, since, deadline):
        self.waits.append(since)
        return wait_until(lambda: self.registry.view(self.member, instance.id) is None,
                          deadline.remaining(), "gone") is True


def test_the_stop_waits_through_each_observers_wait_gone():
    registry = MemoryRegistry(members=2, lag=0.05)
    observers = [WatchingObserver(registry, m) for m in range(2)]
    backend = MemoryBackend(INSTANCE, MemoryConfig(type="memory", ttl=1.0), registry)
    backend.make_observers = lambda: observers
    registrar, _ = make(registry, backends=[backend])
    registrar.start(wait=True, timeout=5)
    wait_until(lambda: all(registry.view(m, "web-0") for m in range(2)), 5, "listed")
    report = registrar.stop()
    (b,) = report.backends
    assert report.ok and len(b.observers_confirmed) == 2
    assert [o.waits for o in observers] == [[b.position], [b.position]]
    assert all(o.asked_after_removal == 0 for o in observers)


def test_a_failing_wait_is_retried_with_backoff_until_the_deadline():
    clock = FakeClock()
    registry = MemoryRegistry(members=1, clock=clock)
    observer = CountingObserver(registry, 0)
    backend = MemoryBackend(INSTANCE, MemoryConfig(type="memory", ttl=1.0), registry)
    backend.make_observers = lambda: [observer]
    registrar, _ = make(registry, backends=[backend], clock=clock,
                        stop=StopConfig(grace_period=3, safety_margin=1, propagation_timeout=1))
    registrar.start(wait=True, timeout=5)
    registry.unavailable = True  # every question fails at once
    registry.call = lambda what: None  # ... but the removal itself lands
    asked = observer.asked
    report = registrar.stop()
    (b,) = report.backends
    assert b.removed and not b.confirmed and b.observers_unconfirmed == ["memory member 0"]
    assert any("unreachable" in e for e in b.errors)
    # One second of the propagation timeout, pauses doubling to 100 ms.
    assert observer.asked - asked <= 20, observer.asked - asked
