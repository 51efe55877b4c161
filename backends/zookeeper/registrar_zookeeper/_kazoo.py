"""Workarounds for kazoo, kept apart from the backend so that each says why
it exists. Nothing here knows about registrations."""
from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from kazoo.client import KazooClient
from kazoo.exceptions import ConnectionDropped
from kazoo.handlers.threading import KazooTimeoutError, SequentialThreadingHandler
from kazoo.protocol.connection import STOP_CONNECTING, ConnectionHandler
from kazoo.protocol.serialization import Auth, Connect
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
    that packet carries digest credentials (user:password) in clear. At its
    BLATHER level (5) it also logs the session's password (whoever has it
    and the session id can take the session, and our ephemeral node, over),
    in the Connect packets and as hex."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            session_passwd = "session_passwd" in str(record.msg)
            record.args = tuple(_redacted(a, session_passwd) for a in record.args)
        return True


def _redacted(arg: Any, session_passwd: bool) -> Any:
    if isinstance(arg, Auth):
        return f"Auth(scheme={arg.scheme!r}, auth=<redacted>)"
    if isinstance(arg, Connect):
        return arg._replace(passwd=b"<redacted>")
    if session_passwd and isinstance(arg, bytes):
        return "<redacted>"
    return arg


KAZOO_LOG.addFilter(_RedactAuth())


def tls_context(ca_file: str | None, cert_file: str | None, key_file: str | None,
                verify: bool, check_hostname: bool) -> ssl.SSLContext:
    """The client side of TLS to the servers, built once per backend (a bad
    file is then a config error at start, not a reconnect loop later).
    kazoo would build one per connection and trust the system's CAs besides
    ``ca``: with a ca_file we trust that file alone, like the other
    backends. Raises ssl.SSLError or OSError."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname and verify
    context.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    if verify:
        if ca_file:
            context.load_verify_locations(ca_file)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file:
        context.load_cert_chain(cert_file, key_file or None)
    return context


class _Handler(SequentialThreadingHandler):
    """kazoo opens each TCP connection with the whole session timeout as
    its connect timeout, so one blackholed server holds up failover to the
    next for that long: capped. With TLS, the socket is wrapped with our
    one context (see tls_context); the handshake runs under the same cap."""

    def __init__(self, connect_timeout: float, context: ssl.SSLContext | None = None):
        super().__init__()
        self._connect_timeout = connect_timeout
        self._context = context

    def create_connection(self, *args, **kwargs):
        timeout = kwargs.get("timeout")
        kwargs["timeout"] = (self._connect_timeout if timeout is None
                             else min(timeout, self._connect_timeout))
        if self._context is None or not kwargs.get("use_ssl"):
            return super().create_connection(*args, **kwargs)
        sock = socket.create_connection(kwargs["address"], kwargs["timeout"])
        try:
            return self._context.wrap_socket(sock, server_hostname=kwargs.get("hostname"))
        except BaseException:
            sock.close()
            raise


#: TLS errors a reconnection may cure (the server went away mid-handshake);
#: any other (a certificate refused either way, a plaintext port, a bad
#: key) will not.
_TRANSIENT_TLS = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLWantReadError,
                  ssl.SSLWantWriteError, ssl.SSLSyscallError)


def tls_reason(exc: ssl.SSLError) -> str:
    """A TLS failure in a few words: "certificate verify failed: unable to
    get local issuer certificate" (we refused the server), "the server
    refused it: sslv3 alert certificate unknown" (an alert it sent us)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    reason = getattr(exc, "reason", None)
    if not reason:
        return str(exc)
    words = reason.lower().replace("_", " ")
    return f"the server refused it: {words}" if "ALERT" in reason else words


