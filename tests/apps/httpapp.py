"""A sample app: an HTTP server that records what happens to it.

    httpapp.py --port P --events FILE [--host ADDR] [--on-term exit|die|ignore]
               [--term-delay S] [--exit-code N] [--health ok|never]
               [--listen-after S|never]

Events (JSON lines in FILE): ready, sigterm, sigterm_check (every etcd member's view,
when CHECK_ETCD_ENDPOINTS/CHECK_ETCD_KEY are set), sighup, exit, crash,
killed, orphan_spawned, orphan_exit.

It listens at once, or --listen-after S seconds (never: not at all), and
records "listening" just before. GET /slow?ms=N answers after N ms; GET
/stream?chunks=N&every=MS sends N chunks MS apart (both record "served"
when done). GET /health answers 200 (or 503 forever with --health never); GET
/crash?code=N exits at once with status N; GET /kill?sig=NAME kills the app
with that signal (KILL, ABRT...: not TERM or HUP, which it handles); GET
/orphan double-forks a grandchild that outlives its parent by 0.2 s, so
that it is re-parented to the PID-1 wrapper and has to be reaped there.
"""
from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from registrar_testing.events import Events, check_from_env


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="the address it listens on")
    parser.add_argument("--events", required=True)
    parser.add_argument("--on-term", choices=["exit", "die", "ignore"], default="exit",
                        help="exit: record, wait --term-delay, exit --exit-code; die: record, "
                             "then die of SIGTERM's default action; ignore: record only")
    parser.add_argument("--term-delay", type=float, default=0.0)
    parser.add_argument("--exit-code", type=int, default=0)
    parser.add_argument("--health", choices=["ok", "never"], default="ok")
    parser.add_argument("--listen-after", default="0",
                        help="seconds before it listens, or never")
    args = parser.parse_args()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a killed app leaves no core file

    events = Events(args.events)
    # A flag, not a threading.Event: Event.set() in a signal handler can
    # deadlock on the lock the interrupted main thread holds inside wait().
    stopping: list[bool] = []

    def on_term(signum, _frame):
        events.record("sigterm")
        check_from_env(events, "sigterm_check")
        if args.on_term == "die":
            events.record("exit", status=-signum)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        elif args.on_term == "exit":
            stopping.append(True)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, lambda *_: events.record("sighup"))

    if args.listen_after != "0":
        end = None if args.listen_after == "never" else time.monotonic() + float(args.listen_after)
        while not stopping and (end is None or time.monotonic() < end):
            time.sleep(0.01)
        if stopping:
            events.record("exit", status=args.exit_code)
            return args.exit_code
    events.record("listening", port=args.port)
    server = ThreadingHTTPServer((args.host, args.port), _handler(events, args.health))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    events.record("ready", port=args.port)
    while not stopping:
        time.sleep(0.01)
    if args.term_delay:
        time.sleep(args.term_delay)  # "finishing in-flight requests"
    server.shutdown()
    events.record("exit", status=args.exit_code)
    return args.exit_code


def _handler(events: Events, health: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path == "/health":
                return self._send(200 if health == "ok" else 503, health)
            if url.path == "/crash":
                code = int(query.get("code", "3"))
                events.record("crash", status=code)
                self._send(200, "crashing")
                os._exit(code)
            if url.path == "/kill":
                sig = signal.Signals["SIG" + query.get("sig", "KILL")]
                events.record("killed", signal=sig.name)
                self._send(200, "dying")
                os.kill(os.getpid(), sig)  # by its default action (no handler for these)
                return None
            if url.path == "/orphan":
                _spawn_orphan(events)
                return self._send(200, "orphan spawned")
            if url.path == "/slow":
                time.sleep(int(query.get("ms", "500")) / 1000)
                self._send(200, "slow")
                events.record("served", path="/slow")
                return None
            if url.path == "/stream":
                self._stream(int(query.get("chunks", "10")), int(query.get("every", "100")))
                events.record("served", path="/stream")
                return None
            return self._send(200, "hello")

        def _stream(self, chunks: int, every_ms: int) -> None:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(chunks):
                self.wfile.write(b"6\r\nchunk\n\r\n")
                self.wfile.flush()
                time.sleep(every_ms / 1000)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def _send(self, status: int, text: str) -> None:
            body = (text + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()

        def log_message(self, *_args):
            pass

    return Handler


def _spawn_orphan(events: Events) -> None:
    child = os.fork()
    if child == 0:
        if os.fork() == 0:  # the grandchild: orphaned once its parent exits
            time.sleep(0.2)
            events.record("orphan_exit")
            os._exit(0)
        os._exit(0)
    os.waitpid(child, 0)
    events.record("orphan_spawned")


if __name__ == "__main__":
    sys.exit(main())
