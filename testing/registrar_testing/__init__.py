"""registrar-testing: what registrar's tests, benchmarks and demo share.

Real etcd, ZooKeeper and Consul servers on 127.0.0.1 (:mod:`.etcd`,
:mod:`.zookeeper`, :mod:`.consul`), network faults (:mod:`.faults`), the
backend conformance suite (:mod:`.conformance`), an in-memory registry
(:mod:`.memory`), a kubelet simulator (:mod:`.kubelet`) and pytest fixtures
(:mod:`.fixtures`). This module stays standard-library only: the sample
apps import :mod:`.events` and must start fast.
"""
from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple, TypeVar

__all__ = ["free_port", "free_ports", "wait_until", "http_get", "TcpSocket", "tcp_sockets",
           "ESTABLISHED"]

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.01,
               ignore: type[BaseException] | tuple[type[BaseException], ...] = ()) -> T:
    """Poll ``predicate`` until it returns something truthy and return that.

    An exception from ``predicate`` propagates unless it is an instance of
    ``ignore``: then it counts as "not yet" (a server still starting). After
    ``timeout`` seconds raise TimeoutError naming ``what`` (and the last
    ignored exception, if any).
    """
    end = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            last_exc = exc
        else:
            if value:
                return value
        if time.monotonic() >= end:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout}s waiting until {what}{detail}")
        time.sleep(interval)


def http_get(url: str, timeout: float = 1.0) -> tuple[int, str]:
    """GET ``url``: (status, body), an error status included; (0, the
    error) when nothing answered (refused, reset, timed out)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(n: int) -> list[int]:
    """n distinct free ports (held open together so they cannot repeat),
    below the kernel's ephemeral range: a port from that range may be taken
    by any outgoing connection between now and the server's bind (a Consul
    client agent started seconds after its ports were chosen failed with
    "address already in use"); one below it only by an explicit bind."""
    import random

    low, _high = _ephemeral_range()
    first = 10000 if low > 12000 else 1024
    socks = []
    try:
        for _ in range(100 * n):
            if len(socks) == n:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", random.randrange(first, low)))
            except OSError:
                s.close()
                continue
            socks.append(s)
        while len(socks) < n:  # a crowded range: what the kernel hands out
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


#: The state column of /proc/net/tcp for an established connection.
ESTABLISHED = "01"


class TcpSocket(NamedTuple):
    """One row of /proc/net/tcp{,6}: the state (ESTABLISHED, ...), the ports
    at both ends, and the socket's inode (as /proc/<pid>/fd links name it)."""
    state: str
    local_port: int
    remote_port: int
    inode: str


def tcp_sockets() -> Iterator[TcpSocket]:
    """Every TCP socket of this network namespace, IPv4 and IPv6 (a JVM
    listens on a dual-stack socket); a table that cannot be read is skipped."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            yield TcpSocket(fields[3], int(fields[1].rsplit(":", 1)[1], 16),
                            int(fields[2].rsplit(":", 1)[1], 16), fields[9])
