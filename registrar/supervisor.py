"""The long-running modes: `registrar agent` (sidecar) and `registrar run`
(PID-1 wrapper around the app), and the one grace deadline they share.

Signal handlers only note the signal and wake the main thread; the stop
sequence runs once, whoever triggers it first (preStop, SIGTERM, the app's
exit), and the deadline counts from that first trigger.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import threading
from collections.abc import Sequence
from typing import Any

from .clock import Deadline
from .config import Config, HealthConfig, parse_listen, read_token, signal_named
from .core import Registrar, StopReport
from .errors import ConfigError, RegistrarError

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class Waker:
    """Wakes the main thread, from signal handlers and from other threads,
    without a lock anywhere: the interpreter's own C-level handler writes
    each signal's number to a socket (``signal.set_wakeup_fd``); threads
    write a zero byte. (A Python handler that sets a threading.Event can
    deadlock when the signal lands while the main thread holds that Event's
    lock.)"""

    def __init__(self, signals: Sequence[int]):
        self._r, self._w = socket.socketpair()
        for sock in (self._r, self._w):
            sock.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, _noted_by_wakeup_fd)

    def wake(self) -> None:
        try:
            self._w.send(b"\0")
        except OSError:
            pass  # full: a wake-up is pending anyway

    def wait(self, timeout: float | None = None) -> list[int]:
        """Block until woken (or timeout); the signal numbers received."""
        ready, _, _ = select.select([self._r], [], [], timeout)
        if not ready:
            return []
        try:
            data = self._r.recv(4096)
        except BlockingIOError:
            return []
        return [n for n in data if n]

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        self._r.close()
        self._w.close()


def _noted_by_wakeup_fd(signum: int, frame: Any) -> None:
    """A Python-level handler must exist for the wake-up fd to get the
    signal; the work happens in the main loop."""


class Lifecycle:
    """The first trigger fixes the deadline; every trigger joins one stop.
    ``reserve`` seconds of the grace period are kept for what comes after the
    registry steps (the app's own shutdown in `run` mode)."""

    def __init__(self, registrar: Registrar, waker: Waker | None = None, reserve: float = 0.0):
        self.registrar = registrar
        self.waker = waker
        self.reserve = reserve
        self._triggers: list[tuple[str, float]] = []

    def note(self, trigger: str) -> None:
        self._triggers.append((trigger, self.registrar.clock.now()))
        if self.waker is not None:
            self.waker.wake()

    @property
    def triggered(self) -> bool:
        return bool(self._triggers)

    @property
    def first_at(self) -> float:
        return self._triggers[0][1]

    @property
    def deadline(self) -> Deadline:
        """The end of the whole grace budget, from the first trigger."""
        cfg = self.registrar.stop_config
        return Deadline.after(cfg.grace_period - cfg.safety_margin, self.registrar.clock,
                              start=self._triggers[0][1])

    def stop(self, trigger: str) -> StopReport:
        """Run or join the stop sequence (the registry steps end ``reserve``
        seconds before the deadline)."""
        self.note(trigger)
        first = self._triggers[0][0]
        end = self.deadline
        return self.registrar.stop(first, Deadline(end.at - self.reserve, end.clock))


def _control(registrar: Registrar, config: Config, life: Lifecycle, ready=None):
    if config.control.listen is None:
        return None
    from .control import ControlServer

    token = (read_token(config.control.token_file, "control.token_file")
             if config.control.token_file else None)
    try:
        server = ControlServer(registrar, config.control.listen,
                               lambda: life.stop("preStop (/prestop)"), token=token, ready=ready)
    except OSError as exc:
        raise ConfigError("control.listen", f"cannot listen on {config.control.listen}: "
                                            f"{exc.strerror or exc}") from None
    return server.start()



def run_agent(registrar: Registrar, config: Config) -> int:
    """Sidecar: register, heartbeat, serve /prestop; exit on SIGTERM/SIGINT
    (0 when the removal was confirmed everywhere). After a /prestop the
    agent stays up, out of every registry, until its own SIGTERM."""
    waker = Waker(STOP_SIGNALS)
    life = Lifecycle(registrar, waker)
    fatal: list[Exception] = []
    registrar.on_fatal = lambda exc: (fatal.append(exc), waker.wake())
    server = _control(registrar, config, life)
    registrar.start()
    log.info("agent started for %s (%s)", registrar.instance.id, registrar.instance.hostport)
    # A /prestop runs the sequence without ending the agent: it exits on a
    # signal (the kubelet's SIGTERM follows the hook) or a fatal error.
    signals: list[int] = []
    while not (signals or fatal):
        signals = waker.wait()
    if signals:
        report = life.stop(signal.Signals(signals[0]).name)
    else:
        report = life.stop(f"fatal error: {fatal[0]}")
    if server is not None:
        if signals and not server.responses_sent.is_set():
            # A regular sidecar gets its SIGTERM the moment the app's preStop
            # hook starts calling it: keep answering that late caller a while.
            linger = Deadline(min(life.deadline.at, life.first_at + config.control.linger),
                              registrar.clock)
            server.responses_sent.wait(linger.remaining())
        server.close()
    waker.close()
    return 0 if report.ok and not fatal else 1


class Wrapper:
    """`registrar run -- CMD`: PID 1 around the app. Starts it, registers it
    (once healthy, with a health gate), and on SIGTERM/SIGINT/(/prestop)
    deregisters and waits for propagation *before* signalling the app; reaps
    every zombie; forwards SIGHUP/SIGUSR1/SIGUSR2; exits with the app's status.
    ``stop.app_shutdown`` of the grace period is kept for the app itself."""

    def __init__(self, registrar: Registrar, config: Config, argv: Sequence[str]):
        self.registrar = registrar
        self.config = config
        self.argv = list(argv)
        self.waker: Waker | None = None
        self.life: Lifecycle | None = None
        self.app: subprocess.Popen | None = None
        self.app_status: int | None = None
        self._spawn_lock = threading.Lock()  # the reaper never steals a probe's child
        self._probe_pids: set[int] = set()
        self._done = threading.Event()  # the stop sequence has finished

    def run(self) -> int:
        self.waker = Waker(STOP_SIGNALS + FORWARDED_SIGNALS + (signal.SIGCHLD,))
        stop = self.config.stop
        reserve = min(stop.app_shutdown, (stop.grace_period - stop.safety_margin) / 2)
        self.life = Lifecycle(self.registrar, self.waker, reserve=reserve)
        health = self.config.health
        server = _control(self.registrar, self.config, self.life,
                          ready=lambda: self.registrar.registered and self._app_running())
        try:
            self.app = subprocess.Popen(self.argv, process_group=0)
        except OSError as exc:
            log.error("cannot start %s: %s", self.argv[0], exc.strerror)
            return 127
        log.info("started %s (pid %d)", " ".join(self.argv), self.app.pid)
        if health is None:
            self.registrar.start()
        else:
            threading.Thread(target=self._health_loop, args=(health,), name="health",
                             daemon=True).start()
        code = self._main_loop(server)
        if server is not None:
            server.close()
        self.waker.close()
        return code

    def _handle(self, signals: list[int]) -> None:
        """Reap, forward, note stop signals: everything a wake-up may mean."""
        self._reap()
        for sig in signals:
            if sig in FORWARDED_SIGNALS:
                self._signal_app(sig)
            elif sig in STOP_SIGNALS:
                self.life.note(signal.Signals(sig).name)

    def _app_running(self) -> bool:
        return self.app is not None and self.app_status is None

    def _main_loop(self, server) -> int:
        while True:
            self._handle(self.waker.wait())
            if self.app_status is not None and not self.life.triggered:
                log.warning("the app exited with status %d: deregistering", self.app_status)
                self.life.stop(f"app exited ({self.app_status})")
                self._done.set()
                return self.app_status
            if self.life.triggered:
                return self._shutdown(server)

    def _shutdown(self, server) -> int:
        self.life.stop("signal")
        self._done.set()
        self._handle([])
        registry_deadline, deadline = self.registrar.stop_deadline, self.life.deadline
        if server is not None and self.registrar.report.trigger.startswith("preStop"):
            # Let the hook's answer leave before the app (and so we) exit.
            server.responses_sent.wait(registry_deadline.cap(0.5))
        if self.app_status is None and self.config.stop.drain_connections:
            self._drain_connections(registry_deadline)
        stop_signal = signal_named(self.config.stop.signal)
        if self.app_status is None:
            log.info("sending %s to the app (%.1fs left for it)", stop_signal.name,
                     deadline.remaining())
            self._signal_app(stop_signal)
        while self.app_status is None and not deadline.expired:
            self._handle(self.waker.wait(deadline.cap(0.1)))
        if self.app_status is None:
            log.error("the app did not exit before the deadline: SIGKILL")
            self._signal_app(signal.SIGKILL, group=True)
            while self.app_status is None:
                self._handle(self.waker.wait(0.05))
        return self.app_status

    def _signal_app(self, sig: int, group: bool = False) -> None:
        if self.app is None or self.app_status is not None:
            return
        try:
            (os.killpg if group else os.kill)(self.app.pid, sig)
        except ProcessLookupError:
            pass

    def _reap(self) -> None:
        """Reap every exited child except the health probes' (their own
        subprocess call waits for them); note the app's status."""
        while True:
            with self._spawn_lock:
                try:
                    info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:
                    return
                if info is None or info.si_pid == 0 or info.si_pid in self._probe_pids:
                    return
                pid, status = os.waitpid(info.si_pid, 0)
            if self.app is not None and pid == self.app.pid:
                code = os.waitstatus_to_exitcode(status)
                self.app_status = 128 - code if code < 0 else code
                self.app.returncode = code  # Popen must not wait for it again

    def _drain_connections(self, deadline: Deadline) -> None:
        port = self.registrar.instance.port
        count = established_connections(port)
        if count:
            log.info("waiting for %d connection(s) to port %d to close", count, port)
        while count and not deadline.expired:
            self.registrar.clock.sleep(deadline.cap(0.01))
            count = established_connections(port)
        if count:
            log.warning("%d connection(s) to port %d still open at the deadline", count, port)

    # -- the health gate ----------------------------------------------------

    def _health_loop(self, health: HealthConfig) -> None:
        failures = 0
        started = False
        while not self.registrar.stopping and self._app_running():
            ok, why = self._probe(health)
            if ok:
                failures = 0
                if not started:
                    log.info("the app is healthy: registering")
                    try:
                        self.registrar.start()
                    except RegistrarError:
                        return  # stopping began first
                    started = True
                else:
                    self.registrar.resume()
            else:
                failures += 1
                log.debug("health probe failed (%d in a row): %s", failures, why)
                if started and failures >= health.failure_threshold:
                    self.registrar.pause(f"health probe failed {failures} times: {why}")
            if self._done.wait(health.interval):
                return

    def _probe(self, health: HealthConfig) -> tuple[bool, str]:
        if health.http is not None:
            return _probe_http(health.http, health.timeout)
        if health.tcp is not None:
            return _probe_tcp(health.tcp, health.timeout)
        with self._spawn_lock:
            proc = subprocess.Popen(health.exec, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self._probe_pids.add(proc.pid)
        try:
            code = proc.wait(timeout=health.timeout)
            return code == 0, f"exit status {code}"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return False, f"no exit within {health.timeout}s"
        finally:
            with self._spawn_lock:
                self._probe_pids.discard(proc.pid)


def _probe_http(url: str, timeout: float) -> tuple[bool, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 400, f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return False, str(getattr(exc, "reason", exc))


def _probe_tcp(target: str, timeout: float) -> tuple[bool, str]:
    import socket

    try:
        with socket.create_connection(parse_listen(target), timeout=timeout):
            return True, "connected"
    except OSError as exc:
        return False, exc.strerror or str(exc)


_TCP_ESTABLISHED = "01"


def established_connections(port: int, proc_net: str = "/proc/net") -> int:
    """ESTABLISHED TCP connections whose local port is ``port`` (IPv4 and
    IPv6), read from /proc/net/tcp{,6} of this network namespace."""
    count = 0
    for name in ("tcp", "tcp6"):
        try:
            with open(os.path.join(proc_net, name)) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == _TCP_ESTABLISHED \
                            and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        count += 1
        except OSError:
            continue
    return count
