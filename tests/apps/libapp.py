"""A sample app that uses registrar as a library:

    libapp.py --config F --port P --events FILE

It serves HTTP, builds ``Registrar.from_config(F)``, starts it, installs its
own SIGTERM handler (records ``sigterm`` with every etcd member's view, then
lets the main loop exit) and *then* ``install_signal_handlers()``, as the
docstring of that method asks. Every delivery of SIGTERM to the process is
recorded as ``delivered`` (the kubelet's, then the registrar's re-delivery).
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from registrar import Registrar, logs
from registrar_testing.events import Events, check_from_env


class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "6")
        self.end_headers()
        self.wfile.write(b"hello\n")

    def log_message(self, *_args):
        pass


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--events", required=True)
    args = parser.parse_args()
    logs.setup("info")
    events = Events(args.events)
    stopping: list[bool] = []  # not an Event: see httpapp.py

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Hello)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    registrar = Registrar.from_config(args.config)
    registrar.start()

    def own_handler(_signum, _frame):
        events.record("sigterm", registrar_report=bool(registrar.report))
        check_from_env(events, "sigterm_check")
        stopping.append(True)

    signal.signal(signal.SIGTERM, own_handler)
    registrar.install_signal_handlers()
    chained = signal.getsignal(signal.SIGTERM)

    def spy(signum, frame):  # sees every delivery, then hands it on unchanged
        events.record("delivered", signal=signal.Signals(signum).name)
        chained(signum, frame)

    signal.signal(signal.SIGTERM, spy)
    events.record("ready", port=args.port)
    while not stopping:
        time.sleep(0.01)
    server.shutdown()
    events.record("exit", status=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
