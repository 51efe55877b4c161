"""The control server of `agent` and `run` modes.

GET /healthz (alive), GET /readyz (200 only while registered and not
stopping; the body says why not), GET|POST /prestop (runs or joins the stop
sequence and blocks until it is done; the kubelet's httpGet preStop hook),
GET /status (JSON), GET /metrics (Prometheus text). With ``metrics_listen``
a second address serves GET /metrics alone, without the token, for
Prometheus' usual Kubernetes scraping (which sends no credentials).

One asyncio loop in a thread of its own reads every connection, so a slow,
idle or hostile client costs a few kilobytes, never a thread: a thousand
connections, or a slowloris, leave /healthz answering in milliseconds. Only
the endpoints that may block (/readyz, /status, /metrics, /prestop) run in
daemon threads, a bounded number per kind. HTTP/1.0 and 1.1 only, strictly
framed: a request's body is read (up to MAX_BODY) before it is answered or
the connection is closed, so a body is never taken for the next request.
"""
from __future__ import annotations

import asyncio
import email.utils
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from ._threads import spawn
from .core import Registrar
from .logs import Quiet
from .prestop import report_file
from .source import parse_listen
from .stopping import StopReport

log = logging.getLogger(__name__)

#: Seconds a client may take to send a whole request (request line,
#: headers, body), counted from the connection or the previous answer; a
#: silent keep-alive connection is closed after as long.
REQUEST_TIMEOUT = 10.0
#: Request line plus headers, bytes; beyond it: 431 and close.
MAX_HEAD = 16384
MAX_HEADERS = 100
#: Request body, bytes (no endpoint uses one); beyond it: 413 and close.
MAX_BODY = 16384
#: Open connections (fewer when the file descriptor limit is low). Past it
#: a new one evicts one already answered, else the longest idle, else the
#: longest still sending its request; when all are being answered, the new
#: one gets 503 and is closed.
MAX_CONNECTIONS = 1024
#: File descriptors kept for everything else (registry clients, probes, logs).
_FD_RESERVE = 128
#: listen() backlog: a burst of connections waits in the kernel instead of
#: being dropped (the kernel caps it at net.core.somaxconn).
BACKLOG = 1024
_ACCEPT_BATCH = 16
_SOCKET_BUFFER = 65536
#: Threads at most per kind of blocking endpoint.
WORKERS = {"probe": 2, "work": 4, "prestop": 16}
#: After an error answer, how long to read and discard what the client still
#: sends before closing (closing with unread data would reset the answer).
_LINGER_ON_CLOSE = 1.0

_GET, _BOTH = frozenset({"GET", "HEAD"}), frozenset({"GET", "HEAD", "POST"})
_ROUTES = {"/healthz": _GET, "/readyz": _GET, "/prestop": _BOTH, "/status": _GET,
           "/metrics": _GET}
_OPEN = {"/healthz", "/readyz"}  # no token needed: probes
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")
_TARGET = re.compile(rb"[\x21-\x7e]+")


class MetricsListenError(OSError):
    """The metrics_listen address could not be bound."""


