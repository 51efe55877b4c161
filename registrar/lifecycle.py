"""What `agent` and `run` share: the one grace deadline, counted from the
first trigger (preStop, a signal, the app's exit), that every trigger's
stop joins (the stop itself is podstop.py's); the wait for the app's busy
connections they add to it; and the control server that serves /prestop
into it, and late /prestop calls after it."""
from __future__ import annotations

import errno
import logging
import signal

from .clock import Deadline
from .config import AgentConfig
from .connections import Drain
from .core import Registrar
from .errors import ConfigError, RegistrarError
from .fields import read_token
from .signals import SignalPipe
from .stopping import Cause, StopReport, Trigger

log = logging.getLogger(__name__)


class Lifecycle:
    """The first trigger fixes the deadline; every trigger joins one stop
    (podstop.py). ``reserve`` seconds of the budget are kept for what comes
    after the registry steps (the app's own shutdown in `run` mode). With a
    ``drain``, the stop then waits for the app's busy connections."""

    def __init__(self, registrar: Registrar, pipe: SignalPipe | None = None, reserve: float = 0.0,
                 drain: Drain | None = None):
        self.registrar = registrar
        self.pipe = pipe
        registrar.pod_stop.registry_reserve = reserve
        registrar.pod_stop.drain = drain
        self._triggers: list[tuple[Trigger, float]] = []

    def note(self, trigger: str | Trigger) -> None:
        self._triggers.append((Trigger.of(trigger), self.registrar.clock.now()))
        if self.pipe is not None:
            self.pipe.wake()

    @property
    def triggered(self) -> bool:
        return bool(self._triggers)

    @property
    def first(self) -> Trigger:
        return self._triggers[0][0]

    @property
    def first_at(self) -> float:
        return self._triggers[0][1]

    @property
    def deadline(self) -> Deadline:
        """The end of the whole stop budget, from the first trigger."""
        return Deadline.after(self.registrar.stop_config.budget, self.registrar.clock,
                              start=self.first_at)

    def stop(self, trigger: str | Trigger) -> StopReport:
        """Run or join the stop under the deadline of the first trigger;
        every caller gets the one report."""
        self.note(trigger)
        return self.registrar.stop(self.first, self.deadline)


def exit_line(code: int, report: StopReport | None, life: Lifecycle,
              app_status: int | None = None, fatal: BaseException | None = None,
              sent: int | None = None) -> None:
    """The last line of `agent` and `run`: the exit code and why, e.g.
    ``exiting 0: removed from 3/3 backends, app exited 0, 0.21s after SIGTERM``.
    A warning unless all went well: exit 0, or (``run``) an app that the
    signal it was ``sent`` ended after a complete stop (exit 143 for SIGTERM)."""
    parts = []
    if fatal is not None:
        parts.append(f"fatal error: {fatal}")
    if report is not None:
        if not report.backends:
            parts.append("no registry")
        else:
            # A backend that never registered counts as done, but not as removed.
            removed = [b for b in report.backends if b.done and not b.never_registered]
            notes = [f"{b.name}: {'rejected' if b.rejected else b.outcome}"
                     for b in report.backends if b not in removed]
            text = f"removed from {len(removed)}/{len(report.backends)} backends"
            parts.append(text + (f" ({'; '.join(notes)})" if notes else ""))
    if app_status is not None:
        text = f"app exited {app_status}"
        if app_status > 128:
            try:
                text += f" ({signal.Signals(app_status - 128).name})"
            except ValueError:
                pass
        parts.append(text)
    if life.triggered:
        seconds = life.registrar.clock.now() - life.first_at
        # A fatal error's text is already at the head of the line.
        after = "the fatal error" if life.first.cause is Cause.FATAL else str(life.first)
        parts.append(f"{seconds:.2f}s after {after}")
    clean = code == 0 or (sent is not None and code == 128 + sent and report is not None
                          and report.ok and fatal is None)
    (log.info if clean else log.warning)("exiting %d: %s", code, ", ".join(parts),
                                         extra={"exit_code": code})


def make_drain(registrar: Registrar, config: AgentConfig) -> Drain | None:
    """The wait for the app's connections that ``stop.drain_connections`` asks for."""
    stop = config.stop
    if stop.drain_connections == "none":
        return None
    clock = registrar.clock
    return Drain(registrar.instance.port, stop.drain_connections, stop.drain_quiet,
                 clock=clock.now, sleep=clock.sleep)


def serve_late_hooks(server, life: Lifecycle, linger: float, app_port: int | None) -> None:
    """After the stop, keep answering /prestop until no hook that could
    still come is left, within the deadline: every /prestop received is
    answered; ``linger`` passes from the first trigger (the preStop hooks of
    a pod's containers start with the deletion, when a regular sidecar gets
    its SIGTERM); and, with an app in the pod (``app_port``), the app stops
    listening: the kubelet signals a container only after its preStop hook
    returned, so while the app listens its hook may still be on its way --
    unless a /prestop was answered already (that was the app's hook) or
    ``linger`` is 0 (no hook calls /prestop: the app may keep listening
    until the deadline, and the agent must not wait for it)."""
    deadline = life.deadline
    window = min(deadline.at, life.first_at + linger)
    watch_app = app_port is not None and linger > 0
    told = False
    while not deadline.expired:
        if server.prestops_in_flight() == 0 and life.registrar.clock.now() >= window:
            if (not watch_app or server.responses_sent.is_set()
                    or not app_listening(app_port)):
                return
            if not told:
                log.info("control: answering /prestop while the app listens on port %d (its "
                         "preStop hook may still call): exiting once it stops listening, at "
                         "the latest in %.1fs (the grace deadline)", app_port,
                         deadline.remaining())
                told = True
        server.wait_changed(deadline.cap(0.05))


def app_listening(port: int) -> bool:
    """Whether a TCP socket listens on ``port`` in this network namespace
    (/proc/net/tcp{,6}: no connection to the app, which is shutting down)."""
    suffix = f":{port:04X}"
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f, None)  # the header
                for line in f:
                    fields = line.split(None, 4)
                    if len(fields) > 3 and fields[3] == "0A" and fields[1].endswith(suffix):
                        return True
        except OSError:
            continue
    return False


def serve_control(registrar: Registrar, config: AgentConfig, life: Lifecycle, ready=None):
    """The control server, started, or None when ``control.listen`` is null."""
    if config.control.listen is None:
        return None
    from .control import ControlServer, MetricsListenError

    token = (read_token(config.control.token_file, "control.token_file")
             if config.control.token_file else None)
    try:
        server = ControlServer(registrar, config.control.listen,
                               lambda: life.stop(Trigger.prestop("/prestop")), token=token,
                               ready=ready, metrics_listen=config.control.metrics_listen)
    except MetricsListenError as exc:
        raise _listen_error("control.metrics_listen", config.control.metrics_listen,
                            exc) from None
    except OSError as exc:
        raise _listen_error("control.listen", config.control.listen, exc) from None
    return server.start()


def _listen_error(key: str, address: str, exc: OSError) -> RegistrarError:
    """A port another process holds is not a mistake in the configuration
    (exit 1); an address this host does not have, or a socket path that
    cannot be made, is (exit 2)."""
    text = f"cannot listen on {address}: {exc.strerror or exc}"
    if exc.errno == errno.EADDRINUSE:
        return RegistrarError(f"{key}: {text} (another process holds it: a second agent in "
                              f"the pod, or the app?)")
    return ConfigError(key, text)
