"""The Registrar: register on every backend, heartbeat, and the stop
sequence of DESIGN.md under one Deadline."""
from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

from tenacity import (RetryError, Retrying, retry_if_exception_type, stop_after_delay,
                      stop_when_event_set, wait_exponential, wait_exponential_jitter)

from .backend import Backend
from .clock import Clock, Deadline
from .config import HeartbeatConfig, StopConfig, format_duration
from .errors import ConfigError, RegistrarError, RegistrationRejected, RegistryUnavailable
from .instance import Instance

log = logging.getLogger(__name__)

#: Seconds between two polls of one observer while waiting for propagation.
POLL_INTERVAL = 0.002
#: Past a deadline, how long to wait for worker threads that stop by
#: themselves at it to hand in their results.
_HAND_IN = 0.05


@dataclass
class BackendReport:
    """What the stop sequence achieved on one backend."""
    name: str
    removed: bool = False
    confirmed: bool = False
    token: Any = None
    deregister_seconds: float | None = None
    propagation_seconds: float | None = None  # deregister() start -> last observer
    observers_confirmed: list[str] = field(default_factory=list)
    observers_unconfirmed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)


@dataclass
class StopReport:
    """The outcome of the one stop sequence; every caller of stop() gets it."""
    trigger: str
    ok: bool
    seconds: float
    min_wait_seconds: float
    backends: list[BackendReport]
    cut: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for logs and the preStop hook's output."""
        parts = []
        for b in self.backends:
            n_ok, n_all = len(b.observers_confirmed), len(b.observers_confirmed) + len(b.observers_unconfirmed)
            state = "confirmed" if b.confirmed else ("removed, unconfirmed" if b.removed else "NOT removed")
            prop = f" in {b.propagation_seconds * 1000:.1f}ms" if b.propagation_seconds is not None else ""
            extra = f" ({'; '.join(b.errors + b.cut)})" if (b.errors or b.cut) else ""
            parts.append(f"{b.name}: {state} {n_ok}/{n_all} observers{prop}{extra}")
        head = "deregistered" if self.ok else "stop incomplete"
        return f"{head} after {self.trigger} in {self.seconds:.3f}s: " + "; ".join(parts)