class ControlServer:
    """Serves the endpoints for one Registrar. ``prestop`` is what /prestop
    runs: a callable returning the StopReport (the mode decides the trigger
    and the deadline). Listens from construction (so a busy address fails
    there); serves once started."""

    def __init__(self, registrar: Registrar, listen: str, prestop: Callable[[], StopReport],
                 token: str | None = None,
                 ready: Callable[[], tuple[bool, str]] | None = None, *,
                 request_timeout: float = REQUEST_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS,
                 metrics_listen: str | None = None):
        self.registrar = registrar
        self.listen = listen
        self.prestop = prestop
        self.token = token
        self._refusals = Quiet(log)
        self.ready = ready or registrar.readiness
        self._metrics = None  # made at the first scrape: prometheus_client costs ~10 MB
        self.request_timeout = request_timeout
        self.max_connections = min(max_connections, _fd_room())
        self.responses_sent = threading.Event()  # set after a /prestop answer went out
        self._prestops = 0  # /prestop requests being answered
        self._changed = threading.Condition()
        self._conns: set[_Connection] = set()
        self._running = {kind: 0 for kind in WORKERS}  # threads per kind of endpoint
        self._pending: dict[str, deque] = {kind: deque() for kind in WORKERS}
        self._where = parse_listen(listen)
        self._sock = _bind(self._where)
        self._address = _sock_address(self._where, self._sock)
        self._report_path = report_file(self._where) if isinstance(self._where, str) else None
        if self._report_path:
            _unlink(self._report_path)  # a report left by a previous run of this container
        self._metrics_where = parse_listen(metrics_listen) if metrics_listen else None
        self._metrics_sock = None
        if self._metrics_where is not None:
            try:
                self._metrics_sock = _bind(self._metrics_where)
            except BaseException as exc:
                self._sock.close()
                if isinstance(exc, OSError):
                    raise MetricsListenError(exc.errno, exc.strerror) from exc
                raise
        #: (where, socket, serves /metrics alone) for each address listened on.
        self._listening = [(self._where, self._sock, False)]
        if self._metrics_sock is not None:
            self._listening.append((self._metrics_where, self._metrics_sock, True))
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.AbstractServer] = []
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def address(self) -> str:
        """Where it listens (the port is real when 0 was asked)."""
        return self._address

    @property
    def metrics_address(self) -> str | None:
        """Where /metrics is served without a token, if anywhere."""
        if self._metrics_sock is None:
            return None
        return _sock_address(self._metrics_where, self._metrics_sock)

    def render_metrics(self) -> tuple[bytes, str]:
        """The Prometheus text; the metrics stack is imported at the first call."""
        if self._metrics is None:
            from .metrics import Metrics

            self._metrics = Metrics(self.registrar)
        return self._metrics.render()

    @property
    def connections(self) -> int:
        """Connections open right now."""
        return len(self._conns)

    def start(self) -> ControlServer:
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="control",
                                        daemon=True)
        self._thread.start()
        started.wait(5)
        log.info("control server listening on %s", self.address)
        if self._metrics_sock is not None:
            log.info("serving /metrics without a token on %s", self.metrics_address)
        return self

    def hand_over(self, report: StopReport) -> None:
        """Leave the stop's report where a `registrar prestop` that comes
        after this process has gone looks for it: next to a unix socket
        (a directory the hook's container shares). Over TCP only the
        lingering server hands it over."""
        if self._report_path is None:
            return
        doc = {"ok": report.ok, "summary": report.summary(), "finished_at": time.time(),
               "pid": os.getpid(), "report": report.to_dict()}
        tmp = f"{self._report_path}.{os.getpid()}.tmp"
        try:
            # 0600: the report names the registry's endpoints and the
            # consumers' addresses; the hook that reads it runs as this user.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, default=str)
            os.replace(tmp, self._report_path)
        except OSError as exc:
            log.warning("cannot leave the stop report in %s: %s", self._report_path,
                        exc.strerror or exc)

    def prestops_in_flight(self) -> int:
        """/prestop requests received and not yet answered."""
        with self._changed:
            return self._prestops

    def wait_changed(self, timeout: float) -> None:
        """Sleep until a /prestop is received or answered, or timeout."""
        with self._changed:
            self._changed.wait(max(timeout, 0))

    def close(self, grace: float = 0.5) -> None:
        """Stop listening; give requests already being received or answered
        up to ``grace`` seconds to get their answer (a /prestop among them
        gets the report), then close every connection."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None and self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(grace), self._loop)
            try:
                future.result(grace + 2)
            except Exception:  # closing must not fail the exit
                log.debug("control: shutdown did not finish", exc_info=True)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(2)
        if not self._loop.is_running():
            self._loop.close()
        for where, sock, _metrics_only in self._listening:
            sock.close()
            if isinstance(where, str):
                _unlink(where)

    # -- the loop (every method below runs in the loop's thread) ----------------

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            for where, sock, metrics_only in self._listening:
                make = (self._loop.create_unix_server if isinstance(where, str)
                        else self._loop.create_server)
                # asyncio accepts up to ``backlog`` connections in one go and
                # listens with it: accept in small batches (a burst then takes
                # turns with the requests already in), listen with the real one.
                self._servers.append(self._loop.run_until_complete(
                    make(lambda m=metrics_only: _Connection(self, metrics_only=m), sock=sock,
                         backlog=_ACCEPT_BATCH)))
                sock.listen(BACKLOG)
        finally:
            started.set()
        self._loop.run_forever()

    async def _shutdown(self, grace: float) -> None:
        for server in self._servers:
            server.close()  # no new connection from here on
        end = time.monotonic() + grace
        while time.monotonic() < end and any(c.busy() for c in self._conns):
            await asyncio.sleep(0.01)
        for conn in list(self._conns):
            conn.abort()

    def _admit(self, conn: _Connection) -> bool:
        """Room for one more connection: past the cap, close one already
        answered, else the one idle longest, else the one that has been
        sending its request longest."""
        if len(self._conns) >= self.max_connections:
            for state in ("closing", "idle", "reading"):
                waiting = [c for c in self._conns if c.state == state]
                if waiting:
                    min(waiting, key=lambda c: c.since).abort()
                    break
            else:
                return False
        self._conns.add(conn)
        return True

    def _submit(self, kind: str, fn: Callable[[], Any],
                done: Callable[[Future], None]) -> None:
        """Run a call that may block in a daemon thread (a stop stuck on a
        dead registry must never hold the process at exit), at most
        WORKERS[kind] at a time; ``done`` gets its future in the loop."""
        if self._running[kind] >= WORKERS[kind]:
            self._pending[kind].append((fn, done))
            return
        self._running[kind] += 1

        def finished(future: Future) -> None:
            self._running[kind] -= 1
            if self._pending[kind]:
                self._submit(kind, *self._pending[kind].popleft())
            done(future)

        def hand_back(future: Future) -> None:
            try:
                self._loop.call_soon_threadsafe(finished, future)
            except RuntimeError:  # the server was closed meanwhile
                pass

        spawn(fn, name=f"control-{kind}").add_done_callback(hand_back)

    def _answer(self, conn: _Connection, req: _Request) -> None:
        """Answer at once, or hand the call to a thread and answer from there."""
        route = _ROUTES.get(req.path)
        if conn.metrics_only and req.path != "/metrics":
            route = None  # the token-free address serves nothing else
        if route is None:
            return conn.reply(req, HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {req.path}"})
        if req.method not in route:
            return conn.reply(req, HTTPStatus.METHOD_NOT_ALLOWED,
                              {"error": f"{req.method} not allowed on {req.path}"},
                              {"Allow": ", ".join(sorted(route))})
        if (req.path not in _OPEN and self.token and not conn.metrics_only
                and not self._authorized(req)):
            self._note_refusal(conn, req)
            return conn.reply(req, HTTPStatus.UNAUTHORIZED,
                              {"error": "missing or wrong bearer token"},
                              {"WWW-Authenticate": "Bearer"})
        if req.path == "/healthz":
            return conn.reply(req, HTTPStatus.OK, {"status": "alive"})
        if req.path == "/prestop":
            with self._changed:
                self._prestops += 1
                self._changed.notify_all()
        # /readyz's reason names the registry's endpoints and its errors: for
        # a caller with the token, or on this host; any other peer (the
        # kubelet's probe reads the status alone) gets the verdict only.
        private = not self.token or _local(conn) or self._authorized(req)
        kind, call, answer = {
            "/readyz": ("probe", self.ready, _readyz if private else _readyz_verdict),
            "/status": ("work", lambda: self.registrar.status(observe=True), _as_json),
            "/metrics": ("work", self.render_metrics, _as_text),
            "/prestop": ("prestop", self.prestop, _prestop),
        }[req.path]

        def done(future: Future) -> None:
            try:
                status, body, headers = answer(future.result())
            except Exception:  # one request's failure is its own
                log.error("control: %s %s failed", req.method, req.path,
                          exc_info=future.exception())
                status, body, headers = (HTTPStatus.INTERNAL_SERVER_ERROR,
                                         {"error": "internal error"}, None)
            conn.reply(req, status, body, headers)
            if req.path == "/prestop":
                with self._changed:
                    self._prestops -= 1
                    self._changed.notify_all()
                self.responses_sent.set()

        conn.wait_for_answer()
        self._submit(kind, call, done)

    def _note_refusal(self, conn: _Connection, req: _Request) -> None:
        """Log a 401: the first, then at most one a minute (a caller that
        retries, or a scanner, must not flood the log). A preStop hook with
        the wrong token shows up here and not only in the kubelet's events."""
        peer = conn.transport.get_extra_info("peername") if conn.transport else None
        who = peer[0] if isinstance(peer, tuple) else "the unix socket"
        self._refusals.warn("401", f"control: {req.method} {req.path} from {who} refused: "
                                   f"{'wrong' if req.headers.get('authorization') else 'no'} "
                                   f"bearer token (401)")

    def _authorized(self, req: _Request) -> bool:
        given = req.headers.get("authorization", "").encode("latin-1")
        expected = f"Bearer {self.token}".encode()
        return hmac.compare_digest(given, expected)


