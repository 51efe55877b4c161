"""A consumer as a thread: requests at a steady rate to an HTTP server,
until told to stop (a consumer whose cache still lists a pod, until it
refreshes). Used by the tests of the wait for consumers."""
from __future__ import annotations

import http.client
import socket
import threading
import time


class Sender(threading.Thread):
    """``rate`` requests per second to ``port`` until stop(); ``how``:
    close: a new connection per request (``Connection: close``), read until
      the app closes it: the app closes first;
    keepalive: one persistent connection (a new one every ``recycle``
      seconds, if given: a pool's connection lifetime);
    client-close: a new connection per request (HTTP/1.1, kept alive by the
      app) that the sender closes once it has the answer."""

    def __init__(self, port: int, rate: float, how: str = "close", source: str = "127.0.0.1",
                 ms: float = 0, recycle: float | None = None):
        super().__init__(daemon=True)
        self.port, self.rate, self.how, self.source, self.ms = port, rate, how, source, ms
        self.recycle = recycle
        self._opened = 0.0
        self.sent: list[float] = []
        self.failed = 0
        self._halt = threading.Event()
        self._conn: http.client.HTTPConnection | None = None

    def run(self) -> None:
        next_at = time.monotonic()
        while not self._halt.is_set():
            self._one()
            next_at += 1 / self.rate
            self._halt.wait(max(0.0, next_at - time.monotonic()))
        if self._conn is not None:
            self._conn.close()

    def _one(self) -> None:
        path = f"/?ms={self.ms}" if self.ms else "/"
        try:
            if self.how == "keepalive":
                if (self._conn is not None and self.recycle is not None
                        and time.monotonic() - self._opened >= self.recycle):
                    self._conn.close()
                    self._conn = None
                if self._conn is None:
                    self._opened = time.monotonic()
                    self._conn = http.client.HTTPConnection(
                        "127.0.0.1", self.port, timeout=2, source_address=(self.source, 0))
                self._conn.request("GET", path)
                self._conn.getresponse().read()
            elif self.how == "close":  # read until the app closes: it closes first
                with socket.create_connection(("127.0.0.1", self.port), timeout=2,
                                              source_address=(self.source, 0)) as sock:
                    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: app\r\n"
                                 "Connection: close\r\n\r\n".encode())
                    answer = b""
                    while chunk := sock.recv(65536):
                        answer += chunk
                    if not answer.startswith(b"HTTP/1.1 200"):
                        raise ConnectionResetError(f"answer: {answer[:40]!r}")
            else:  # the client closes as soon as it has the answer
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2,
                                                  source_address=(self.source, 0))
                conn.request("GET", path)
                conn.getresponse().read()
                conn.close()
            self.sent.append(time.monotonic())
        except OSError:
            self.failed += 1
            self._conn = None

    def stop(self) -> float:
        """Stop sending; when the last request was sent."""
        self._halt.set()
        self.join(5)
        return self.sent[-1] if self.sent else 0.0
