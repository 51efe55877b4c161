#!/usr/bin/env python3
"""The apps of a whole fleet in one process: N listening sockets on 127.0.0.1 that accept
and close every connection (all a TCP health probe asks for). One process instead of N
keeps the bench's own footprint out of the agents' figures.

    ports.py N    prints one JSON line, the N ports; then reads "close <port>" lines on stdin
                  (the app of a stopping pod stops listening) until EOF.
Standard library only.
"""
from __future__ import annotations

import json
import os
import selectors
import socket
import sys


def main() -> int:
    count = int(sys.argv[1])
    sel = selectors.DefaultSelector()
    listeners: dict[int, socket.socket] = {}
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        sock.setblocking(False)
        listeners[sock.getsockname()[1]] = sock
        sel.register(sock, selectors.EVENT_READ, "accept")
    os.set_blocking(sys.stdin.fileno(), False)
    sel.register(sys.stdin, selectors.EVENT_READ, "command")
    print(json.dumps(sorted(listeners)), flush=True)
    pending = b""
    while True:
        for key, _ in sel.select():
            if key.data == "accept":
                try:
                    conn, _addr = key.fileobj.accept()
                except (BlockingIOError, OSError):
                    continue
                conn.close()
                continue
            chunk = os.read(sys.stdin.fileno(), 65536)
            if not chunk:
                return 0
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                word, _, arg = line.decode().partition(" ")
                if word == "close" and (sock := listeners.pop(int(arg), None)):
                    sel.unregister(sock)
                    sock.close()


if __name__ == "__main__":
    sys.exit(main())
