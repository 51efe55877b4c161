#!/usr/bin/env python3
"""The consumer of bench/services.py: a client of a Kubernetes Service,
nothing of registrar's and no discovery at all. It sends a steady stream
of requests to ONE address, the Service's virtual IP, and lets the kernel's
NAT (the bench's kube-proxy-like nftables rules) pick the pod.

    vip_consumer.py --vip 127.0.0.100:80 --source 127.0.0.2 --out FILE
                    [--client per-request|keepalive] [--rate 300]
                    [--timeout 5] [--threads 128] [--max-seconds 600]

--source: the address every connection is bound to, so the pods see this
consumer as a peer of its own (a client pod with its own IP).

Traffic: open loop, --rate requests per second, each a ``GET /`` run by a
pool of --threads, never retried:
  per-request  a new TCP connection per request (``Connection: close``);
  keepalive    a pool of persistent HTTP/1.1 connections to the VIP (each
               pinned by conntrack to the pod it was NATed to when it
               opened). Before a pooled socket is reused it is dropped if
               the peer closed it, as urllib3's is_connection_dropped()
               does (bench/apps/http_clients.py's is_dropped()).
A request is lost when it fails: ``refused``, ``reset`` (RST, EOF or a
truncated answer), ``timeout`` (--timeout, connect or response),
``http_status`` (an answer that is not 2xx), ``other`` (any other socket
error; not expected on loopback).

Protocol: JSON lines on stdout, ``time.monotonic()`` timestamps: ``ready``,
``count`` (every second: sent and failed so far), ``done`` (keepalive adds
``opened`` and ``dropped``: connections opened, pooled ones found closed by
the peer). Every request is written to --out as
``[t_due, t_start, t_end, outcome, reused_or_connected, detail]``.
Commands on stdin: ``go`` starts the traffic, ``stop`` (or EOF) ends it,
waits for the requests in flight and exits. Everything stops by itself
after --max-seconds.
"""
from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time

from http_clients import _split, classify, is_dropped, open_loop

_print_lock = threading.Lock()


def emit(**fields) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()


def _outcome(resp: http.client.HTTPResponse) -> tuple[str, str]:
    resp.read()
    if not 200 <= resp.status < 300:
        return "http_status", str(resp.status)
    return "ok", ""


class Client:
    """Connections from ``source`` to ``vip``; ``keepalive`` pools them."""

    def __init__(self, vip: str, source: str, timeout: float, keepalive: bool):
        self.host, self.port = _split(vip)
        self.source = source
        self.timeout = timeout
        self.keepalive = keepalive
        self._lock = threading.Lock()
        self._idle: list[http.client.HTTPConnection] = []
        self.opened = 0
        self.dropped = 0

    def _new(self) -> http.client.HTTPConnection:
        with self._lock:
            self.opened += 1
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout,
                                          source_address=(self.source, 0))

    def _checkout(self) -> http.client.HTTPConnection | None:
        while True:
            with self._lock:
                if not self._idle:
                    return None
                conn = self._idle.pop()
            if not is_dropped(conn.sock):
                return conn
            with self._lock:
                self.dropped += 1
            conn.close()

    def request(self) -> tuple[str, bool, str]:
        """(outcome, reused a pooled connection (keepalive) / connected
        (per-request), detail) of one ``GET /``."""
        conn = self._checkout() if self.keepalive else None
        reused = conn is not None
        if conn is None:
            conn = self._new()
        keep = False
        connected = reused
        try:
            if conn.sock is None:
                conn.connect()
                connected = True
            conn.request("GET", "/", headers={} if self.keepalive else {"Connection": "close"})
            resp = conn.getresponse()
            kind, detail = _outcome(resp)
            keep = self.keepalive and not resp.will_close
            return kind, reused if self.keepalive else connected, detail
        except Exception as exc:  # noqa: BLE001 - classified, or re-raised
            kind, detail = classify(exc)
            return kind, reused if self.keepalive else connected, detail
        finally:
            if keep:
                with self._lock:
                    self._idle.append(conn)
            else:
                conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vip", required=True, help="the Service's address, host:port")
    parser.add_argument("--source", required=True, help="the address connections come from")
    parser.add_argument("--client", choices=["per-request", "keepalive"], default="per-request")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=128)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args()
    began = time.monotonic()
    client = Client(args.vip, args.source, args.timeout, args.client == "keepalive")
    emit(ev="ready", t=time.monotonic())

    def one(t_due: float) -> tuple[tuple, bool]:
        t_start = time.monotonic()
        kind, flag, detail = client.request()
        return (t_due, t_start, time.monotonic(), kind, flag, detail), kind == "ok"

    records, behind = open_loop(args.rate, args.max_seconds, args.threads, one, emit, began)
    client.close()
    with open(args.out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    kinds: dict[str, int] = {}
    for r in records:
        kinds[r[3]] = kinds.get(r[3], 0) + 1
    extra = {"opened": client.opened, "dropped": client.dropped} if client.keepalive else {}
    emit(ev="done", t=time.monotonic(), sent=len(records), kinds=kinds,
         fell_behind=behind, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