def _readyz(result: tuple[bool, str]) -> tuple[HTTPStatus, Any, None]:
    ready, reason = result
    return (HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
            {"ready": ready, "reason": reason}, None)


def _readyz_verdict(result: tuple[bool, str]) -> tuple[HTTPStatus, Any, None]:
    status, body, headers = _readyz(result)
    return status, {"ready": body["ready"]}, headers


def _local(conn: _Connection) -> bool:
    """Whether the peer is on this host: a unix socket, or loopback."""
    peer = conn.transport.get_extra_info("peername") if conn.transport else None
    if not isinstance(peer, tuple):
        return True  # a unix socket: a peer with access to its file
    try:
        addr = ipaddress.ip_address(peer[0].split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def _as_json(result: Any) -> tuple[HTTPStatus, Any, None]:
    return HTTPStatus.OK, result, None


def _as_text(result: tuple[bytes, str]) -> tuple[HTTPStatus, Any, dict[str, str]]:
    body, content_type = result
    return HTTPStatus.OK, body, {"Content-Type": content_type}


def _prestop(report: StopReport) -> tuple[HTTPStatus, Any, None]:
    return (HTTPStatus.OK if report.ok else HTTPStatus.INTERNAL_SERVER_ERROR,
            {**report.to_dict(), "summary": report.summary()}, None)


class _Connection(asyncio.Protocol):
    """One client connection, parsed as its bytes arrive: no task, no
    thread. States: idle (no byte of a request yet), reading, serving (an
    answer is being made in a thread), closing (answered; reading and
    dropping what still comes for a moment)."""

    def __init__(self, server: ControlServer, metrics_only: bool = False):
        self.server = server
        self.metrics_only = metrics_only  # accepted on the metrics_listen address
        self.loop = server._loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.state = "idle"
        self.opened = self.since = time.monotonic()
        self.served = 0
        self.eof = False
        self.lost = False
        self.write_paused = False
        self.continued = False  # "100 Continue" sent for the request being read
        self.line_checked = False  # the request line being read has passed
        self.scanned = 0  # the buffer holds no end of the head before this
        self.processing = False
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio's callbacks ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.server._admit(self):
            transport.write(_response(HTTPStatus.SERVICE_UNAVAILABLE,  # type: ignore[attr-defined]
                                      {"error": "too many connections"}, close=True))
            transport.close()
            self.lost = True
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:  # small kernel buffers: requests and answers are small, and a
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):  # client that never reads
                sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)  # is seen soon
        self._arm(self.server.request_timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self.state == "closing" or self.lost:
            return  # read and dropped
        self.buffer += data
        if self.state == "serving" or self.write_paused:
            if len(self.buffer) > MAX_HEAD + MAX_BODY:
                self.transport.pause_reading()  # a client racing ahead of its answers
            return
        self._process()

    def eof_received(self) -> bool:
        self.eof = True
        if self.state != "serving":
            self._close()  # nothing more can complete a request, or it is all answered
        return True  # an answer may still be on its way: close when it is out

    def pause_writing(self) -> None:
        self.write_paused = True  # a client that does not read its answers
        self.transport.pause_reading()
        self._arm(self.server.request_timeout, self.abort)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.state == "closing":
            self._arm(_LINGER_ON_CLOSE, self._close)
        elif self.state in ("idle", "reading"):
            self.transport.resume_reading()
            self._arm(self.server.request_timeout, self._timed_out)
            self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.timer is not None:
            self.timer.cancel()
        self.server._conns.discard(self)

    # -- the work -----------------------------------------------------------------

    def busy(self) -> bool:
        """Receiving or being answered, or so new that its request may be
        on its way: what close() lets finish."""
        return (self.state in ("reading", "serving")
                or (self.state == "idle" and not self.served
                    and time.monotonic() - self.opened < 0.25))

    def abort(self) -> None:
        self.server._conns.discard(self)
        self.lost = True
        if self.transport is not None:
            self.transport.abort()

    def _to(self, state: str) -> None:
        if state != self.state:
            self.state, self.since = state, time.monotonic()

    def _arm(self, seconds: float, then: Callable[[], None]) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(seconds, then)

    def _process(self) -> None:
        """Answer every whole request in the buffer, in order (a loop, not
        a recursion through reply(): a pipeline may hold thousands)."""
        if self.processing:
            return
        self.processing = True
        try:
            while not (self.lost or self.write_paused) and self.state in ("idle", "reading"):
                while self.buffer.startswith((b"\r\n", b"\n")):  # allowed before a request
                    del self.buffer[:2 if self.buffer.startswith(b"\r") else 1]
                    self.scanned = 0
                if not self.buffer:
                    return
                self._to("reading")
                request = self._take_request()
                if request is None:
                    return  # wait for more
                if isinstance(request, _Refusal):
                    return self._refuse(request)
                self._to("serving")
                self.served += 1
                self.server._answer(self, request)
        finally:
            self.processing = False

    def _take_request(self) -> _Request | _Refusal | None:
        """The next whole request out of the buffer (its body dropped), a
        refusal, or None while it is incomplete."""
        buf = self.buffer
        if not self.line_checked:
            line_end = buf.find(b"\n", self.scanned)
            if line_end < 0:
                self.scanned = len(buf)
                return _too_large() if len(buf) > MAX_HEAD else None
            refusal = _check_request_line(bytes(buf[:line_end]).rstrip(b"\r"))
            if refusal is not None:
                return refusal
            self.line_checked, self.scanned = True, line_end
        # Scan each byte about once, however slowly the head arrives.
        ends = [i for i in (buf.find(b"\n\r\n", self.scanned), buf.find(b"\n\n", self.scanned))
                if i >= 0]
        if not ends:
            self.scanned = max(self.scanned, len(buf) - 2)
            return _too_large() if len(buf) > MAX_HEAD else None
        end = min(ends)
        head_end = end + (3 if buf[end + 1:end + 2] == b"\r" else 2)
        if head_end > MAX_HEAD:
            return _too_large()
        lines = [line.rstrip(b"\r") for line in bytes(buf[:end]).split(b"\n")]
        if len(lines) > MAX_HEADERS + 1:
            return _too_large()
        request = _parse(lines)
        if isinstance(request, _Refusal):
            return request
        if request.length > MAX_BODY:
            return _Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"a request body of at most {MAX_BODY} bytes")
        if len(buf) < head_end + request.length:
            if request.expect_continue and not self.continued:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self.continued = True
            return None
        del buf[:head_end + request.length]
        self.continued = self.line_checked = False
        self.scanned = 0
        return request

    def wait_for_answer(self) -> None:
        """The answer is made in a thread: read nothing more meanwhile, and
        let no timer cut it (a /prestop lasts as long as the stop)."""
        self.transport.pause_reading()
        if self.timer is not None:
            self.timer.cancel()

    def reply(self, req: _Request, status: HTTPStatus, body: Any,
              headers: dict[str, str] | None = None) -> None:
        """Send an answer; then the next request, or the close."""
        if self.lost:
            return
        self.transport.write(_response(status, body, headers, close=not req.keep_alive,
                                       head=req.method == "HEAD"))
        log.debug("control: %s %s -> %d", req.method, req.path, status)
        if not req.keep_alive or self.eof:
            return self._finish()
        self._to("idle")
        if self.write_paused:
            return  # resume_writing() goes on with the next request
        self.transport.resume_reading()
        self._arm(self.server.request_timeout, self._timed_out)
        self._process()

    def _refuse(self, refusal: _Refusal) -> None:
        self.line_checked, self.scanned = False, 0
        log.debug("control: refused a request: %d %s", refusal.status, refusal.message)
        self.transport.write(_response(refusal.status, {"error": refusal.message}, close=True))
        self._finish()

    def _timed_out(self) -> None:
        if self.state == "reading":
            self._refuse(_Refusal(HTTPStatus.REQUEST_TIMEOUT,
                                  "the request took too long to arrive"))
        else:
            self._close()

    def _finish(self) -> None:
        """Half-close and read (and drop) what the client still sends for a
        moment before closing: closing with unread input would reset the
        connection, and could destroy the answer before it is read."""
        self._to("closing")
        self.buffer.clear()
        if self.eof or not self.transport.can_write_eof():
            return self._close()
        try:
            self.transport.write_eof()
        except OSError:  # the client is gone already
            return self.abort()
        self.transport.resume_reading()
        self._arm(_LINGER_ON_CLOSE, self._close)

    def _close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.transport.get_write_buffer_size() and self.write_paused:
            self.abort()  # it will never read what is left
        else:
            self.transport.close()