class _Slot:
    """The core's bookkeeping for one backend. ``lock`` serialises every
    call into the backend, so a heartbeat's repair can never land after the
    deregistration."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.name = backend.name
        self.lock = threading.Lock()
        self.state = "new"  # new, registering, registered, rejected, stopping, deregistered
        self.registered = threading.Event()
        self.last_error: str | None = None
        self.heartbeat_failures = 0
        self.repairs = 0


class Registrar:
    """Registers one instance on every backend and takes it out gracefully.

    ``start()`` registers in the background (retrying while a registry is
    unreachable) and heartbeats; ``stop()`` runs the stop sequence once and
    returns its :class:`StopReport` to every caller. Usable as a context
    manager: ``with Registrar.from_config("agent.yaml") as r: serve()``.
    """

    def __init__(self, instance: Instance, backends: Sequence[Backend], *,
                 heartbeat: HeartbeatConfig | None = None, stop: StopConfig | None = None,
                 clock: Clock | None = None,
                 on_fatal: Callable[[RegistrarError], None] | None = None):
        if not backends:
            raise ValueError("a Registrar needs at least one backend")
        self.instance = instance
        self.heartbeat_config = heartbeat or HeartbeatConfig()
        self.stop_config = stop or StopConfig()
        self.clock = clock or Clock()
        self.on_fatal = on_fatal
        self._slots = [_Slot(b) for b in backends]
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._paused = threading.Event()
        self._scheduler = None
        self._started = False
        self._stop_future: Future[StopReport] | None = None
        #: The validated configuration, when built by from_config().
        self.config = None
        #: The deadline of the stop sequence, from its first trigger on.
        self.stop_deadline: Deadline | None = None

    @classmethod
    def from_config(cls, source: Any, environ: Mapping[str, str] | None = None,
                    **kwargs: Any) -> "Registrar":
        """Build from a YAML file path or a mapping (validated in full first;
        raises ConfigError naming the field)."""
        from . import config

        cfg = config.load(source, environ)
        svc = cfg.service
        instance = Instance.create(svc.name, svc.port, id=svc.id, address=svc.address,
                                   tags=svc.tags, meta=svc.meta, environ=environ)
        backends = []
        for i, (backend_cls, section) in enumerate(cfg.backends):
            try:
                backends.append(backend_cls(instance, section))
            except ConfigError as exc:  # e.g. a secret file it could not read
                raise ConfigError(f"backends[{i}].{exc.path}" if exc.path else f"backends[{i}]",
                                  exc.message) from None
        registrar = cls(instance, backends, heartbeat=cfg.heartbeat, stop=cfg.stop, **kwargs)
        registrar.config = cfg
        return registrar

    # -- starting -----------------------------------------------------------

    @property
    def backends(self) -> list[Backend]:
        return [s.backend for s in self._slots]

    @property
    def registered(self) -> bool:
        """True while registered on every backend and not stopping."""
        return not self._stopping.is_set() and all(s.registered.is_set() for s in self._slots)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def start(self, wait: bool = False, timeout: float | None = None) -> "Registrar":
        """Register on every backend in the background and start heartbeats.
        A registry that cannot be reached is retried with exponential backoff
        and jitter until it can. With ``wait=True``, block until registered
        everywhere: raise RegistrationRejected if a registry refused, or
        RegistryUnavailable after ``timeout`` seconds."""
        from apscheduler.schedulers.background import BackgroundScheduler

        with self._lock:
            if self._stopping.is_set():
                raise RegistrarError("cannot start: the registrar is stopping or stopped")
            if not self._started:
                self._started = True
                self._scheduler = BackgroundScheduler(
                    daemon=True, job_defaults={"coalesce": True, "max_instances": 1,
                                               "misfire_grace_time": None})
                self._scheduler.start()
                for slot in self._slots:
                    _spawn(self._register_loop, slot, name=f"register-{slot.name}")
        if wait:
            self.wait_registered(timeout)
        return self

    def wait_registered(self, timeout: float | None = None) -> None:
        """Block until every backend is registered (see start())."""
        deadline = None if timeout is None else Deadline.after(timeout, self.clock)
        for slot in self._slots:
            while not slot.registered.wait(0.05 if deadline is None else deadline.cap(0.05)):
                if slot.state == "rejected":
                    raise RegistrationRejected(f"{slot.name}: {slot.last_error}")
                if self._stopping.is_set():
                    raise RegistrarError("stopped before the registration completed")
                if deadline is not None and deadline.expired:
                    raise RegistryUnavailable(
                        f"{slot.name}: not registered after {timeout}s: {slot.last_error}")

    def _register_loop(self, slot: _Slot) -> None:
        slot.state = "registering"
        retrying = Retrying(
            retry=retry_if_exception_type(RegistryUnavailable),
            wait=wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.2),
            stop=stop_when_event_set(self._stopping),
            sleep=lambda s: self._stopping.wait(s),
            before_sleep=lambda rs: self._note_failure(slot, "register", rs),
            reraise=True)
        try:
            retrying(self._call, slot, slot.backend.register)
        except _Stopping:
            return
        except RegistryUnavailable:
            return  # only reached when stopping began during the last attempt
        except RegistrarError as exc:
            slot.state, slot.last_error = "rejected", str(exc)
            log.error("%s: registration rejected: %s", slot.name, exc)
            if self.on_fatal:
                self.on_fatal(exc)
            return
        slot.state, slot.last_error = "registered", None
        slot.registered.set()
        log.info("%s: registered %s as %s", slot.name, self.instance.service, self.instance.hostport)
        interval = self.heartbeat_config.interval or slot.backend.ttl / 3
        try:
            self._scheduler.add_job(self._heartbeat, "interval", args=[slot, interval],
                                    seconds=interval, jitter=min(interval / 10, 1.0),
                                    id=f"heartbeat-{slot.name}")
        except Exception:  # noqa: BLE001 - the scheduler was shut down by stop()
            if not self._stopping.is_set():
                raise
        self._warm_observers(slot)  # after scheduling: a slow member must not delay heartbeats

    def _warm_observers(self, slot: _Slot) -> None:
        """Ask every observer once now, so that their connections are open
        when the stop sequence needs them fast."""
        try:
            for observer in slot.backend.observers():
                observer.sees(self.instance)
        except Exception as exc:  # noqa: BLE001 - only a warm-up; stop() asks again
            log.debug("%s: observer warm-up: %s", slot.name, exc)

    def _call(self, slot: _Slot, fn: Callable[[], Any]) -> Any:
        """Call into a backend under its lock, unless stopping has begun."""
        with slot.lock:
            if self._stopping.is_set():
                raise _Stopping()
            return fn()

    def _note_failure(self, slot: _Slot, what: str, rs: Any, level: int = logging.WARNING) -> None:
        exc = rs.outcome.exception()
        slot.last_error = str(exc)
        log.log(level, "%s: %s failed (attempt %d), retrying: %s", slot.name, what,
                rs.attempt_number, exc)

    # -- out of rotation (the app's health gate) -------------------------------

    @property
    def in_rotation(self) -> bool:
        return not self._paused.is_set()

    def pause(self, reason: str) -> None:
        """Take the instance out of rotation (the app is unhealthy): remove it
        from every backend without waiting for propagation; heartbeats hold
        off until resume()."""
        with self._lock:
            if self._paused.is_set() or self._stopping.is_set():
                return
            self._paused.set()
        log.warning("taking %s out of rotation: %s", self.instance.id, reason)
        for slot in self._slots:
            _spawn(self._sync_rotation, slot, name=f"rotation-{slot.name}")

    def resume(self) -> None:
        """Put the instance back into rotation after pause()."""
        with self._lock:
            if not self._paused.is_set() or self._stopping.is_set():
                return
            self._paused.clear()
        log.info("putting %s back into rotation", self.instance.id)
        for slot in self._slots:
            _spawn(self._sync_rotation, slot, name=f"rotation-{slot.name}")

    def _sync_rotation(self, slot: _Slot) -> None:
        """Bring one backend to the wanted state, read under its lock so the
        last of several pause()/resume() calls wins."""
        def sync() -> None:
            if self._paused.is_set() and slot.state != "out of rotation":
                slot.registered.clear()
                slot.backend.deregister()
                slot.state = "out of rotation"
            elif not self._paused.is_set() and slot.state == "out of rotation":
                slot.backend.register()
                slot.state = "registered"
                slot.registered.set()
        try:
            self._call(slot, sync)
        except _Stopping:
            pass
        except RegistrarError as exc:  # the heartbeat job tries again
            slot.last_error = str(exc)
            log.warning("%s: could not change rotation, retrying at the next heartbeat: %s",
                        slot.name, exc)

    def _heartbeat(self, slot: _Slot, interval: float) -> None:
        out = slot.state == "out of rotation"
        if out or self._paused.is_set():
            if out != self._paused.is_set():  # a pause()/resume() that failed: again
                self._sync_rotation(slot)
            return
        retrying = Retrying(
            retry=retry_if_exception_type(RegistryUnavailable),
            wait=wait_exponential(multiplier=0.1, max=1.0),
            stop=stop_after_delay(interval / 2) | stop_when_event_set(self._stopping),
            sleep=lambda s: self._stopping.wait(s),
            before_sleep=lambda rs: self._note_failure(slot, "heartbeat", rs, logging.DEBUG),
            reraise=True)
        try:
            repaired = retrying(self._call, slot, slot.backend.heartbeat)
        except _Stopping:
            return
        except RegistrarError as exc:
            slot.heartbeat_failures += 1
            slot.last_error = str(exc)
            log.warning("%s: heartbeat failed, next try in %s: %s", slot.name,
                        format_duration(interval), exc)
            return
        slot.last_error = None
        if repaired:
            slot.repairs += 1
            log.warning("%s: registration was lost and has been repaired", slot.name)

    # -- stopping -----------------------------------------------------------

    def stop(self, trigger: str = "stop", deadline: Deadline | None = None) -> StopReport:
        """Take the instance out of every registry and wait until every
        observer has seen it, under one deadline (default: grace_period -
        safety_margin from now). Idempotent and thread-safe: concurrent and
        later callers wait for the same sequence and get the same report."""
        with self._lock:
            first = self._stop_future is None
            if first:
                self._stop_future = Future()
                cfg = self.stop_config
                self.stop_deadline = deadline or Deadline.after(
                    cfg.grace_period - cfg.safety_margin, self.clock)
                self._stopping.set()
        if first:
            try:
                self._stop_future.set_result(self._stop_sequence(trigger, self.stop_deadline))
            except BaseException as exc:
                self._stop_future.set_exception(exc)
                raise
        return self._stop_future.result()

    @property
    def report(self) -> StopReport | None:
        """The stop report once the sequence has finished, else None."""
        future = self._stop_future
        if future is not None and future.done() and future.exception() is None:
            return future.result()
        return None

    def _stop_sequence(self, trigger: str, deadline: Deadline) -> StopReport:
        cfg = self.stop_config
        start = self.clock.now()
        log.info("stopping after %s: deregistering %s (budget %.1fs)", trigger,
                 self.instance.id, deadline.remaining())
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        reports = [BackendReport(s.name) for s in self._slots]
        futures = [_spawn(self._remove, s, r, deadline, trigger, name=f"deregister-{s.name}")
                   for s, r in zip(self._slots, reports)]
        cut = []
        for future, report in zip(futures, reports):
            if not _wait(future, deadline.remaining() + _HAND_IN):
                report.cut.append("deadline reached before the backend finished")
        waited = 0.0
        if cfg.min_wait:
            waited = deadline.cap(cfg.min_wait)
            self.clock.sleep(waited)
            if waited < cfg.min_wait:
                cut.append(f"min_wait cut to {waited:.3f}s")
        for slot in self._slots:
            _spawn(slot.backend.close, name=f"close-{slot.name}")
        ok = not cut and all(r.confirmed and not r.cut for r in reports)
        report = StopReport(trigger, ok, self.clock.now() - start, waited, reports, cut)
        (log.info if ok else log.error)("%s", report.summary())
        return report

    def _remove(self, slot: _Slot, report: BackendReport, deadline: Deadline,
                trigger: str) -> None:
        """drain + deregister one backend, then wait for its observers."""
        slot.registered.clear()
        slot.state = "stopping"
        # An in-flight heartbeat or registration finishes first (bounded by
        # the backend's request timeout), so its write cannot follow ours.
        if not slot.lock.acquire(timeout=deadline.remaining()):
            report.cut.append("a call in flight held the backend until the deadline")
            return
        try:
            begin = self.clock.now()
            try:
                slot.backend.drain(trigger)
            except Exception as exc:  # noqa: BLE001 - a failed drain must not stop removal
                report.errors.append(f"drain failed: {exc}")
                log.warning("%s: drain failed, deregistering anyway: %s", slot.name, exc,
                            exc_info=not isinstance(exc, RegistrarError))
            dereg_start = self.clock.now()
            # Retrying past the TTL is pointless: by then the entry has
            # expired by itself (heartbeats stopped).
            retry_for = Deadline(min(deadline.at, dereg_start + slot.backend.ttl), self.clock)
            try:
                report.token = self._retry_until(retry_for, slot.backend.deregister)
            except RetryError as exc:
                report.errors.append(f"deregister failed: {exc.last_attempt.exception()}")
                report.cut.append("deregister")
                return
            except Exception as exc:  # noqa: BLE001 - reported, never raised into stop()
                report.errors.append(f"deregister failed: {exc}")
                log.error("%s: deregister failed: %s", slot.name, exc,
                          exc_info=not isinstance(exc, RegistrarError))
                return
            report.removed = True
            report.deregister_seconds = self.clock.now() - begin
            slot.state = "deregistered"
        finally:
            slot.lock.release()
        self._confirm(slot, report, deadline, dereg_start)

    def _retry_until(self, deadline: Deadline, fn: Callable[[], Any]) -> Any:
        return Retrying(retry=retry_if_exception_type(RegistryUnavailable),
                        wait=wait_exponential(multiplier=0.05, max=0.5),
                        stop=lambda rs: deadline.remaining() < 0.05,
                        sleep=lambda s: self.clock.sleep(deadline.cap(s)))(fn)

    def _confirm(self, slot: _Slot, report: BackendReport, deadline: Deadline,
                 since: float) -> None:
        """Poll every observer until none sees the instance."""
        try:
            observers = slot.backend.observers()
        except RegistrarError as exc:
            report.errors.append(f"no observers: {exc}")
            return
        timeout = self.stop_config.propagation_timeout
        limit = deadline if timeout is None else Deadline(min(deadline.at, since + timeout), self.clock)
        futures = [_spawn(self._watch_gone, o, limit, name=f"observe-{o.name}") for o in observers]
        last = since
        for obs, future in zip(observers, futures):
            seen_gone_at = future.result() if _wait(future, limit.remaining() + _HAND_IN / 2) else None
            if isinstance(seen_gone_at, float):
                report.observers_confirmed.append(obs.name)
                last = max(last, seen_gone_at)
            else:
                report.observers_unconfirmed.append(obs.name)
                if isinstance(seen_gone_at, str):
                    report.errors.append(f"{obs.name}: {seen_gone_at}")
        if report.observers_unconfirmed:
            why = "deadline" if limit.at == deadline.at else "propagation_timeout"
            report.cut.append(f"propagation ({why})")
        else:
            report.confirmed = True
            report.propagation_seconds = last - since

    def _watch_gone(self, observer: Any, limit: Deadline) -> float | str | None:
        """When the observer stopped seeing the instance, or the last error."""
        error = None
        while True:
            try:
                if not observer.sees(self.instance):
                    return self.clock.now()
                error = None
            except Exception as exc:  # noqa: BLE001 - keep asking until the limit
                error = str(exc)
            if limit.expired:
                return error
            self.clock.sleep(limit.cap(POLL_INTERVAL))

    # -- status -------------------------------------------------------------

    def status(self, observe: bool = True, timeout: float = 2.0) -> dict[str, Any]:
        """State per backend and, with ``observe``, what each observer sees."""
        out: dict[str, Any] = {
            "instance": self.instance.to_dict(),
            "state": "stopped" if self._stop_future and self._stop_future.done()
            else "stopping" if self._stopping.is_set()
            else "registered" if self.registered else "starting" if self._started else "idle",
            "backends": []}
        for slot in self._slots:
            entry: dict[str, Any] = {"name": slot.name, "state": slot.state,
                                     "heartbeat_failures": slot.heartbeat_failures,
                                     "repairs": slot.repairs, "last_error": slot.last_error}
            if observe:
                entry["observers"] = self._observe(slot, timeout)
            out["backends"].append(entry)
        return out

    def _observe(self, slot: _Slot, timeout: float) -> list[dict[str, Any]]:
        try:
            observers = slot.backend.observers()
        except RegistrarError as exc:
            return [{"name": slot.name, "error": str(exc)}]

        def ask(obs: Any) -> dict[str, Any]:
            try:
                return {"name": obs.name, "sees": obs.sees(self.instance)}
            except RegistrarError as exc:
                return {"name": obs.name, "error": str(exc)}

        futures = [(o, _spawn(ask, o, name=f"status-{o.name}")) for o in observers]
        deadline = Deadline.after(timeout, self.clock)
        return [f.result() if _wait(f, deadline.remaining())
                else {"name": o.name, "error": f"no answer within {timeout}s"}
                for o, f in futures]

    # -- signals (library use) ------------------------------------------------

    def install_signal_handlers(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """On SIGTERM/SIGINT, run the stop sequence in a thread (the app keeps
        serving while the removal propagates), then hand the signal to the
        handler that was installed before (or its default action: exit).

        Call it from the main thread, after the app's server has installed
        its own handlers (e.g. in an ASGI lifespan startup), so that the
        server's graceful shutdown starts only once the pod is out of every
        registry. Works whoever owns the main loop: nothing here blocks it.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RegistrarError("install_signal_handlers() must be called from the main thread")
        previous = {sig: signal.getsignal(sig) for sig in signals}
        done: set[int] = set()  # signals re-delivered once the sequence finished
        # The handler only writes the signal's number to a pipe (no lock, no
        # thread start inside a signal handler); a thread waiting on the pipe
        # runs the sequence.
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)

        def handler(signum: int, frame: Any) -> None:
            if signum in done:  # the sequence is over: the app's turn
                old = previous[signum]
                if callable(old):
                    old(signum, frame)
                elif old != signal.SIG_IGN:
                    signal.signal(signum, signal.SIG_DFL)
                    os.kill(os.getpid(), signum)
                return
            try:
                os.write(write_fd, bytes([signum]))
            except BlockingIOError:
                pass  # a burst: the sequence is under way anyway

        def watch() -> None:
            while True:
                signum = os.read(read_fd, 1)[0]
                cfg = self.stop_config
                deadline = Deadline.after(cfg.grace_period - cfg.safety_margin, self.clock)
                self.stop(signal.Signals(signum).name, deadline)
                done.add(signum)
                os.kill(os.getpid(), signum)  # handled in the main thread, by the chain above

        threading.Thread(target=watch, name="registrar-signals", daemon=True).start()
        for sig in signals:
            signal.signal(sig, handler)

    # -- detaching and context manager ----------------------------------------

    def detach(self) -> None:
        """Stop heartbeats and close clients *without* deregistering: the
        entry lives on until its TTL (or session) ends. For one-shot use."""
        with self._lock:
            self._stopping.set()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        for slot in self._slots:
            with slot.lock:
                slot.backend.close()

    def __enter__(self) -> "Registrar":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop(trigger="exit")


class _Stopping(Exception):
    """Raised inside a backend call attempted after stopping began."""


def _spawn(fn: Callable[..., Any], *args: Any, name: str) -> Future:
    """Run fn in a daemon thread: a call stuck on a dead registry must never
    keep the process from exiting before SIGKILL."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def _wait(future: Future, timeout: float) -> bool:
    try:
        future.exception(timeout=max(timeout, 0))
        return True
    except TimeoutError:
        return False
