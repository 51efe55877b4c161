"""bench/apps/consumer.py as a subprocess, and its view as it reports it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .pods import APPS, PY
from .registries import SERVICE, Registry

CLIENTS = ("per-request", "keepalive", "cached")


def label(client: str, cache_s: float | None = None) -> str:
    """A consumer's name in the rows, the plot and the progress: its kind,
    and for ``cached`` its cache ("cached 2s")."""
    return f"cached {cache_s:g}s" if client == "cached" else client


def labels(args) -> list[str]:
    """The labels of the consumers of a run (``args.consumers``, ``args.cache_s``)."""
    return [label(c, getattr(args, "cache_s", None)) for c in args.consumers]


class ConsumerProcess:
    """A consumer app (bench/apps/) as a subprocess speaking its JSON-lines
    protocol: ``ready``, ``count``, ``done`` on stdout (``on_event`` sees every
    other event), ``go`` / ``stop`` on stdin, every request in ``out``."""

    def __init__(self, label: str, out: Path, argv: list[str]):
        self.label = label
        self.out = out
        self.sent = 0
        self.failed = 0
        self.done: dict | None = None
        self._stop_sent = False
        self._ready = threading.Event()
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._stderr = open(out.with_suffix(".err"), "w")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True, name=f"consumer-{label}").start()

    def on_event(self, ev: str | None, msg: dict) -> None:
        """An event other than ready/count/done, or ``ready`` before it is set
        (under the lock)."""

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            ev = msg.get("ev")
            with self._lock:
                if ev == "count":
                    self.sent, self.failed = msg["sent"], msg["failed"]
                elif ev == "done":
                    self.done = msg
                else:
                    self.on_event(ev, msg)
                    if ev == "ready":
                        self._ready.set()
        self._finished.set()

    def wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > end:
                err = self.out.with_suffix(".err").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the {self.label} consumer did not start:\n{err}")

    def request_stop(self) -> None:
        if not self._stop_sent:
            self._stop_sent = True
            self.command("stop")

    def command(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 30.0) -> list[list]:
        """End the traffic (if request_stop() did not already); every request it made."""
        self.request_stop()
        if not self._finished.wait(timeout):
            raise RuntimeError(f"the {self.label} consumer did not finish in time")
        self.proc.wait(5)
        return [json.loads(line) for line in self.out.read_text().splitlines()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            print(f"consumer {self.proc.pid} did not die", file=sys.stderr)
        self._stderr.close()


def stop_all(consumers: list[ConsumerProcess], tag: str,
             progress: Callable[[str], None]) -> dict[str, list[list]]:
    """End every consumer's traffic at once (the same traffic window for
    every row); each one's requests by label, and what its ``done`` says
    worth a line (connections opened, cache refreshes, falling behind)."""
    for c in consumers:
        c.request_stop()
    records = {}
    for c in consumers:
        records[c.label] = c.stop()
        done = c.done or {}
        if "opened" in done:
            progress(f"  {tag} {c.label}: {done['opened']} connections opened, "
                     f"{done['dropped']} found closed before reuse")
        if "refreshes" in done:
            progress(f"  {tag} {c.label}: its cache was refreshed {done['refreshes']} times")
        if done.get("fell_behind"):
            progress(f"  {tag} {c.label}: fell > 200 ms behind its schedule "
                     f"{done['fell_behind']} time(s) (the machine is too busy)")
    return records


class Consumer(ConsumerProcess):
    """bench/apps/consumer.py: discovers the pods through a registry."""

    def __init__(self, client: str, registry: Registry, out: Path, rate: float,
                 max_seconds: float, cache_s: float | None = None):
        if client == "cached" and not cache_s:
            raise ValueError("a cached consumer needs its cache_s")
        self.client = client
        self.cache_s = cache_s if client == "cached" else None
        self.endpoints: set[str] = set()
        self.errors: list[str] = []
        super().__init__(label(client, self.cache_s), out, [
            PY, str(APPS / "consumer.py"), "--registry", registry.name,
            "--target", registry.consumer_target(), "--service", SERVICE, "--client", client,
            "--out", str(out), "--rate", f"{rate:g}", "--max-seconds", f"{max_seconds:g}",
            *(["--cache-s", f"{self.cache_s:g}"] if self.cache_s else [])])

    def on_event(self, ev: str | None, msg: dict) -> None:
        if ev == "ready":
            self.endpoints = set(msg["endpoints"])
        elif ev == "add":
            self.endpoints.add(msg["ep"])
        elif ev == "del":
            self.endpoints.discard(msg["ep"])
        elif ev == "error":
            self.errors.append(msg["what"])

    def lists(self, addr: str) -> bool:
        if self.errors:
            raise RuntimeError(f"{self.label} consumer: {self.errors[0]}")
        with self._lock:
            return addr in self.endpoints
