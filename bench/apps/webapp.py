#!/usr/bin/env python3
"""The app of the rolling-restart bench: an HTTP/1.1 server whose SIGTERM
behaviour is explicit and the same under every strategy.

    webapp.py --port P --events FILE [--on-term dies|graceful]
              [--work-ms 20] [--shutdown-timeout 10]

GET /health answers 200 at once; any other GET answers 200 after
``--work-ms`` of simulated work. A thread per connection, so several
requests are in flight at a time; connections are kept alive unless the
client sends ``Connection: close``.

On SIGTERM:
  dies      exit at once (status 0): requests in flight are cut, every
            connection is closed by the kernel.
  graceful  what Go's http.Server.Shutdown, gunicorn and uvicorn do: stop
            accepting at once (the listening socket is shut down, so a new
            connection is refused and one still waiting in the accept
            queue is reset), close the idle kept-alive connections, finish
            every request already being served (answering it with
            ``Connection: close``; at most --shutdown-timeout), then exit 0.

Events (JSON lines, time.monotonic(), see registrar_testing/events.py):
ready, sigterm (with the requests in flight), listener_closed, drained
(with what the wait left unfinished), exit (with requests served).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from registrar_testing.events import Events


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # socketserver's default of 5 drops SYNs under a burst

    def __init__(self, addr, handler, work: float):
        super().__init__(addr, handler)
        self.work = work
        self.lock = threading.Lock()
        self.stopping = False
        self.idle: set[Handler] = set()  # connections waiting for their next request
        self.busy: set[Handler] = set()  # connections serving a request
        self.in_flight = 0
        self.served = 0
        self.all_done = threading.Condition(self.lock)

    def stop_connections(self) -> None:
        """Close every idle connection; busy ones close after their response."""
        with self.lock:
            self.stopping = True
            for h in list(self.idle):
                _shutdown(h.connection)
            self.idle.clear()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def handle(self) -> None:
        try:
            self.close_connection = True
            while True:
                with self.server.lock:
                    if self.server.stopping:
                        return
                    self.server.idle.add(self)
                self.handle_one_request()
                with self.server.lock:
                    self.server.idle.discard(self)
                    self.server.busy.discard(self)
                    self.server.all_done.notify_all()
                if self.close_connection:
                    return
        finally:
            with self.server.lock:
                self.server.idle.discard(self)
                self.server.busy.discard(self)
                self.server.all_done.notify_all()

    def parse_request(self) -> bool:
        # The request line has arrived: from now on this connection is busy
        # (unless the stop closed it a moment ago: then its answer fails).
        with self.server.lock:
            self.server.idle.discard(self)
            self.server.busy.add(self)
        return super().parse_request()

    def do_GET(self):
        if self.path == "/health":
            return self._send(b"ok\n")
        with self.server.lock:
            self.server.in_flight += 1
        try:
            time.sleep(self.server.work)
            self._send(b"hello\n")
        finally:
            with self.server.lock:
                self.server.in_flight -= 1
                self.server.served += 1
        return None

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        if self.server.stopping:
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args):
        pass


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--on-term", choices=["dies", "graceful"], default="graceful")
    parser.add_argument("--work-ms", type=float, default=20.0)
    parser.add_argument("--shutdown-timeout", type=float, default=10.0)
    args = parser.parse_args()
    events = Events(args.events)

    # SIGTERM is blocked in every thread and taken by sigwait() in the main
    # thread: no handler, no polling delay.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    server = Server(("127.0.0.1", args.port), Handler, args.work_ms / 1000)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    events.record("ready", port=args.port)

    signal.sigwait({signal.SIGTERM})
    events.record("sigterm", in_flight=server.in_flight, mode=args.on_term)
    if args.on_term == "dies":
        events.record("exit", status=0, served=server.served)
        os._exit(0)
    # On Linux, shutdown() of a listening socket takes it out of LISTEN (a
    # new connection is refused, one waiting in the accept queue is reset)
    # and wakes the accept loop; the fd stays valid until server_close().
    server.socket.shutdown(socket.SHUT_RD)
    closed = events.record("listener_closed")
    server.shutdown()  # the accept loop ends
    server.stop_connections()
    end = closed + args.shutdown_timeout
    with server.lock:
        while server.busy and time.monotonic() < end:
            server.all_done.wait(max(end - time.monotonic(), 0))
        unfinished = len(server.busy)
    events.record("drained", seconds=time.monotonic() - closed, unfinished=unfinished)
    events.record("exit", status=0, served=server.served)
    os._exit(0)  # do not wait for a handler the timeout gave up on


if __name__ == "__main__":
    sys.exit(main())
