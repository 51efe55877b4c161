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

import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from tenacity import (Retrying, retry_if_exception_type, stop_after_delay, stop_when_event_set,
                      wait_exponential, wait_exponential_jitter)

from ._threads import spawn
from .clock import Clock
from .config import HeartbeatConfig
from .errors import RegistrarError, RegistryUnavailable
from .fields import format_duration
from .instance import Instance
from .plugin import Backend

log = logging.getLogger(__name__)


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
        #: Wall-clock time of the last write or heartbeat that landed, and
        #: how long that call took (registrar_last_heartbeat_*).
        self.last_landed_at: float | None = None
        self.last_call_seconds: float | None = None
        #: When the current run of failed heartbeats began, and how many
        #: (for the line that says they land again).
        self.failing_since: float | None = None
        self.failing_count = 0
        #: The registration is this process's to make (start() ran): while
        #: none of its writes has landed, the registry holds nothing of ours.
        #: False in the `deregister` command, which removes another's.
        self.ours = False

    def landed(self, started: float) -> None:
        """A write or heartbeat begun at ``started`` succeeded."""
        self.alive_until = started + self.backend.ttl
        self.last_landed_at = time.time()
        self.last_call_seconds = self.clock.now() - started

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
        retrying = Retrying(
            retry=retry_if_exception_type(RegistryUnavailable),
            wait=wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.2),
            stop=stop_when_event_set(self.stopping),
            sleep=lambda s: self.stopping.wait(s),
            before_sleep=lambda rs: self._note_failure(slot, "register", rs),
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
        log.info("%s: registered %s as %s", slot.name, self.instance.service, self.instance.hostport,
                 extra={"backend": slot.name})
        interval = self.config.interval or slot.backend.ttl / 3
        try:
            self._scheduler.add_job(self._heartbeat, "interval", args=[slot, interval],
                                    seconds=interval, jitter=min(interval / 10, 1.0),
                                    id=f"heartbeat-{slot.name}")
        except Exception:  # noqa: BLE001 - the scheduler was shut down by halt()
            if not self.stopping.is_set():
                raise
        self._warm_observers(slot)  # after scheduling: a slow member must not delay heartbeats

    def _warm_observers(self, slot: Slot) -> None:
        """Ask every observer once now, so that their connections are open
        when the stop sequence needs them fast."""
        try:
            for observer in slot.backend.observers():
                observer.sees(self.instance)
        except Exception as exc:  # noqa: BLE001 - only a warm-up; the stop asks again
            log.debug("%s: observer warm-up: %s", slot.name, exc)

    def _note_failure(self, slot: Slot, what: str, rs: Any, level: int = logging.WARNING) -> None:
        exc = rs.outcome.exception()
        slot.last_error = str(exc)
        log.log(level, "%s: %s failed (attempt %d), retrying: %s", slot.name, what,
                rs.attempt_number, exc)

    # -- heartbeats -------------------------------------------------------------

    def _heartbeat(self, slot: Slot, interval: float) -> None:
        out = slot.state == BackendState.OUT_OF_ROTATION
        if out or self.paused.is_set():
            if out != self.paused.is_set():  # a pause()/resume() that failed: again
                self._sync_rotation(slot)
            return
        # While the entry may be gone, retry closer together and for most of
        # the interval: the repair lands within moments of the registry's
        # return instead of at the next tick.
        live = slot.live()
        retrying = Retrying(
            retry=retry_if_exception_type(RegistryUnavailable),
            wait=wait_exponential(multiplier=0.1, max=1.0 if live else 0.25),
            stop=stop_after_delay(interval * (0.5 if live else 0.9))
            | stop_when_event_set(self.stopping),
            sleep=lambda s: self.stopping.wait(s),
            before_sleep=lambda rs: self._note_failure(slot, "heartbeat", rs, logging.DEBUG),
            reraise=True)
        try:
            repaired = retrying(self.call, slot, self._vouched(slot, slot.backend.heartbeat))
        except Stopping:
            return
        except RegistrarError as exc:
            slot.heartbeat_failures += 1
            slot.failing_count += 1
            if slot.failing_since is None:
                slot.failing_since = slot.clock.now()
            slot.last_error = str(exc)
            lost = "" if slot.live() else f"; {slot.lost_reason()}"
            log.warning("%s: heartbeat failed, next try in %s: %s%s", slot.name,
                        format_duration(interval), exc, lost,
                        extra={"backend": slot.name, "seconds": interval})
            return
        slot.last_error = None
        if slot.failing_since is not None:
            log.info("%s: heartbeats land again, after %d failed over %s", slot.name,
                     slot.failing_count,
                     format_duration(slot.clock.now() - slot.failing_since),
                     extra={"backend": slot.name})
            slot.failing_since, slot.failing_count = None, 0
        if repaired:
            slot.repairs += 1
            log.warning("%s: registration was lost and has been repaired", slot.name,
                        extra={"backend": slot.name})

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
