"""The Registrar: one instance on every backend, from registration to the
stop sequence. It wires the jobs together -- registration and heartbeats
(registration.py), the stop sequence (stopping.py), library signal handling
(signals.py) -- and answers for their state."""
from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._threads import settled, spawn
from .clock import Clock, Deadline
from .config import HeartbeatConfig, StopConfig
from .errors import ConfigError, RegistrarError, RegistrationRejected, RegistryUnavailable
from .fields import show
from .health import HealthGate, ProbeProcesses
from .instance import Instance
from .plugin import Backend
from .podstop import PodStop
from .registration import BackendState, Registration, Slot
from .signals import chain_stop_handlers
from .stopping import BackendReport, StopReport, Trigger
from .traffic import Traffic, default_ignored, networks

__all__ = ["Registrar", "StopReport", "BackendReport", "Trigger"]

log = logging.getLogger(__name__)


class Registrar:
    """Registers one instance on every backend and takes it out gracefully.

    ``start()`` registers in the background (retrying while a registry is
    unreachable) and heartbeats; ``stop()`` runs the stop sequence once and
    returns its :class:`StopReport` to every caller. Usable as a context
    manager: ``with Registrar.from_config("agent.yaml") as r: serve()``.

    With no backend (a pod behind a Kubernetes Service only) nothing is
    registered: start() gates readiness on the app, and stop() holds the
    pod until its consumers stop opening connections to it (podstop.py).
    """

    def __init__(self, instance: Instance, backends: Sequence[Backend], *,
                 heartbeat: HeartbeatConfig | None = None, stop: StopConfig | None = None,
                 clock: Clock | None = None,
                 on_fatal: Callable[[RegistrarError], None] | None = None,
                 environ: Mapping[str, str] | None = None):
        self.instance = instance
        self.heartbeat_config = heartbeat or HeartbeatConfig()
        self.stop_config = stop or StopConfig()
        self.clock = clock or Clock()
        self.on_fatal = on_fatal
        self._slots = [Slot(b, self.clock) for b in backends]
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._registration = Registration(instance, self._slots, self.heartbeat_config,
                                          self._stopping, self._fatal)
        self.traffic = _traffic(instance, self.stop_config, self.clock, environ)
        #: The stop, under one deadline (podstop.py); `agent` and `run` add
        #: their drain and the app's reserve to it.
        self.pod_stop = PodStop(instance, self._slots, self.stop_config, self.clock,
                                self.traffic)
        self._started = False
        self._gate: HealthGate | None = None  # made by start()
        self._app_running: Callable[[], bool] | None = None
        self._pause_reason = ""
        #: The validated configuration, when built by from_config().
        self.config = None

    @classmethod
    def from_config(cls, source: Any, environ: Mapping[str, str] | None = None,
                    **kwargs: Any) -> Registrar:
        """Build from a YAML file path or a mapping (validated in full first;
        raises ConfigError naming the field)."""
        from . import config

        cfg = config.load(source, environ)
        svc = cfg.service
        try:
            instance = Instance.create(svc.name, svc.port, id=svc.id, address=svc.address,
                                       tags=svc.tags, meta=svc.meta, environ=environ)
        except ValueError as exc:  # the id $POD_NAME (or the host name) gave
            raise ConfigError("service.id", "$POD_NAME: " + str(exc).removeprefix(
                "instance id: ")) from None
        # What the Downward API variables gave gets the checks the config's
        # own service.id and service.address get.
        if svc.address is None and not _is_ip(instance.address):
            # The Downward API's status.podIP, or an interface's address: an
            # IP address, never a name (service.address may be one).
            raise ConfigError("service.address", f"$POD_IP is {show(instance.address)}: not an "
                                                 f"IP address")
        backends = []
        for i, (backend_cls, section) in enumerate(cfg.backends):
            try:
                backends.append(backend_cls(instance, section))
            except ConfigError as exc:  # e.g. a secret file it could not read
                raise ConfigError(f"backends[{i}].{exc.path}" if exc.path else f"backends[{i}]",
                                  exc.message) from None
        registrar = cls(instance, backends, heartbeat=cfg.heartbeat, stop=cfg.stop,
                        environ=environ, **kwargs)
        registrar.config = cfg
        return registrar

    def _fatal(self, error: RegistrarError) -> None:
        if self.on_fatal:
            self.on_fatal(error)

    # -- starting -----------------------------------------------------------

    @property
    def backends(self) -> list[Backend]:
        return [s.backend for s in self._slots]

    @property
    def registered(self) -> bool:
        """True while registered on every backend and not stopping (and no
        registration is presumed lost: see Slot.live())."""
        return not self._stopping.is_set() and all(s.live() for s in self._slots)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def start(self, wait: bool = False, timeout: float | None = None, *, gate: bool = True,
              app_running: Callable[[], bool] | None = None,
              children: ProbeProcesses | None = None) -> Registrar:
        """Register on every backend in the background and start heartbeats.
        A registry that cannot be reached is retried with exponential backoff
        and jitter until it can. With ``wait=True``, block until registered
        everywhere: raise RegistrationRejected if a registry refused, or
        RegistryUnavailable after ``timeout`` seconds.

        Built by from_config() with a health gate (the default: the app's
        service.port accepts a connection), registration begins only once
        the app passes it, as in `agent` and `run`: a pod listed before its
        app listens loses requests (uvicorn, for one, runs the lifespan that
        calls start() before it binds). ``gate=False`` registers at once.

        `run` passes ``app_running`` (readiness is false once the app exited,
        and the gate stops probing) and the probes' ``children`` (its
        reaper leaves them alone)."""
        with self._lock:
            if self._stopping.is_set():
                raise RegistrarError("cannot start: the registrar is stopping or stopped")
            if app_running is not None:
                self._app_running = self.pod_stop.app_running = app_running
            for slot in self._slots:
                slot.ours = True
            self.watch_traffic()
            health = getattr(self.config, "health", None)
            if gate and health is not None and self._gate is None and not self._started:
                self._gate = HealthGate(self, health, self._stopping,
                                        self._app_running or (lambda: True), children)
                self._gate.start()  # calls start(gate=False) once the app passes
            elif not self._started and (self._gate is None or not gate):
                self._started = True
                if not self._slots:
                    log.info("no backends: %s/%s is registered nowhere; the stop will hold it "
                             "until its consumers stop opening connections to port %d",
                             self.instance.service, self.instance.id, self.instance.port)
                self._registration.start()
        if wait:
            self.wait_registered(timeout)
        return self

    def wait_registered(self, timeout: float | None = None) -> None:
        """Block until every backend is registered (see start())."""
        deadline = None if timeout is None else Deadline.after(timeout, self.clock)
        # With no registry, "registered" is the gate's verdict: the app serves.
        while not self._slots and not self._started:
            if self._stopping.is_set():
                raise RegistrarError("stopped before the app passed its health probe")
            if deadline is not None and deadline.expired:
                raise RegistryUnavailable(f"not ready after {timeout}s: waiting for the app: "
                                          f"{self._gate.last_failure if self._gate else ''}")
            self.clock.sleep(0.05 if deadline is None else deadline.cap(0.05))
        for slot in self._slots:
            while not slot.registered.wait(0.05 if deadline is None else deadline.cap(0.05)):
                if slot.state == BackendState.REJECTED:
                    raise RegistrationRejected(f"{slot.name}: {slot.last_error}")
                if self._stopping.is_set():
                    raise RegistrarError("stopped before the registration completed")
                if deadline is not None and deadline.expired:
                    if not self._started and self._gate is not None:
                        raise RegistryUnavailable(f"not registered after {timeout}s: waiting "
                                                  f"for the app: {self._gate.last_failure}")
                    raise RegistryUnavailable(
                        f"{slot.name}: not registered after {timeout}s: {slot.last_error}")

    @property
    def gate(self) -> HealthGate | None:
        """The health gate, once start() made it (None with ``health: false``)."""
        return self._gate

    def readiness(self) -> tuple[bool, str]:
        """Whether the instance is registered everywhere and not stopping,
        and if not, why: what /readyz answers, in every mode."""
        if self._app_running is not None and not self._app_running():
            return False, "the app is not running"
        if self._stopping.is_set():
            return False, "stopping"
        if not self._started:
            if self._gate is not None:
                return False, f"waiting for the app: {self._gate.last_failure}"
            return False, "not started"
        if not self.in_rotation:
            return False, f"out of rotation: {self._pause_reason}"
        waiting = []
        for s in self._slots:
            state = s.current_state()
            if state == BackendState.LOST:
                waiting.append(f"{s.name}: lost ({s.lost_reason()})")
            elif state != BackendState.REGISTERED:
                error = f" ({s.last_error})" if s.last_error else ""
                waiting.append(f"{s.name}: {state}{error}")
        if waiting:
            return False, "not registered on " + "; ".join(waiting)
        return True, "registered" if self._slots else "serving (no registry)"

    # -- out of rotation (the app's health gate) -------------------------------

    @property
    def in_rotation(self) -> bool:
        return not self._registration.paused.is_set()

    def pause(self, reason: str) -> None:
        """Take the instance out of rotation (the app is unhealthy): remove it
        from every backend without waiting for propagation; heartbeats hold
        off until resume()."""
        with self._lock:
            if not self.in_rotation or self._stopping.is_set():
                return
            self._pause_reason = reason
            self._registration.set_paused(True)
        log.warning("taking %s out of rotation: %s", self.instance.id, reason)

    def resume(self) -> None:
        """Put the instance back into rotation after pause()."""
        with self._lock:
            if self.in_rotation or self._stopping.is_set():
                return
            self._registration.set_paused(False)
        log.info("putting %s back into rotation", self.instance.id)

    # -- stopping -----------------------------------------------------------

    def watch_traffic(self) -> None:
        """Begin sampling the traffic on service.port (what stop.quiesce
        takes the consumers' rates from); start() does it."""
        if self.traffic is not None and not self._stopping.is_set():
            self.traffic.start()

    def stop(self, trigger: str | Trigger = "stop", deadline: Deadline | None = None) -> StopReport:
        """Take the instance out of every registry, wait until every observer
        has seen it, then (stop.quiesce) until consumers have stopped sending
        to service.port, under one deadline (default: the stop budget,
        grace_period - safety_margin, from now). Idempotent and thread-safe:
        concurrent and later callers wait for the same stop and get the same
        report (podstop.py)."""
        deadline = deadline or Deadline.after(self.stop_config.budget, self.clock)
        with self._lock:
            first = self.pod_stop.begin(deadline)
            if first:
                self._stopping.set()
        if not first:
            return self.pod_stop.result()
        self._registration.halt()
        began = min(self.clock.now(), deadline.at - self.stop_config.budget)
        return self.pod_stop.run(Trigger.of(trigger), began)

    @property
    def stop_deadline(self) -> Deadline | None:
        """The deadline of the stop, from its first trigger on."""
        return self.pod_stop.deadline

    @property
    def report(self) -> StopReport | None:
        """The stop report once the stop has finished, else None."""
        return self.pod_stop.report

    # -- status -------------------------------------------------------------

    def call_latencies(self) -> dict[str, tuple[list[int], float]]:
        """Per backend: how many accepted registrations and heartbeats took
        at most each of registration.LATENCY_BUCKETS (per bucket, the last
        past them all), and their total seconds."""
        return {s.name: (list(s.call_counts), s.call_seconds_sum) for s in self._slots}

    def status(self, observe: bool = True, timeout: float = 2.0) -> dict[str, Any]:
        """State per backend and, with ``observe``, what each observer sees."""
        out: dict[str, Any] = {
            "instance": self.instance.to_dict(),
            "state": "stopped" if self.pod_stop.report is not None
            else "stopping" if self._stopping.is_set()
            else "out of rotation" if self._started and not self.in_rotation
            else ("registered" if self._slots else "serving") if self.registered
            else "starting" if self._started else "idle",
            "backends": []}
        out["ready"], out["reason"] = self.readiness()
        for slot in self._slots:
            entry: dict[str, Any] = {"name": slot.name, "state": str(slot.current_state()),
                                     "heartbeat_failures": slot.heartbeat_failures,
                                     "repairs": slot.repairs, "last_error": slot.last_error,
                                     "last_landed_at": slot.last_landed_at,
                                     "last_call_seconds": slot.last_call_seconds}
            if observe:
                entry["observers"] = self._observe(slot, timeout)
            out["backends"].append(entry)
        if self.traffic is not None:
            # What the wait for consumers will go by: each peer's requests/s.
            rates = sorted(self.traffic.rates(look=True).items(), key=lambda kv: -kv[1])
            out["consumers"] = {ip: round(rate, 2) for ip, rate in rates[:20]}
        report = self.report
        if report is not None:
            out["stop"] = {"summary": report.summary(), "ok": report.ok,
                           "seconds": round(report.total_seconds or report.seconds, 3)}
            if report.quiescence is not None:
                out["stop"]["late"] = [p.__dict__ for p in report.quiescence.late[:20]]
        return out

    def _observe(self, slot: Slot, timeout: float) -> list[dict[str, Any]]:
        try:
            observers = slot.backend.observers()
        except RegistrarError as exc:
            return [{"name": slot.name, "error": str(exc)}]

        def ask(obs: Any) -> dict[str, Any]:
            try:
                return {"name": obs.name, "sees": obs.sees(self.instance)}
            except RegistrarError as exc:
                return {"name": obs.name, "error": str(exc)}

        futures = [(o, spawn(ask, o, name=f"status-{o.name}")) for o in observers]
        deadline = Deadline.after(timeout, self.clock)
        return [f.result() if settled(f, deadline.remaining())
                else {"name": o.name, "error": f"no answer within {timeout}s"}
                for o, f in futures]

    # -- signals (library use) ------------------------------------------------

    def install_signal_handlers(self,
                                signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """On SIGTERM/SIGINT, run the stop sequence in a thread (the app keeps
        serving while the removal propagates), then hand the signal to the
        handler that was installed before (or its default action: exit).

        Call it from the main thread, after the app's server has installed
        its own handlers (e.g. in an ASGI lifespan startup), so that the
        server's graceful shutdown starts only once the pod is out of every
        registry. Works whoever owns the main loop: nothing here blocks it.
        """
        chain_stop_handlers(lambda signum: self.stop(
            Trigger.signal(signum), Deadline.after(self.stop_config.budget, self.clock)), signals)

    # -- detaching and context manager ----------------------------------------

    def detach(self) -> None:
        """Stop heartbeats and close clients *without* deregistering: the
        entry lives on until its TTL (or session) ends. For one-shot use."""
        with self._lock:
            self._stopping.set()
        self._registration.halt()
        if self.traffic is not None:
            self.traffic.close()
        for slot in self._slots:
            with slot.lock:
                slot.backend.close()

    def __enter__(self) -> Registrar:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop(trigger="exit")


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _traffic(instance: Instance, stop: StopConfig, clock: Clock,
             environ: Mapping[str, str] | None) -> Traffic | None:
    """What stop.quiesce watches: the traffic on the instance's port."""
    if not stop.quiesce:
        return None
    import os

    ignore = stop.ignore_peers if stop.ignore_peers is not None else \
        default_ignored(os.environ if environ is None else environ)
    return Traffic([instance.port], ignore=networks(ignore), quiet_min=stop.quiet_min,
                   quiet_max=stop.quiet_max, clock=clock)