class _Connection(ConnectionHandler):
    """kazoo's connection loop with three changes, so that losing the server
    that holds our session moves the session to another server well within
    the session timeout (with kazoo 2.11 alone it took longer than the
    timeout: the ephemeral node vanished for ~1 s, issue 14):

    - a server is given up after ``read_timeout`` without a word from it,
      even while requests are being sent. kazoo counts each request sent as
      a ping and drops a connection only when a ping goes unanswered, so a
      caller sending requests to a blackholed server (our heartbeat, and
      wait()'s nudges every 50 ms) kept it from ever noticing. This is the
      Java client's rule ("have not heard from server in N ms");
    - read_timeout is a third of the session timeout (kazoo: two thirds;
      pings go every half of it), at least 0.9 s so that kazoo's ping
      jitter (up to 0.4 s) never turns a round trip into a timeout;
    - the next server tried is never the one that just failed: kazoo
      shuffles the hosts on each round and could try a blackholed server
      first again, waiting out the connect timeout on it. Hosts are still
      shuffled (sessions spread over the ensemble), then the ones that
      failed go last, the most recent last of all.

    It also remembers the last TLS failure (see tls_failure()): kazoo
    alone just reconnects forever after a refused certificate.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._last_recv = time.monotonic()
        self._stall = float("inf")
        self._failed_at: dict[tuple[str, int], float] = {}
        self.tls_error: str | None = None
        self.connected_once = False

    @contextlib.contextmanager
    def _socket_error_handling(self) -> Iterator[None]:
        try:
            yield
        except ssl.SSLError as exc:
            if not isinstance(exc, _TRANSIENT_TLS):
                self.tls_error = tls_reason(exc)
            raise ConnectionDropped(f"TLS: {tls_reason(exc)}") from None
        except OSError as exc:  # select.error and socket.error are OSError
            raise ConnectionDropped(f"socket connection error: "
                                    f"{getattr(exc, 'strerror', None) or exc}") from None

    def _expand_client_hosts(self) -> list:
        hosts = super()._expand_client_hosts()  # shuffled
        hosts.sort(key=lambda h: self._failed_at.get((h[1], h[2]), float("-inf")))
        return hosts

    def _connect_attempt(self, host: str, hostip: str, port: int, retry: Any) -> Any:
        status = super()._connect_attempt(host, hostip, port, retry)
        if status is not STOP_CONNECTING:  # it failed, or its connection dropped
            self._failed_at[(hostip, port)] = time.monotonic()
        return status

    def _connect(self, host: str, hostip: str, port: int) -> tuple[float, float]:
        read_timeout, connect_timeout = super()._connect(host, hostip, port)  # in ms
        self.tls_error, self.connected_once = None, True
        self._last_recv = time.monotonic()
        read_timeout = max(read_timeout / 2, min(read_timeout, 900.0))
        self._stall = read_timeout / 1000.0
        return read_timeout, connect_timeout

    def _read_socket(self, read_timeout: float) -> Any:
        response = super()._read_socket(read_timeout)
        self._last_recv = time.monotonic()
        return response

    def _check_heard(self) -> None:
        silent = time.monotonic() - self._last_recv
        if silent > self._stall:
            raise ConnectionDropped(f"no word from the server in {silent:.1f}s")

    def _send_request(self, read_timeout: float, connect_timeout: float) -> None:
        self._check_heard()
        super()._send_request(read_timeout, connect_timeout)

    def _send_ping(self, connect_timeout: float) -> None:
        self._check_heard()
        super()._send_ping(connect_timeout)


def tls_failure(client: KazooClient) -> str | None:
    """Why the last connection attempt failed its TLS handshake, if it did
    and the client never had a session: once our settings have worked, a
    refusal is the server's passing trouble (a certificate being rotated),
    worth waiting out."""
    connection = client._connection
    if isinstance(connection, _Connection) and not connection.connected_once:
        return connection.tls_error
    return None


def new_client(hosts: str, *, session_timeout: float, connect_timeout: float,
               credentials: str | None, tls: dict | None,
               tls_context: ssl.SSLContext | None = None) -> KazooClient:
    """A kazoo client, not started. It reconnects forever, at most a second
    apart (kazoo's default backs off to an hour); it never retries a command
    by itself: callers bound and retry their own. ``tls``: kazoo's TLS
    arguments; ``tls_context``, when given, is what sockets are wrapped
    with (see _Handler)."""
    client = KazooClient(
        hosts=hosts, timeout=session_timeout, handler=_Handler(connect_timeout, tls_context),
        auth_data=[("digest", credentials)] if credentials else None,
        connection_retry=KazooRetry(max_tries=-1, delay=0.05, backoff=2, max_jitter=0.3,
                                    max_delay=1.0),
        logger=KAZOO_LOG, **(tls or {}))
    # Ours instead of kazoo's (see _Connection); made the way KazooClient makes it.
    client._connection = _Connection(client, client._conn_retry.copy(), logger=client.logger)
    return client


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


#: Seconds without a reply after which wait() nudges the server; the
#: next nudges come after doubling pauses, up to NUDGE_MAX.
NUDGE_AFTER = 0.05
NUDGE_MAX = 1.0


def wait(result: Any, end: float, nudge: Callable[[], Any]) -> Any:
    """A kazoo async result, waited for until ``end`` (time.monotonic()) at
    most; KazooTimeoutError past it.

    ZooKeeper 3.8.0 followers now and then hold a reply back until the
    session sends them something else (measured here: about one write in
    5,000 through a follower, held until the client's next ping, seconds
    later; both TCP queues empty meanwhile). Any request releases it, so
    after NUDGE_AFTER seconds without a reply we send ``nudge()``, a cheap
    read on the same session, and again after pauses that double: a server
    that does not answer at all (frozen) is not sent 20 reads a second.
    """
    pause = NUDGE_AFTER
    while True:
        remaining = end - time.monotonic()
        try:
            return result.get(timeout=max(0.0, min(remaining, pause)))
        except KazooTimeoutError:
            if remaining <= pause:
                raise
            nudge()
            pause = min(pause * 2, NUDGE_MAX)
