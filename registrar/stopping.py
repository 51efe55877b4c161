"""The stop sequence (docs/design.md, "The stop sequence") and its report:
drain and deregister every backend in parallel, wait until every observer
has seen the removal, then ``min_wait``, all under one Deadline."""
from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from tenacity import RetryError, Retrying, retry_if_exception_type, wait_exponential

from ._threads import settled, spawn
from .clock import Clock, Deadline
from .config import StopConfig
from .connections import PROGRESS_EVERY, DrainReport
from .errors import MemberDown, RegistrarError, RegistryUnavailable
from .instance import Instance
from .plugin import POLL_FIRST, POLL_MAX, Observer
from .registration import BackendState, Slot
from .traffic import QuiescenceReport

log = logging.getLogger(__name__)

#: Past a deadline, how long to wait for worker threads that stop by
#: themselves at it to hand in their results.
_HAND_IN = 0.05
#: An observer whose member refuses connections for this long (asked at
#: least twice) is reported down instead of awaited.
DOWN_AFTER = 0.02


class _Down(str):
    """What _wait_gone returns for an observer whose member refuses
    connections: the error, for the report."""


class Cause(enum.Enum):
    """What began a stop."""
    PRESTOP = "preStop"
    SIGNAL = "signal"
    APP_EXIT = "app exit"
    FATAL = "fatal error"
    CALL = "call"


class Trigger(str):
    """What began the stop: the text operators read (in the report, the
    logs, Consul's maintenance reason) and its ``cause`` for control flow."""

    cause: Cause

    def __new__(cls, text: str, cause: Cause = Cause.CALL) -> Trigger:
        self = super().__new__(cls, text)
        self.cause = cause
        return self

    @classmethod
    def of(cls, trigger: str | Trigger) -> Trigger:
        """A Trigger as it is, or a caller's text as a CALL."""
        return trigger if isinstance(trigger, Trigger) else cls(trigger)

    @classmethod
    def prestop(cls, via: str) -> Trigger:
        return cls(f"preStop ({via})", Cause.PRESTOP)

    @classmethod
    def signal(cls, signum: int) -> Trigger:
        import signal

        return cls(signal.Signals(signum).name, Cause.SIGNAL)

    @classmethod
    def app_exit(cls, status: int) -> Trigger:
        return cls(f"app exited ({status})", Cause.APP_EXIT)

    @classmethod
    def fatal(cls, error: BaseException) -> Trigger:
        return cls(f"fatal error: {error}", Cause.FATAL)


@dataclass
class BackendReport:
    """What the stop sequence achieved on one backend."""
    name: str
    removed: bool = False
    confirmed: bool = False
    position: Any = None  # what deregister() returned: where the removal happened
    deregister_seconds: float | None = None
    propagation_seconds: float | None = None  # deregister() start -> last observer
    observers_confirmed: list[str] = field(default_factory=list)
    observers_unconfirmed: list[str] = field(default_factory=list)
    #: Refused connections after the removal: nothing listens there, so
    #: no consumer reads from them; not awaited.
    observers_down: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)
    #: Nothing of ours was in the registry: no write landed (nothing to
    #: remove; the stop is not failed for it), or the registry refused the
    #: registration (``rejected``: an error all the same).
    never_registered: bool = False
    rejected: bool = False

    @property
    def done(self) -> bool:
        """Whether this backend holds nothing of ours any more, as far as
        the stop can tell: confirmed by its observers, or never written."""
        return self.confirmed or (self.never_registered and not self.rejected)

    @property
    def outcome(self) -> str:
        """What the stop achieved here, for the report's line and the exit line."""
        return ("confirmed" if self.confirmed else "removed, unconfirmed" if self.removed
                else "never registered" if self.never_registered else "NOT removed")


