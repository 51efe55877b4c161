"""The two HTTP clients of the bench's consumer, and how a failed request
is classified. A request is never retried.

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
import threading

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
