"""Getting registered and staying registered: the background registration
on every backend, the heartbeats that keep the entries alive and repair
them, and taking the instance out of and back into rotation (the health
gate). Every call into a backend holds that backend's lock, so a
heartbeat's repair can never land after the stop sequence's removal.

"Registered" is never believed longer than the registry would keep the
entry without us: each write or heartbeat that lands vouches for the entry
until its start plus the TTL (the registry counts the TTL from when it
received the call, never earlier), and past that the slot reads "lost"
until a heartbeat's repair lands. A backend that learns its entry is gone
(a ZooKeeper session expired) says so at once: its ``registered`` reads False."""
from __future__ import annotations

import bisect
import enum
import logging
import random
import threading
import time
from datetime import UTC, datetime, timedelta
from collections.abc import Callable
from typing import Any

from tenacity import Retrying, retry_if_exception_type, stop_when_event_set, wait_exponential_jitter

from ._threads import spawn
from .clock import Clock
from .config import HeartbeatConfig
from .errors import RegistrarError, RegistryUnavailable
from .fields import format_duration
from .instance import Instance
from .plugin import Backend

log = logging.getLogger(__name__)

#: Retries after a failed registration or heartbeat back off up to this
#: (a heartbeat's, to its interval when that is longer).
BACKOFF_MAX = 5.0
#: Upper bounds (seconds) of the registration/heartbeat latency histogram.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class BackendState(enum.StrEnum):
    """Where one backend is, as /status shows it."""
    NEW = "new"
    REGISTERING = "registering"
    REGISTERED = "registered"
    #: Registered, but nothing has landed within the TTL (or the backend
    #: knows its entry is gone): consumers may no longer list us.
    LOST = "lost"
    REJECTED = "rejected"
    OUT_OF_ROTATION = "out of rotation"
    STOPPING = "stopping"
    DEREGISTERED = "deregistered"


class Slot:
    """The core's bookkeeping for one backend. ``lock`` serialises every
    call into the backend."""

    def __init__(self, backend: Backend, clock: Clock | None = None):
        self.backend = backend
        self.name = backend.name
        self.clock = clock or Clock()
        self.lock = threading.Lock()
        self.state = BackendState.NEW
        #: Set once registered (and while in rotation); see live() for now.
        self.registered = threading.Event()
        #: Until when (clock.now()) the last write or heartbeat that landed
        #: vouches for the entry.
        self.alive_until = float("-inf")
        self.last_error: str | None = None
        self.heartbeat_failures = 0
        self.repairs = 0
        #: The current run of failed heartbeats (what the log says of it).
        self.heartbeats = Failures(self, "heartbeat")
        #: Wall-clock time of the last write or heartbeat that landed, and
        #: how long that call took (registrar_last_heartbeat_*).
        self.last_landed_at: float | None = None
        self.last_call_seconds: float | None = None
        #: Every accepted call's duration, counted per LATENCY_BUCKETS
        #: bound (not cumulative) and summed: registrar_heartbeat_duration_seconds.
        self.call_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.call_seconds_sum = 0.0
        #: The registration is this process's to make (start() ran): while
        #: none of its writes has landed, the registry holds nothing of ours.
        #: False in the `deregister` command, which removes another's.
        self.ours = False

    def landed(self, started: float) -> None:
        """A write or heartbeat begun at ``started`` succeeded."""
        self.alive_until = started + self.backend.ttl
        self.last_landed_at = time.time()
        self.last_call_seconds = took = self.clock.now() - started
        self.call_counts[bisect.bisect_left(LATENCY_BUCKETS, took)] += 1
        self.call_seconds_sum += took

    def never_landed(self) -> bool:
        """Whether this process registers here and nothing it wrote has
        landed (a wrong endpoint, a registry down since the start, an app
        that never passed its health gate)."""
        return self.ours and self.alive_until == float("-inf")

    def live(self) -> bool:
        """Whether consumers list the entry, as far as we can know: registered,
        the backend has not seen it go, and the TTL has not run out."""
        return (self.state == BackendState.REGISTERED and self.backend.registered
                and self.clock.now() < self.alive_until)

    def current_state(self) -> BackendState:
        """``state``, with REGISTERED read as LOST once live() is False."""
        state = self.state
        return BackendState.LOST if state == BackendState.REGISTERED and not self.live() else state

    def lost_reason(self) -> str:
        """Why a REGISTERED slot reads LOST (for /readyz and logs)."""
        if not self.backend.registered:
            return "the registry dropped the entry; repairing"
        ago = self.clock.now() - (self.alive_until - self.backend.ttl)
        return (f"nothing has landed for {ago:.1f}s (TTL {self.backend.ttl:g}s): the entry "
                f"may be gone; repairing")


