"""The app's health gate in `run` mode: register once the app passes its
probe (http, tcp or exec), take it out of rotation after
``failure_threshold`` failures in a row, put it back when it passes."""
from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable

from .config import HealthConfig
from .core import Registrar
from .errors import RegistrarError
from .source import parse_listen

log = logging.getLogger(__name__)


class ProbeProcesses:
    """The exec probes' children: the wrapper's reaper leaves them to the
    probe's own wait(), and holds ``lock`` while it looks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pids: set[int] = set()


class HealthGate:
    """Runs the probe every ``interval`` in a thread of its own, until the
    registrar stops, the app exits, or ``done`` is set."""

    def __init__(self, registrar: Registrar, health: HealthConfig,
                 app_running: Callable[[], bool], done: threading.Event,
                 children: ProbeProcesses):
        self.registrar = registrar
        self.health = health
        self.app_running = app_running
        self.done = done
        self.children = children

    def start(self) -> None:
        threading.Thread(target=self._loop, name="health", daemon=True).start()

    def _loop(self) -> None:
        health = self.health
        failures = 0
        started = False
        while not self.registrar.stopping and self.app_running():
            ok, why = self.probe()
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
            if self.done.wait(health.interval):
                return

    def probe(self) -> tuple[bool, str]:
        health = self.health
        if health.http is not None:
            return probe_http(health.http, health.timeout)
        if health.tcp is not None:
            return probe_tcp(health.tcp, health.timeout)
        return self._probe_exec(health.exec, health.timeout)

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


def probe_http(url: str, timeout: float) -> tuple[bool, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 400, f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return False, str(getattr(exc, "reason", exc))


def probe_tcp(target: str, timeout: float) -> tuple[bool, str]:
    import socket

    try:
        with socket.create_connection(parse_listen(target), timeout=timeout):
            return True, "connected"
    except OSError as exc:
        return False, exc.strerror or str(exc)