@dataclass
class StopReport:
    """The outcome of the one stop sequence; every caller of stop() gets it."""
    trigger: str
    ok: bool
    seconds: float
    min_wait_seconds: float
    backends: list[BackendReport]
    cut: list[str] = field(default_factory=list)
    #: The wait for consumers to stop sending that followed (stop.quiesce).
    quiescence: QuiescenceReport | None = None
    #: The wait for the app's busy connections after it (agent, run).
    drain: DrainReport | None = None
    #: From the first trigger to the end of the last step, when known.
    total_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["trigger"] = str(self.trigger)
        return out

    def summary(self) -> str:
        """One line for logs and the preStop hook's output."""
        if not self.backends:  # a pod behind a Service only: nothing was deregistered
            seconds = self.seconds if self.total_seconds is None else self.total_seconds
            text = f"stopped after {self.trigger} in {seconds:.3f}s: no registry"
        else:
            head = ("stop incomplete" if not self.ok
                    else "nothing to deregister" if all(b.never_registered for b in self.backends)
                    else "deregistered")
            text = f"{head} after {self.trigger} in {self.seconds:.3f}s: {self.registries()}"
        if self.quiescence is not None:
            text += f"; consumers: {self.quiescence.summary()}"
        if self.drain is not None and (self.drain.waited_for or self.drain.cut or self.drain.left):
            text += f"; connections: {self.drain.summary()}"
        return text

    def registries(self) -> str:
        """What the registry steps achieved, per backend."""
        parts = []
        for b in self.backends:
            n_ok = len(b.observers_confirmed)
            n_all = n_ok + len(b.observers_unconfirmed) + len(b.observers_down)
            state = b.outcome
            prop = (f" in {b.propagation_seconds * 1000:.1f}ms"
                    if b.propagation_seconds is not None else "")
            down = f", {len(b.observers_down)} down" if b.observers_down else ""
            extra = f" ({'; '.join(b.errors + b.cut)})" if (b.errors or b.cut) else ""
            if b.never_registered:  # no observer was asked: there was nothing to watch go
                parts.append(f"{b.name}: {state}{extra}")
            else:
                parts.append(f"{b.name}: {state} {n_ok}/{n_all} observers{down}{prop}{extra}")
        return "; ".join(parts)


