"""The two HTTP clients of the bench's consumers, how a failed request is
classified, and the open loop that drives them (open_loop()). A request is
never retried.

  per-request  a new TCP connection per request, ``Connection: close``.
  keepalive    a pool of persistent HTTP/1.1 connections per instance.
               Before a pooled socket is reused it is dropped if the peer
               closed it (readable with poll(); recv(MSG_PEEK) sees EOF),
               as urllib3's is_connection_dropped() does. Idle sockets to an
               instance that left discovery stay open (nothing closes them on
               removal): what real pools do, and what holds a naive "wait
               until no connection is left" drain.

Outcomes: ``ok``; ``refused`` (connect refused: nothing listens);
``reset`` (the connection was reset or closed before a whole response
came: RST, EOF, a truncated answer); ``timeout`` (connect or response
beyond ``timeout``); ``http5xx``; ``other`` (any other OSError; not
expected on loopback). ``no_instance`` is the consumer's: no instance
known when the request was due.
"""
from __future__ import annotations

import errno
import http.client
import select
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

KINDS = ("refused", "reset", "timeout", "http5xx", "no_instance", "other")


def classify(exc: BaseException) -> tuple[str, str]:
    """(kind, detail) of an exception raised by one request."""
    if isinstance(exc, ConnectionRefusedError):
        return "refused", ""
    if isinstance(exc, TimeoutError):
        return "timeout", ""
    # RemoteDisconnected (no status line) is a ConnectionResetError.
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset", type(exc).__name__
    if isinstance(exc, http.client.HTTPException):  # IncompleteRead, BadStatusLine, ...
        return "reset", type(exc).__name__
    if isinstance(exc, OSError):
        return "other", errno.errorcode.get(exc.errno or 0, repr(exc))
    raise exc


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def _status(resp: http.client.HTTPResponse) -> tuple[str, str]:
    resp.read()
    if resp.status >= 500:
        return "http5xx", str(resp.status)
    return "ok", ""


class PerRequest:
    """A new connection per request."""

    def __init__(self, timeout: float):
        self.timeout = timeout

    def request(self, addr: str) -> tuple[str, bool, str]:
        """(outcome, connected?, detail) of one ``GET /``."""
        conn = http.client.HTTPConnection(*_split(addr), timeout=self.timeout)
        connected = False
        try:
            conn.connect()
            connected = True
            conn.request("GET", "/", headers={"Connection": "close"})
            kind, detail = _status(conn.getresponse())
            return kind, connected, detail
        except Exception as exc:  # noqa: BLE001 - classified, or re-raised
            kind, detail = classify(exc)
            return kind, connected, detail
        finally:
            conn.close()

    def close(self) -> None:
        pass


def is_dropped(sock: socket.socket | None) -> bool:
    """True when the peer closed (or reset) an idle connection, or sent
    something unasked for: it must not carry another request."""
    if sock is None:
        return True
    try:
        poller = select.poll()  # not select(): no FD_SETSIZE limit
        poller.register(sock, select.POLLIN)
        if not poller.poll(0):
            return False
        # b"": the peer's FIN. Bytes: an answer nobody asked for (or a late
        # one). Either way the connection is out of step: drop it.
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        return True
    except (OSError, ValueError):  # reset, or a closed fd
        return True


class KeepAlive:
    """Pools of persistent connections, one pool per instance address."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._lock = threading.Lock()
        self._idle: dict[str, list[http.client.HTTPConnection]] = {}
        self.opened = 0
        self.dropped = 0  # pooled connections found closed by the peer

    def _checkout(self, addr: str) -> http.client.HTTPConnection | None:
        while True:
            with self._lock:
                pool = self._idle.get(addr)
                if not pool:
                    return None
                conn = pool.pop()
            if not is_dropped(conn.sock):
                return conn
            with self._lock:
                self.dropped += 1
            conn.close()

    def request(self, addr: str) -> tuple[str, bool, str]:
        """(outcome, reused a pooled connection?, detail) of one ``GET /``."""
        conn = self._checkout(addr)
        reused = conn is not None
        if conn is None:
            conn = http.client.HTTPConnection(*_split(addr), timeout=self.timeout)
            with self._lock:
                self.opened += 1
        keep = False
        try:
            if conn.sock is None:
                conn.connect()
            conn.request("GET", "/")
            resp = conn.getresponse()
            kind, detail = _status(resp)
            keep = not resp.will_close
            return kind, reused, detail
        except Exception as exc:  # noqa: BLE001 - classified, or re-raised
            kind, detail = classify(exc)
            return kind, reused, detail
        finally:
            if keep:
                with self._lock:
                    self._idle.setdefault(addr, []).append(conn)
            else:
                conn.close()

    def close(self) -> None:
        with self._lock:
            pools, self._idle = self._idle, {}
        for pool in pools.values():
            for conn in pool:
                conn.close()


def open_loop(rate: float, max_seconds: float, threads: int,
              one: Callable[[float], tuple[tuple, bool]],
              emit: Callable[..., None], began: float | None = None) -> tuple[list[tuple], int]:
    """The consumers' traffic: ``rate`` requests per second on a pool of
    ``threads``, each ``one(t_due)`` -> (record, ok), from the ``go`` command
    on stdin until ``stop`` (or EOF) or ``max_seconds`` after ``began``
    (default: the call); a
    ``count`` event (sent and failed so far) every second. Waits for the
    requests in flight; returns the records and how often the loop fell
    behind by more than 0.2 s (it then skips ahead instead of bursting)."""
    began = time.monotonic() if began is None else began
    records: list[tuple] = []
    counts = {"sent": 0, "failed": 0}
    counts_lock = threading.Lock()
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="req")
    go, stop = threading.Event(), threading.Event()
    behind = [0]

    def request(t_due: float) -> None:
        record, ok = one(t_due)
        records.append(record)
        with counts_lock:
            counts["failed"] += not ok

    def dispatch() -> None:
        interval = 1.0 / rate
        next_t = time.monotonic()
        for _ in range(int(rate * max_seconds) + 1):
            if stop.is_set():
                return
            now = time.monotonic()
            if now < next_t:
                if stop.wait(next_t - now):
                    return
            elif now - next_t > 0.2:  # fell far behind: skip, do not burst
                behind[0] += 1
                next_t = now
            pool.submit(request, next_t)
            with counts_lock:
                counts["sent"] += 1
            next_t += interval

    def report() -> None:
        while not stop.wait(1.0):
            with counts_lock:
                emit(ev="count", t=time.monotonic(), **counts)

    def stdin_reader() -> None:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "go":
                go.set()
            elif cmd == "stop":
                break
        stop.set()
        go.set()

    threading.Thread(target=stdin_reader, name="stdin", daemon=True).start()
    go.wait(max(max_seconds - (time.monotonic() - began), 0))
    sender = threading.Thread(target=dispatch, name="dispatch", daemon=True)
    if not stop.is_set():
        sender.start()
        threading.Thread(target=report, name="count", daemon=True).start()
    stop.wait(max(max_seconds - (time.monotonic() - began), 0))
    stop.set()
    if sender.is_alive():
        sender.join(1.0)
    pool.shutdown(wait=True)  # each request is bounded by the client's timeout
    return records, behind[0]
