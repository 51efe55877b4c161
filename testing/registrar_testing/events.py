"""What the sample apps share: an append-only events file and a check of
every etcd member's own view.

Each event is one JSON line with ``time.monotonic()`` (CLOCK_MONOTONIC is
system-wide on Linux, so the test process can compare it with its own
clock) and ``time.time()``. Standard library only: the apps must start fast.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import time
from urllib.parse import urlsplit


class Events:
    def __init__(self, path: str | None):
        self.path = path

    def record(self, event: str, **fields) -> float:
        now = time.monotonic()
        if self.path:
            line = json.dumps({"event": event, "mono": now, "wall": time.time(),
                               "pid": os.getpid(), **fields}) + "\n"
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())  # one write: lines never interleave
            finally:
                os.close(fd)
        return now


def etcd_views(endpoints: list[str], key: str, timeout: float = 0.5) -> list[dict]:
    """Every member's own view of ``key`` right now (serializable reads, one
    fresh connection each): the proof, taken inside the app the moment it is
    told to stop, that the removal had already reached every member."""
    body = json.dumps({"key": base64.b64encode(key.encode()).decode(), "serializable": True,
                       "keys_only": True})
    out = []
    for endpoint in endpoints:
        parts = urlsplit(endpoint)
        sent = time.monotonic()
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        try:
            conn.request("POST", "/v3/kv/range", body, {"Content-Type": "application/json"})
            resp = json.loads(conn.getresponse().read())
            out.append({"endpoint": endpoint, "sent": sent, "present": bool(resp.get("kvs")),
                        "revision": int(resp["header"]["revision"])})
        except (OSError, ValueError, KeyError) as exc:
            out.append({"endpoint": endpoint, "sent": sent, "error": repr(exc)})
        finally:
            conn.close()
    return out


def check_from_env(events: Events, event: str) -> None:
    """Record ``event`` with every member's view when the test asked for it
    (CHECK_ETCD_ENDPOINTS, comma-separated, and CHECK_ETCD_KEY)."""
    endpoints = os.environ.get("CHECK_ETCD_ENDPOINTS")
    key = os.environ.get("CHECK_ETCD_KEY")
    if endpoints and key:
        events.record(event, views=etcd_views(endpoints.split(","), key))
