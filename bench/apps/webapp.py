#!/usr/bin/env python3
"""The app of the rolling-restart bench: an HTTP server whose SIGTERM
behaviour is explicit and the same in every mode.

    webapp.py --port P --events FILE [--on-term graceful|immediate]
              [--work-ms MS] [--shutdown-timeout S]

GET /health answers 200 at once; any other GET answers 200 after
``--work-ms`` of simulated work (a thread per connection, so several
requests are in flight at a time).

On SIGTERM:
  graceful  (default; what Go's http.Server.Shutdown, gunicorn, uvicorn
            do) stop accepting at once: the listening socket is shut down,
            so a new connection is refused and one still waiting in the
            accept queue is reset; then every request already accepted is
            finished (at most --shutdown-timeout), then exit 0.
  immediate exit at once (status 0): requests in flight are cut.

Events (JSON lines, time.monotonic(), see registrar_testing/events.py): ready,
sigterm (with the number of requests in flight), listener_closed, drained
(with what the join left unfinished), exit (with requests served).
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
    daemon_threads = False  # server_close() joins the handlers: in-flight requests finish
    block_on_close = True
    request_queue_size = 128  # socketserver's default of 5 drops SYNs under a burst

    def __init__(self, addr, handler, work: float):
        super().__init__(addr, handler)
        self.work = work
        self.lock = threading.Lock()
        self.in_flight = 0
        self.served = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # the client's "Connection: close" ends each connection
    server: Server

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
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args):
        pass


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--on-term", choices=["graceful", "immediate"], default="graceful")
    parser.add_argument("--work-ms", type=float, default=5.0)
    parser.add_argument("--shutdown-timeout", type=float, default=10.0)
    args = parser.parse_args()
    events = Events(args.events)

    # SIGTERM is blocked in every thread and taken by sigwait() in the main
    # thread: no handler, no polling delay.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    server = Server(("127.0.0.1", args.port), Handler, args.work_ms / 1000)
    loop = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    loop.start()
    events.record("ready", port=args.port)

    signal.sigwait({signal.SIGTERM})
    events.record("sigterm", in_flight=server.in_flight, mode=args.on_term)
    if args.on_term == "immediate":
        events.record("exit", status=0, served=server.served)
        os._exit(0)
    # Stop accepting at once: on Linux, shutdown() of a listening socket
    # takes it out of LISTEN (a new connection is refused, one waiting in
    # the accept queue is reset) and wakes the accept loop; the fd stays
    # valid until server_close().
    server.socket.shutdown(socket.SHUT_RD)
    closed = events.record("listener_closed")
    server.shutdown()  # the accept loop ends
    joiner = threading.Thread(target=server.server_close, daemon=True)  # joins the handlers
    joiner.start()
    joiner.join(args.shutdown_timeout)
    events.record("drained", seconds=time.monotonic() - closed, unfinished=server.in_flight)
    events.record("exit", status=0, served=server.served)
    os._exit(0)  # do not wait for a handler the timeout gave up on


if __name__ == "__main__":
    sys.exit(main())
