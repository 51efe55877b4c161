#!/usr/bin/env python3
"""The demo's app: an HTTP server on 127.0.0.1:PORT whose GET /?ms=N
answers after N milliseconds of "work". It dies at once on SIGTERM, as
many apps do: whatever it is serving then is lost."""
from __future__ import annotations

import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ms = float(parse_qs(urlsplit(self.path).query).get("ms", ["0"])[0])
        time.sleep(ms / 1000)
        body = b"done\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