class StopSequence:
    """Runs the sequence over every slot; the caller has made sure no
    registration or heartbeat starts any more."""

    def __init__(self, instance: Instance, slots: list[Slot], config: StopConfig, clock: Clock):
        self.instance = instance
        self.slots = slots
        self.config = config
        self.clock = clock
        #: What each backend's removal is at, and its observers' waits: the
        #: progress line of a stop that takes longer than PROGRESS_EVERY.
        self._stage: dict[str, str] = {s.name: "starting" for s in slots}
        self._observing: dict[str, list] = {}
        #: The last failed attempt of a removal still being retried: what a
        #: report cut at the deadline says went wrong.
        self._failing: dict[str, str] = {}

    def run(self, trigger: Trigger, deadline: Deadline) -> StopReport:
        start = self.clock.now()
        log.info("stopping after %s: deregistering %s (budget %.1fs)", trigger,
                 self.instance.id, deadline.remaining(),
                 extra={"trigger": str(trigger), "seconds": round(deadline.remaining(), 3)})
        reports = [BackendReport(s.name) for s in self.slots]
        futures = [spawn(self._remove, s, r, deadline, trigger, name=f"deregister-{s.name}")
                   for s, r in zip(self.slots, reports, strict=True)]
        cut = []
        self._wait_noting_progress(futures, deadline)
        for future, report in zip(futures, reports, strict=True):
            if not settled(future, deadline.remaining() + _HAND_IN):
                if report.name in self._failing and not report.removed:
                    report.errors.append(f"deregister failed: {self._failing[report.name]}")
                report.cut.append("deadline reached before the backend finished")
        waited = 0.0
        if self.config.min_wait:
            waited = deadline.cap(self.config.min_wait)
            self.clock.sleep(waited)
            if waited < self.config.min_wait:
                cut.append(f"min_wait cut to {waited:.3f}s")
        for slot in self.slots:
            spawn(_close, slot, name=f"close-{slot.name}")
        ok = not cut and all(r.done and not r.cut for r in reports)
        report = StopReport(trigger, ok, self.clock.now() - start, waited, reports, cut)
        verdict = ("not all confirmed" if not ok
                   else "had nothing of ours" if all(r.never_registered for r in reports)
                   else "confirmed the removal")
        cuts = f"; {'; '.join(cut)}" if cut else ""
        (log.info if ok else log.error)("registries %s in %.3fs: %s", verdict, report.seconds,
                                        report.registries() + cuts)
        return report

    def _wait_noting_progress(self, futures: list, deadline: Deadline) -> None:
        """Wait for the backends, saying every PROGRESS_EVERY seconds which
        are still at it: a stop that waits on a stalled registry is not
        silent until its one error line."""
        # Bounded by rounds too, not only by the deadline: a test's fake
        # clock stands still while this waits in real time.
        for _round in range(int(deadline.remaining() / PROGRESS_EVERY) + 1):
            if deadline.expired:
                return
            if all(f.done() for f in futures):
                return
            first = next(f for f in futures if not f.done())
            if not settled(first, min(PROGRESS_EVERY, deadline.remaining())):
                if deadline.expired:
                    return
                pending = [self._awaited(s.name) for s, f in zip(self.slots, futures, strict=True)
                           if not f.done()]
                log.info("stopping: still waiting for %s (%.1fs of the budget left)",
                         "; ".join(pending), deadline.remaining(),
                         extra={"awaiting": pending, "seconds": round(deadline.remaining(), 3)})

    def _awaited(self, name: str) -> str:
        """What one backend's removal still waits for, in words."""
        stage = self._stage.get(name, "starting")
        if stage == "deregistering" and name in self._failing:
            return f"{name} (deregistering; last try: {self._failing[name]})"
        if stage != "confirming":
            return f"{name} ({stage})"
        left = [obs for obs, future in self._observing.get(name, ()) if not future.done()]
        return f"{name} (to be confirmed by {', '.join(left) or 'its observers'})"

    def _remove(self, slot: Slot, report: BackendReport, deadline: Deadline,
                trigger: Trigger) -> None:
        """drain + deregister one backend, then wait for its observers."""
        if slot.state == BackendState.REJECTED:
            # The registry refused the registration (credentials, ACL, a
            # newer incarnation owns the entry): nothing of ours is there,
            # and asking again with what it refused only repeats the refusal.
            report.never_registered = report.rejected = True
            report.errors.append(f"registration was rejected: {slot.last_error}")
            return
        slot.registered.clear()
        slot.state = BackendState.STOPPING
        self._stage[slot.name] = "a call in flight"
        # An in-flight heartbeat or registration finishes first (bounded by
        # the backend's request timeout), so its write cannot follow ours.
        if not slot.lock.acquire(timeout=deadline.remaining()):
            report.cut.append("a call in flight held the backend until the deadline")
            return
        try:
            begin = self.clock.now()
            # Nothing we wrote has landed: nothing of ours to drain, and one
            # removal attempt is enough (a write whose answer was lost may
            # have landed; if this attempt fails too, that entry ends with
            # its TTL, heartbeats having never begun). A stop that retried
            # here would hold, and fail, the stop of a pod that never was in
            # the registry.
            fresh = slot.never_landed()
            if not fresh:
                self._stage[slot.name] = "draining"
                try:
                    slot.backend.drain(str(trigger))
                except Exception as exc:  # a failed drain must not stop removal
                    report.errors.append(f"drain failed: {exc}")
                    log.warning("%s: drain failed, deregistering anyway: %s", slot.name, exc,
                                exc_info=not isinstance(exc, RegistrarError),
                                extra={"backend": slot.name})
            dereg_start = self.clock.now()
            self._stage[slot.name] = ("never registered: one removal attempt" if fresh
                                      else "deregistering")
            # Retrying past the TTL is pointless where the registry ends the
            # entry by itself by then (heartbeats stopped): see
            # expires_unaided. A deadline already reached allows one attempt.
            retry_for = (Deadline(dereg_start, self.clock) if fresh
                         else deadline if not slot.backend.expires_unaided
                         else Deadline(min(deadline.at, dereg_start + slot.backend.ttl),
                                       self.clock))
            try:
                report.position = self._retry_until(retry_for, slot.backend.deregister,
                                                    slot.name)
            except Exception as exc:  # reported, never raised into stop()
                error = exc.last_attempt.exception() if isinstance(exc, RetryError) else exc
                if fresh:
                    report.never_registered = True
                    report.errors.append(f"one removal attempt failed: {error}")
                    log.info("%s: never registered, and the one removal attempt failed: %s",
                             slot.name, error, extra={"backend": slot.name})
                    return
                report.errors.append(f"deregister failed: {error}")
                if isinstance(exc, RetryError):
                    report.cut.append("deregister")
                else:
                    log.error("%s: deregister failed: %s", slot.name, exc,
                              exc_info=not isinstance(exc, RegistrarError),
                              extra={"backend": slot.name})
                return
            report.removed = True
            report.deregister_seconds = self.clock.now() - begin
            slot.state = BackendState.DEREGISTERED
        finally:
            slot.lock.release()
        self._confirm(slot, report, deadline, dereg_start)

    def _retry_until(self, deadline: Deadline, fn: Callable[[], Any], name: str) -> Any:
        def failed(rs: Any) -> None:
            self._failing[name] = str(rs.outcome.exception())

        return Retrying(retry=retry_if_exception_type(RegistryUnavailable),
                        wait=wait_exponential(multiplier=0.05, max=0.5),
                        stop=lambda rs: deadline.remaining() < 0.05,
                        before_sleep=failed,
                        sleep=lambda s: self.clock.sleep(deadline.cap(s)))(fn)

    def _confirm(self, slot: Slot, report: BackendReport, deadline: Deadline,
                 since: float) -> None:
        """Wait until no observer sees the instance, each in its own thread
        through ``Observer.wait_gone()`` (a watch, a blocking query, or
        polling with backoff)."""
        try:
            observers = slot.backend.observers()
        except RegistrarError as exc:
            report.errors.append(f"no observers: {exc}")
            return
        timeout = self.config.propagation_timeout
        limit = (deadline if timeout is None
                 else Deadline(min(deadline.at, since + timeout), self.clock))
        futures = [spawn(self._wait_gone, o, report.position, limit, name=f"observe-{o.name}")
                   for o in observers]
        self._observing[slot.name] = [(o.name, f) for o, f in zip(observers, futures, strict=True)]
        self._stage[slot.name] = "confirming"
        last = since
        for obs, future in zip(observers, futures, strict=True):
            seen_gone_at = (future.result() if settled(future, limit.remaining() + _HAND_IN / 2)
                            else None)
            if isinstance(seen_gone_at, float):
                report.observers_confirmed.append(obs.name)
                last = max(last, seen_gone_at)
            elif isinstance(seen_gone_at, _Down):
                report.observers_down.append(obs.name)
                report.errors.append(f"{obs.name} is down: {seen_gone_at}")
                log.warning("%s: %s refuses connections: not waiting for it (%s)", slot.name,
                            obs.name, seen_gone_at,
                            extra={"backend": slot.name, "observer": obs.name})
            else:
                report.observers_unconfirmed.append(obs.name)
                if isinstance(seen_gone_at, str):
                    report.errors.append(f"{obs.name}: {seen_gone_at}")
        if report.observers_unconfirmed:
            why = "deadline" if limit.at == deadline.at else "propagation_timeout"
            report.cut.append(f"propagation ({why})")
        elif not report.observers_confirmed:
            report.cut.append("propagation (every observer is down)")
        else:
            # The removal is committed and every member still up has it; a
            # member that is down serves nobody until it is back, and then
            # it catches up from the others before it serves.
            report.confirmed = True
            report.propagation_seconds = last - since

    def _wait_gone(self, observer: Observer, position: Any,
                   limit: Deadline) -> float | str | None:
        """When the observer stopped seeing the instance, or the last error
        (a _Down once its member has refused connections for DOWN_AFTER).
        A failed wait is tried again after a pause that doubles from
        POLL_FIRST to POLL_MAX: a member that fails fast is not asked 500
        times a second."""
        error, refused_since, pause = None, None, POLL_FIRST
        while True:
            try:
                if observer.wait_gone(self.instance, position, limit):
                    return self.clock.now()
                return error  # the limit came first
            except MemberDown as exc:
                error = str(exc)
                now = self.clock.now()
                if refused_since is None:
                    refused_since = now
                elif now - refused_since >= DOWN_AFTER:
                    return _Down(error)
            except Exception as exc:  # noqa: BLE001 - keep asking until the limit
                error, refused_since = str(exc), None
            if limit.expired:
                return error
            if refused_since is not None:
                self.clock.sleep(limit.cap(DOWN_AFTER))
                continue
            self.clock.sleep(limit.cap(pause))
            pause = min(pause * 2, POLL_MAX)


def _close(slot: Slot) -> None:
    """Close a backend once no call is in it: after a deadline cut a
    removal may still be running, and closing under it would race it."""
    with slot.lock:
        slot.backend.close()