def _after(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


class Failures:
    """One run of failed calls (registering, or heartbeats): the log says
    when it begins, when the error changes, once a minute while it lasts
    and when it ends -- not once per try (a registry cut off for a minute
    with a 3 s TTL used to give 57 lines)."""

    #: While the same error goes on, one reminder this often.
    REMIND_EVERY = 60.0

    def __init__(self, slot: Slot, what: str):
        self.slot = slot
        self.what = what
        self.count = 0
        self.since: float | None = None
        self._error = ""
        self._said_at = 0.0
        #: Said that the entry may be gone (heartbeats past the TTL).
        self.lost = False

    def failed(self, exc: BaseException, retry_in: float) -> None:
        slot, now = self.slot, self.slot.clock.now()
        self.count += 1
        slot.last_error = error = str(exc)
        extra = {"backend": slot.name, "seconds": round(retry_in, 3)}
        retry = f"next try in {format_duration(retry_in)}"
        if self.since is None:
            self.since = now
            log.warning("%s: %s failed, retrying with backoff (%s): %s", slot.name, self.what,
                        retry, error, extra=extra)
        elif error != self._error:
            log.warning("%s: %s still failing, now: %s (%d tries over %s)", slot.name,
                        self.what, error, self.count, format_duration(now - self.since),
                        extra=extra)
        elif now - self._said_at >= self.REMIND_EVERY:
            log.warning("%s: %s still failing after %d tries over %s (%s): %s", slot.name,
                        self.what, self.count, format_duration(now - self.since), retry, error,
                        extra=extra)
        else:
            log.debug("%s: %s failed (try %d), %s: %s", slot.name, self.what, self.count, retry,
                      error, extra=extra)
            return
        self._error, self._said_at = error, now

    def note(self, message: str, *args: Any) -> None:
        """A change of state within the run (the entry may have expired)."""
        log.warning("%s: " + message,  # noqa: G003 - the caller's %-format; its args stay lazy
                    self.slot.name, *args, extra={"backend": self.slot.name})
        self._said_at = self.slot.clock.now()

    def succeeded(self) -> str:
        """Ends the run; what to add to the success's line, e.g. ``after 12
        failed over 41s`` ("" when nothing had failed)."""
        after = ("" if self.since is None else
                 f"after {self.count} failed over "
                 f"{format_duration(self.slot.clock.now() - self.since)}")
        self.count, self.since, self._error, self.lost = 0, None, "", False
        return after


class Stopping(Exception):
    """Raised inside a backend call attempted after stopping began."""


class Registration:
    """Registers on every slot in the background and heartbeats; ``halt()``
    ends both (the stop sequence takes over)."""

    def __init__(self, instance: Instance, slots: list[Slot], config: HeartbeatConfig,
                 stopping: threading.Event, on_fatal: Callable[[RegistrarError], None]):
        self.instance = instance
        self.slots = slots
        self.config = config
        self.stopping = stopping
        self.on_fatal = on_fatal
        self.paused = threading.Event()
        self._scheduler = None

    def start(self) -> None:
        if not self.slots:
            return  # no registry: nothing to register or heartbeat
        from apscheduler.schedulers.background import BackgroundScheduler

        # APScheduler logs its start and every job it adds at INFO: quiet in
        # the library too (the CLI's logs.setup does the same), unless the
        # app has set that logger's level itself.
        scheduler_log = logging.getLogger("apscheduler")
        if scheduler_log.level == logging.NOTSET:
            scheduler_log.setLevel(logging.WARNING)

        self._scheduler = BackgroundScheduler(
            daemon=True, job_defaults={"coalesce": True, "max_instances": 1,
                                       "misfire_grace_time": None})
        self._scheduler.start()
        for slot in self.slots:
            spawn(self._register_loop, slot, name=f"register-{slot.name}")

    def halt(self) -> None:
        """No further heartbeat starts (the caller has set ``stopping``)."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)

    def call(self, slot: Slot, fn: Callable[[], Any]) -> Any:
        """Call into a backend under its lock, unless stopping has begun."""
        with slot.lock:
            if self.stopping.is_set():
                raise Stopping()
            return fn()

    def _vouched(self, slot: Slot, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` (a register or heartbeat) noting when a call that landed began."""
        def call() -> Any:
            started = slot.clock.now()
            result = fn()
            slot.landed(started)
            return result
        return call

    # -- registering ------------------------------------------------------------

    def _register_loop(self, slot: Slot) -> None:
        slot.state = BackendState.REGISTERING
        failures = Failures(slot, "register")
        retrying = Retrying(
            retry=retry_if_exception_type(RegistryUnavailable),
            wait=wait_exponential_jitter(multiplier=0.1, max=BACKOFF_MAX, jitter=0.2),
            stop=stop_when_event_set(self.stopping),
            sleep=lambda s: self.stopping.wait(s),
            before_sleep=lambda rs: failures.failed(rs.outcome.exception(),
                                                    rs.next_action.sleep),
            reraise=True)
        try:
            retrying(self.call, slot, self._vouched(slot, slot.backend.register))
        except Stopping:
            return
        except RegistryUnavailable:
            return  # only reached when stopping began during the last attempt
        except RegistrarError as exc:
            slot.state, slot.last_error = BackendState.REJECTED, str(exc)
            log.error("%s: registration rejected: %s", slot.name, exc, extra={"backend": slot.name})
            self.on_fatal(exc)
            return
        if self.stopping.is_set():
            # The stop began while this registration was in flight: it waited
            # for it and now removes it. Claiming "registered" here would
            # overwrite the stop's state (and log out of order).
            log.info("%s: registered %s just as the stop began; the stop removes it",
                     slot.name, self.instance.service, extra={"backend": slot.name})
            return
        slot.state, slot.last_error = BackendState.REGISTERED, None
        slot.registered.set()
        after = failures.succeeded()
        log.info("%s: registered %s as %s%s", slot.name, self.instance.service,
                 self.instance.hostport, f" ({after})" if after else "",
                 extra={"backend": slot.name})
        self._first_heartbeat(slot)
        self._warm_observers(slot)  # after scheduling: a slow member must not delay heartbeats

    def _warm_observers(self, slot: Slot) -> None:
        """Ask every observer once now, so that their connections are open
        when the stop sequence needs them fast."""
        try:
            for observer in slot.backend.observers():
                observer.sees(self.instance)
        except Exception as exc:  # noqa: BLE001 - only a warm-up; the stop asks again
            log.debug("%s: observer warm-up: %s", slot.name, exc)

    # -- heartbeats -------------------------------------------------------------

    def _interval(self, slot: Slot) -> float:
        return self.config.interval or slot.backend.ttl / 3

    def _first_heartbeat(self, slot: Slot) -> None:
        """One job per slot whose next run each heartbeat sets when it ends
        (_next_heartbeat): one never overlaps another (a call slower than the
        interval used to make APScheduler warn at every tick), and a failing
        one backs off. Its own trigger (a day) never fires first; with a
        trigger that runs out (a date job) the scheduler would remove the job
        after each run, which races with halt()."""
        interval = self._interval(slot)
        try:
            self._scheduler.add_job(self._heartbeat, "interval", days=1, args=[slot],
                                    next_run_time=_after(interval),
                                    id=f"heartbeat-{slot.name}")
        except Exception:  # the scheduler was shut down by halt(): re-raised otherwise
            if not self.stopping.is_set():
                raise

    def _next_heartbeat(self, slot: Slot, delay: float) -> None:
        try:
            self._scheduler.modify_job(f"heartbeat-{slot.name}", next_run_time=_after(delay))
        except Exception:  # the scheduler was shut down by halt(): re-raised otherwise
            if not self.stopping.is_set():
                raise

    def _heartbeat(self, slot: Slot) -> None:
        interval = self._interval(slot)
        try:
            delay = self._beat(slot, interval)
        except Stopping:
            return
        except Exception:  # logged with its traceback: one heartbeat's bug must not end them
            log.exception("%s: heartbeat failed unexpectedly; next try in %s", slot.name,
                          format_duration(interval), extra={"backend": slot.name})
            delay = interval
        if not self.stopping.is_set():
            self._next_heartbeat(slot, delay)

    def _beat(self, slot: Slot, interval: float) -> float:
        """One heartbeat; returns when the next is due: the interval (less
        up to a tenth of it, at most 1 s, of jitter) after a heartbeat that
        landed; after failures, ever longer waits from 0.25 s up to
        BACKOFF_MAX (or the interval, if longer), with jitter, so that a
        fleet does not retry in step against a registry coming back."""
        healthy = interval - random.uniform(0, min(interval / 10, 1.0))
        out = slot.state == BackendState.OUT_OF_ROTATION
        if out or self.paused.is_set():
            if out != self.paused.is_set():  # a pause()/resume() that failed: again
                self._sync_rotation(slot)
            return healthy
        failures = slot.heartbeats
        try:
            repaired = self.call(slot, self._vouched(slot, slot.backend.heartbeat))
        except RegistrarError as exc:
            slot.heartbeat_failures += 1
            cap = max(BACKOFF_MAX, interval)
            # (2 ** 16 * 0.25 s is past any cap: the exponent stops there, so
            # that an outage of hours cannot overflow a float.)
            delay = min(cap, 0.25 * 2 ** min(failures.count, 16)) * random.uniform(0.8, 1.0)
            failures.failed(exc, delay)
            if not slot.live() and not failures.lost:
                failures.lost = True
                failures.note("%s (/readyz 503 until it lands)", slot.lost_reason())
            return delay
        slot.last_error = None
        after = failures.succeeded()
        if after:
            log.info("%s: heartbeats land again, %s", slot.name, after,
                     extra={"backend": slot.name})
        if repaired:
            slot.repairs += 1
            log.warning("%s: registration was lost and has been repaired", slot.name,
                        extra={"backend": slot.name})
        return healthy

    # -- out of rotation (the app's health gate) ----------------------------------

    def set_paused(self, paused: bool) -> None:
        """Bring every backend out of (or back into) rotation, in the background."""
        (self.paused.set if paused else self.paused.clear)()
        for slot in self.slots:
            spawn(self._sync_rotation, slot, name=f"rotation-{slot.name}")

    def _sync_rotation(self, slot: Slot) -> None:
        """Bring one backend to the wanted state, read under its lock so the
        last of several pause()/resume() calls wins."""
        def sync() -> None:
            if self.paused.is_set() and slot.state != BackendState.OUT_OF_ROTATION:
                slot.registered.clear()
                slot.backend.deregister()
                slot.state = BackendState.OUT_OF_ROTATION
            elif not self.paused.is_set() and slot.state == BackendState.OUT_OF_ROTATION:
                self._vouched(slot, slot.backend.register)()
                slot.state = BackendState.REGISTERED
                slot.registered.set()
        try:
            self.call(slot, sync)
        except Stopping:
            pass
        except RegistrarError as exc:  # the heartbeat job tries again
            slot.last_error = str(exc)
            log.warning("%s: could not change rotation, retrying at the next heartbeat: %s",
                        slot.name, exc, extra={"backend": slot.name})
