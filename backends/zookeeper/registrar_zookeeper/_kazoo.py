"""Workarounds for kazoo, kept apart from the backend so that each says why
it exists. Nothing here knows about registrations."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from kazoo.client import KazooClient
from kazoo.handlers.threading import KazooTimeoutError, SequentialThreadingHandler
from kazoo.protocol.serialization import Auth
from kazoo.retry import KazooRetry

log = logging.getLogger(__name__)

#: The logger every kazoo client of this backend writes to.
KAZOO_LOG = logging.getLogger("registrar_zookeeper.kazoo")
# kazoo logs every connect, and every session established or closed, at
# INFO: four clients per agent (the session and three observers) would
# drown our own lines. Its warnings (connection dropped, session expired)
# still come through; set this logger's level to see the rest.
KAZOO_LOG.setLevel(logging.WARNING)


class _RedactAuth(logging.Filter):
    """kazoo logs each request it sends at DEBUG, the Auth packet too, and
    that packet carries digest credentials (user:password) in clear."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, Auth) for a in record.args):
            record.args = tuple(f"Auth(scheme={a.scheme!r}, auth=<redacted>)"
                                if isinstance(a, Auth) else a for a in record.args)
        return True


KAZOO_LOG.addFilter(_RedactAuth())


class _Handler(SequentialThreadingHandler):
    """kazoo opens each TCP connection with the whole session timeout as
    its connect timeout, so one blackholed server holds up failover to the
    next for that long. Cap it."""

    def __init__(self, connect_timeout: float):
        super().__init__()
        self._connect_timeout = connect_timeout

    def create_connection(self, *args, **kwargs):
        timeout = kwargs.get("timeout")
        kwargs["timeout"] = (self._connect_timeout if timeout is None
                             else min(timeout, self._connect_timeout))
        return super().create_connection(*args, **kwargs)


def new_client(hosts: str, *, session_timeout: float, connect_timeout: float,
               credentials: str | None, tls: dict | None) -> KazooClient:
    """A kazoo client, not started. It reconnects forever, at most a second
    apart (kazoo's default backs off to an hour); it never retries a command
    by itself: callers bound and retry their own."""
    return KazooClient(
        hosts=hosts, timeout=session_timeout, handler=_Handler(connect_timeout),
        auth_data=[("digest", credentials)] if credentials else None,
        connection_retry=KazooRetry(max_tries=-1, delay=0.05, backoff=2, max_jitter=0.3,
                                    max_delay=1.0),
        logger=KAZOO_LOG, **(tls or {}))


def stop_clients(clients: Iterable[KazooClient], timeout: float) -> bool:
    """Stop (closing their sessions) and close kazoo clients, waiting at most
    ``timeout`` seconds in all; True if every one finished.

    kazoo's stop() waits for its connection thread for max(10 s, session
    timeout) and then joins it with no bound at all, so a server that stops
    answering mid-close would hang the caller: the stopping happens in
    daemon threads, which never keep the process alive.
    """
    threads = [stop_in_background(c) for c in clients]
    end = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, end - time.monotonic()))
    return not any(t.is_alive() for t in threads)


def stop_in_background(client: KazooClient) -> threading.Thread:
    def stop() -> None:
        try:
            client.stop()
            client.close()
        except Exception as exc:  # noqa: BLE001 - closing is best effort
            log.debug("zookeeper: closing a client failed: %s", exc)

    thread = threading.Thread(target=stop, name="zookeeper-close", daemon=True)
    thread.start()
    return thread


#: Seconds without a reply after which wait() nudges the server.
NUDGE_AFTER = 0.05


def wait(result: Any, end: float, nudge: Callable[[], Any]) -> Any:
    """A kazoo async result, waited for until ``end`` (time.monotonic()) at
    most; KazooTimeoutError past it.

    ZooKeeper 3.8.0 followers now and then hold a reply back until the
    session sends them something else (measured here: about one write in
    5,000 through a follower, held until the client's next ping, seconds
    later; both TCP queues empty meanwhile). Any request releases it, so
    every NUDGE_AFTER seconds without a reply we send ``nudge()``, a cheap
    read on the same session.
    """
    while True:
        remaining = end - time.monotonic()
        try:
            return result.get(timeout=max(0.0, min(remaining, NUDGE_AFTER)))
        except KazooTimeoutError:
            if remaining <= NUDGE_AFTER:
                raise
            nudge()
