"""The control server of `agent` and `run` modes.

GET /healthz (alive), GET /readyz (200 only while registered and not
stopping; the body says why not), GET|POST /prestop (runs or joins the stop sequence and blocks
until it is done; the kubelet's httpGet preStop hook), GET /status (JSON),
GET /metrics (Prometheus text). stdlib http.server with a thread per
connection, so a slow client never blocks the agent or another client.
"""
from __future__ import annotations

import hmac
import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .core import Registrar
from .metrics import Metrics
from .source import parse_listen
from .stopping import StopReport

log = logging.getLogger(__name__)

#: Seconds a client may take to send its request; a slow or silent client
#: costs one thread for at most this long.
REQUEST_TIMEOUT = 10.0

_GET, _BOTH = frozenset({"GET", "HEAD"}), frozenset({"GET", "HEAD", "POST"})
_ROUTES = {"/healthz": _GET, "/readyz": _GET, "/prestop": _BOTH, "/status": _GET,
           "/metrics": _GET}
_OPEN = {"/healthz", "/readyz"}  # no token needed: probes


class ControlServer:
    """Serves the endpoints for one Registrar. ``prestop`` is what /prestop
    runs: a callable returning the StopReport (the mode decides the trigger
    and the deadline)."""

    def __init__(self, registrar: Registrar, listen: str, prestop: Callable[[], StopReport],
                 token: str | None = None,
                 ready: Callable[[], tuple[bool, str]] | None = None):
        self.registrar = registrar
        self.listen = listen
        self.prestop = prestop
        self.token = token
        self.ready = ready or registrar.readiness
        self.metrics = Metrics(registrar)
        self.responses_sent = threading.Event()  # set after a /prestop answer went out
        where = parse_listen(listen)
        handler = _make_handler(self)
        if isinstance(where, str):
            if os.path.exists(where):
                os.unlink(where)  # a socket left by a previous run of this container
            self._server: socketserver.BaseServer = _UnixHTTPServer(where, handler)
        else:
            cls = _HTTPServer6 if ":" in where[0] else _HTTPServer
            self._server = cls(where, handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """Where it actually listens (the port is real when 0 was asked)."""
        addr = self._server.server_address
        if isinstance(addr, str):
            return f"unix:{addr}"
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"

    def start(self) -> "ControlServer":
        # A short poll interval: close() waits for one, and it runs at exit.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        name="control", daemon=True)
        self._thread.start()
        log.info("control server listening on %s", self.address)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if isinstance(self._server.server_address, str):
            try:
                os.unlink(self._server.server_address)
            except OSError:
                pass


class _LoggedErrors:
    def handle_error(self, request, client_address) -> None:
        # socketserver prints a traceback to stderr; a client that went away
        # mid-request is no news worth more than a debug line.
        log.debug("control: error while serving a request", exc_info=True)


class _HTTPServer(_LoggedErrors, ThreadingHTTPServer):
    pass


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _UnixHTTPServer(_LoggedErrors, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):  # BaseHTTPRequestHandler expects (host, port)
        request, _ = super().get_request()
        return request, ("unix", 0)


def _make_handler(control: ControlServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "registrar"
        timeout = REQUEST_TIMEOUT
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_HEAD(self) -> None:
            self._dispatch("HEAD")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def _dispatch(self, method: str) -> None:
            path = self.path.split("?", 1)[0]
            allowed = _ROUTES.get(path)
            if allowed is None:
                return self._send(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {path}"})
            if method not in allowed:
                return self._send(HTTPStatus.METHOD_NOT_ALLOWED,
                                  {"error": f"{method} not allowed on {path}"},
                                  {"Allow": ", ".join(sorted(allowed))})
            if path not in _OPEN and control.token and not self._authorized():
                return self._send(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong bearer token"},
                                  {"WWW-Authenticate": "Bearer"})
            self._discard_body()
            try:
                getattr(self, "_" + path[1:])(method)
            except Exception:  # noqa: BLE001 - the server must never die of one request
                log.exception("control: %s %s failed", method, path)
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error"})

        def _authorized(self) -> bool:
            given = self.headers.get("Authorization", "")
            expected = f"Bearer {control.token}"
            return hmac.compare_digest(given.encode(), expected.encode())

        def _discard_body(self) -> None:
            length = self.headers.get("Content-Length")
            if length and length.isdigit() and int(length) <= 65536:
                self.rfile.read(int(length))

        # -- endpoints ------------------------------------------------------

        def _healthz(self, method: str) -> None:
            self._send(HTTPStatus.OK, {"status": "alive"}, head=method == "HEAD")

        def _readyz(self, method: str) -> None:
            ready, reason = control.ready()
            self._send(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE,
                       {"ready": ready, "reason": reason}, head=method == "HEAD")

        def _prestop(self, method: str) -> None:
            report = control.prestop()
            self._send(HTTPStatus.OK if report.ok else HTTPStatus.INTERNAL_SERVER_ERROR,
                       {**report.to_dict(), "summary": report.summary()}, head=method == "HEAD")
            control.responses_sent.set()

        def _status(self, method: str) -> None:
            self._send(HTTPStatus.OK, control.registrar.status(observe=True),
                       head=method == "HEAD")

        def _metrics(self, method: str) -> None:
            body, content_type = control.metrics.render()
            self._send(HTTPStatus.OK, body, {"Content-Type": content_type},
                       head=method == "HEAD")

        # -- plumbing -------------------------------------------------------

        def _send(self, status: HTTPStatus, body: Any, headers: dict[str, str] | None = None,
                  head: bool = False) -> None:
            if isinstance(body, bytes):
                data = body
            else:
                data = (json.dumps(body, default=str) + "\n").encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            try:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)
            except OSError:
                pass  # the client went away; nothing to tell it

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            # Malformed requests land here (400, 414, 431, 501): answer JSON.
            if code == HTTPStatus.NOT_IMPLEMENTED:  # an unknown method
                code = HTTPStatus.METHOD_NOT_ALLOWED
            self.request_version = "HTTP/1.1"  # a status line even for "HTTP/0.9" garbage
            self.close_connection = True
            self._send(HTTPStatus(code), {"error": message or HTTPStatus(code).phrase})

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("control: " + format, *args)

    return Handler