def _too_large() -> _Refusal:
    return _Refusal(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                    f"request line and headers exceed {MAX_HEAD} bytes or {MAX_HEADERS} fields")


@dataclass
class _Request:
    method: str
    path: str
    version: tuple[int, int]
    headers: dict[str, str]
    length: int
    keep_alive: bool
    expect_continue: bool


@dataclass
class _Refusal:
    status: HTTPStatus
    message: str


def _check_request_line(line: bytes) -> _Refusal | None:
    """Why a request line is refused (HTTP/0.9, other versions, garbage), or None."""
    bad = HTTPStatus.BAD_REQUEST
    parts = line.split(b" ")
    if len(parts) == 2 and _TOKEN.fullmatch(parts[0]):
        return _Refusal(bad, "HTTP/0.9 is not supported: use HTTP/1.1")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        return _Refusal(bad, "malformed request line")
    version = _VERSION.fullmatch(parts[2])
    if version is None:
        return _Refusal(bad, "malformed HTTP version")
    if version[0] not in (b"HTTP/1.0", b"HTTP/1.1"):
        return _Refusal(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED,
                        f"{version[0].decode()} is not supported: use HTTP/1.1")
    return None


def _parse(lines: list[bytes]) -> _Request | _Refusal:
    """The request line (checked already) and headers -> a request, or why
    it is refused."""
    bad = HTTPStatus.BAD_REQUEST
    method, target, version_text = lines[0].split(b" ")
    major, minor = int(version_text[5:6]), int(version_text[7:8])
    if target.startswith((b"http://", b"https://")):  # absolute-form
        target = b"/" + target.split(b"/", 3)[3] if target.count(b"/") >= 3 else b"/"
    if not target.startswith(b"/"):
        return _Refusal(bad, "the request target must be a path")
    headers: dict[str, str] = {}
    lengths: set[bytes] = set()
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):  # also obs-fold, "name :", garbage
            return _Refusal(bad, "malformed header line")
        value = value.strip(b" \t")
        if any(c < 0x20 and c != 0x09 or c == 0x7f for c in value):
            return _Refusal(bad, "a control character in a header")
        key = name.decode().lower()
        if key == "content-length":
            lengths.update(v.strip(b" \t") for v in value.split(b","))
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    if "transfer-encoding" in headers:
        return _Refusal(HTTPStatus.NOT_IMPLEMENTED, "Transfer-Encoding is not supported: "
                                                    "send Content-Length")
    if len(lengths) > 1 or any(not (v.isdigit() and len(v) <= 12) for v in lengths):
        return _Refusal(bad, "malformed Content-Length")
    connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = (major, minor) == (1, 1) and "close" not in connection
    path = target.split(b"?", 1)[0].split(b"#", 1)[0].decode("ascii")
    return _Request(method.decode("ascii"), path, (major, minor), headers,
                    int(next(iter(lengths))) if lengths else 0, keep_alive,
                    (major, minor) == (1, 1)
                    and headers.get("expect", "").lower() == "100-continue")


def _response(status: HTTPStatus, body: Any, headers: dict[str, str] | None = None,
              close: bool = False, head: bool = False) -> bytes:
    if isinstance(body, bytes):
        data = body
    else:
        data = (json.dumps(body, default=str) + "\n").encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    lines = [f"HTTP/1.1 {status.value} {status.phrase}", "Server: registrar",
             f"Date: {email.utils.formatdate(usegmt=True)}",
             *(f"{name}: {value}" for name, value in (headers or {}).items()),
             f"Content-Length: {len(data)}"]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else data)


def _sock_address(where: tuple[str, int] | str, sock: socket.socket) -> str:
    """A listening socket's address as the logs and `status` show it (the
    port is real when 0 was asked)."""
    if isinstance(where, str):
        return f"unix:{where}"
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind(where: tuple[str, int] | str) -> socket.socket:
    """The listening socket (bound and listening: a busy address fails here)."""
    if isinstance(where, str):
        if os.path.exists(where):
            os.unlink(where)  # a socket left by a previous run of this container
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in where[0] else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(where)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _fd_room() -> int:
    """How many connections the file descriptor limit leaves room for: past
    it accept() would fail, and asyncio stops accepting for a second."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(soft - _FD_RESERVE, 16)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
