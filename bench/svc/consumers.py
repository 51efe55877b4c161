"""bench/apps/vip_consumer.py as a subprocess: a client of the Service's
virtual IP, from a loopback address of its own."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from rr.pods import APPS, PY

# Each consumer binds its own source address: the pods see two peers, as
# two client pods with their own IPs (and neither is 127.0.0.1, where the
# readiness probes and the kubelet's preStop httpGet come from).
CLIENTS = {"per-request": "127.0.0.2", "keepalive": "127.0.0.3"}


class VipConsumer:
    def __init__(self, client: str, vip: str, out: Path, rate: float, max_seconds: float,
                 timeout: float = 5.0):
        self.client = client
        self.label = client
        self.source = CLIENTS[client]
        self.out = out
        self.sent = 0
        self.failed = 0
        self.done: dict | None = None
        self._stop_sent = False
        self._ready = threading.Event()
        self._finished = threading.Event()
        self._stderr = open(out.with_suffix(".err"), "w")
        self.proc = subprocess.Popen(
            [PY, str(APPS / "vip_consumer.py"), "--vip", vip, "--source", self.source,
             "--client", client, "--out", str(out), "--rate", f"{rate:g}",
             "--timeout", f"{timeout:g}", "--max-seconds", f"{max_seconds:g}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True, name=f"consumer-{client}").start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            ev = msg.get("ev")
            if ev == "ready":
                self._ready.set()
            elif ev == "count":
                self.sent, self.failed = msg["sent"], msg["failed"]
            elif ev == "done":
                self.done = msg
        self._finished.set()

    def wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > end:
                err = self.out.with_suffix(".err").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"the {self.label} consumer did not start:\n{err}")

    def command(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def request_stop(self) -> None:
        if not self._stop_sent:
            self._stop_sent = True
            self.command("stop")

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
