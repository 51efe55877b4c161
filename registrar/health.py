"""The app's health gate in `run` and `agent`: register only once the app
passes its probe (by default: service.address:service.port accepts a TCP
connection; or http, tcp, exec), take it out of rotation after
``failure_threshold`` failures in a row, put it back when it passes."""
from __future__ import annotations

import logging
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .config import HealthConfig
from .errors import RegistrarError
from .instance import Instance
from .source import parse_listen
from .traffic import note_own_connection

if TYPE_CHECKING:
    from .core import Registrar

log = logging.getLogger(__name__)


class ProbeProcesses:
    """The exec probes' children: the wrapper's reaper leaves them to the
    probe's own wait(), and holds ``lock`` while it looks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pids: set[int] = set()


class HealthGate:
    """Runs the probe in a thread of its own until the registrar stops, the
    app exits, or ``done`` is set. Until the app first passes, it probes
    often (from FIRST_INTERVAL, backing off to at most UNTIL_PASSED), so
    that a new pod is registered, and its rollout goes on, within moments of
    its app listening."""

    FIRST_INTERVAL = 0.02
    UNTIL_PASSED = 0.25
    #: Seconds between two reminders that the app has not passed yet.
    REMIND_EVERY = 10.0

    def __init__(self, registrar: Registrar, health: HealthConfig, done: threading.Event,
                 app_running: Callable[[], bool] = lambda: True,
                 children: ProbeProcesses | None = None):
        self.registrar = registrar
        self.health = health
        self.done = done
        self.app_running = app_running
        self.children = children or ProbeProcesses()
        #: True once the app passed: registration has begun.
        self.passed = False
        self.last_failure = "not probed yet"
        #: The last probe's verdict (registrar_app_healthy).
        self.healthy = False
        self._default_target: str | None = None

    @property
    def target(self) -> str:
        """What is probed, for people to read."""
        h = self.health
        return h.http or (" ".join(h.exec) if h.exec else None) or self._tcp_target()

    def _tcp_target(self) -> str:
        if self.health.tcp:
            return self.health.tcp
        if self._default_target is None:
            self._default_target = default_target(self.registrar.instance)
        return self._default_target

    def start(self) -> None:
        threading.Thread(target=self._loop, name="health", daemon=True).start()

    def _loop(self) -> None:
        health = self.health
        failures = 0
        wait = self.FIRST_INTERVAL
        began = remind = time.monotonic()
        # With no registry the gate decides readiness only (/readyz).
        registry = bool(self.registrar.backends)
        while not self.registrar.stopping and self.app_running():
            ok, why = self.probe()
            self.healthy = ok
            if ok:
                failures = 0
                if not self.passed:
                    log.info("the app passes its health probe (%s): %s", self.target,
                             "registering" if registry else "ready")
                    try:
                        self.registrar.start(gate=False)
                    except RegistrarError:
                        return  # stopping began first
                    self.passed = True
                else:
                    self.registrar.resume()
            else:
                failures += 1
                self.last_failure = f"{self.target}: {why}"
                if self.passed:
                    log.debug("health probe failed (%d in a row): %s", failures, why)
                    if failures >= health.failure_threshold:
                        self.registrar.pause(f"health probe failed {failures} times: {why}")
                elif failures == 1:
                    log.info("waiting for the app before %s: %s",
                             "registering" if registry else "reporting ready", self.last_failure)
                elif time.monotonic() - remind >= self.REMIND_EVERY:
                    remind = time.monotonic()
                    log.warning("%s: the app has failed its health probe for %.0fs: %s",
                                "not registered" if registry else "not ready", remind - began,
                                self.last_failure)
            wait = health.interval if self.passed else \
                min(health.interval, self.UNTIL_PASSED, wait * 1.5)
            if self.done.wait(wait):
                return

    def probe(self) -> tuple[bool, str]:
        health = self.health
        if health.http is not None:
            return probe_http(health.http, health.timeout)
        if health.exec is not None:
            return self._probe_exec(health.exec, health.timeout)
        return probe_tcp(self._tcp_target(), health.timeout)

    def _probe_exec(self, argv: list[str], timeout: float) -> tuple[bool, str]:
        with self.children.lock:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.children.pids.add(proc.pid)
        try:
            code = proc.wait(timeout=timeout)
            return code == 0, f"exit status {code}"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return False, f"no exit within {timeout}s"
        finally:
            with self.children.lock:
                self.children.pids.discard(proc.pid)


def default_target(instance: Instance) -> str:
    """The default probe's ``host:port``: the advertised address when it is
    one of this network namespace's own (the pod IP: what consumers reach),
    else loopback. The probe never leaves the pod."""
    family = socket.AF_INET6 if ":" in instance.address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((instance.address, 0))  # only an address of ours can be bound
        return instance.hostport
    except OSError:
        log.info("service.address %s is not an address of this host: the health probe "
                 "connects to 127.0.0.1:%d", instance.address, instance.port)
        return f"127.0.0.1:{instance.port}"


def probe_http(url: str, timeout: float) -> tuple[bool, str]:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn = kind(parts.hostname, parts.port, timeout=timeout)
        try:
            conn.connect()
            note_own_connection(conn.sock)  # not a consumer (traffic.py)
            conn.request("GET", target, headers={"Connection": "close",
                                                 "User-Agent": "registrar-health"})
            status = conn.getresponse().status
        finally:
            conn.close()
        return 200 <= status < 400, f"HTTP {status}"
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return False, str(exc) or type(exc).__name__


def probe_tcp(target: str, timeout: float) -> tuple[bool, str]:
    try:
        with socket.create_connection(parse_listen(target), timeout=timeout) as sock:
            note_own_connection(sock)  # not a consumer (traffic.py)
            return True, "connected"
    except OSError as exc:
        return False, exc.strerror or str(exc)
