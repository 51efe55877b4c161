"""What this process sends to each registry member: a count of the requests
written to its sockets, by the member's port.

A ZooKeeper client writes each packet (a request, a ping) with one
``send``; http.client writes an HTTP request's head with one ``sendall``
and its body with another, so on a socket that has sent a request line only
the writes that start one are counted. The count is the number of requests
this process sent there, whichever library sent them and whether or not
the member was able to answer (a frozen member counts too: its kernel
accepts what it cannot read). It is counted on the
client side on purpose: server-side counters (etcd's /metrics, ZooKeeper's
``mntr``, Consul's telemetry) also count every other client of a shared
test cluster, and a frozen member reads its backlog only once it is thawed.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import weakref
from collections import Counter
from collections.abc import Iterable, Iterator

_lock = threading.Lock()
_active: list[tuple[frozenset[int], Counter]] = []
_originals: dict[str, object] = {}
_http: weakref.WeakSet[socket.socket] = weakref.WeakSet()
_METHODS = (b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"PATCH ", b"OPTIONS ")


def _port(sock: socket.socket) -> int | None:
    try:
        peer = sock.getpeername()
    except OSError:
        return None
    return peer[1] if isinstance(peer, tuple) and len(peer) >= 2 else None


def _note(sock: socket.socket, data: object) -> None:
    head = bytes(memoryview(data)[:8]) if isinstance(data, (bytes, bytearray, memoryview)) else b""
    if head.startswith(_METHODS):
        _http.add(sock)
    elif sock in _http:
        return  # the body of a request counted already
    port = _port(sock)
    if port is None:
        return
    with _lock:
        for ports, counter in _active:
            if port in ports:
                counter[port] += 1


def _install() -> None:
    for name in ("send", "sendall"):
        original = getattr(socket.socket, name)
        _originals[name] = original

        def counting(self, data, *args, __original=original, **kwargs):
            _note(self, data)
            return __original(self, data, *args, **kwargs)

        setattr(socket.socket, name, counting)


def _uninstall() -> None:
    for name, original in _originals.items():
        setattr(socket.socket, name, original)
    _originals.clear()


@contextlib.contextmanager
def count_sends(ports: Iterable[int]) -> Iterator[Counter]:
    """Count, while the block runs, the socket writes of this process to
    127.0.0.1 on each of ``ports`` (a Counter by port; TLS sockets are not
    counted). Nestable; the patch of ``socket.socket`` is undone when the
    last block ends."""
    entry = (frozenset(ports), Counter({p: 0 for p in ports}))
    with _lock:
        if not _active:
            _install()
        _active.append(entry)
    try:
        yield entry[1]
    finally:
        with _lock:
            _active.remove(entry)
            if not _active:
                _uninstall()
