#!/usr/bin/env python3
"""The consumer of the rolling-restart bench: a client-side load balancer
that discovers "web" through etcd, the way a gRPC client with etcd's
resolver does, and sends it a steady stream of requests.

    consumer.py --etcd URL --prefix /services/web/ --out FILE
                [--rate 300] [--timeout 2] [--threads 32] [--max-seconds 300]

Discovery: one serializable range of the prefix on the ONE member given,
then etcd3gw's watch_prefix from the next revision on that member. A PUT
(re)adds the value's ``Addr`` (a "draining" status in the metadata is not
looked at: etcd's gRPC resolver does not either); a DELETE removes it.

Traffic: open loop, ``--rate`` requests per second, each a short HTTP/1.1
``GET /`` with ``Connection: close`` to the next endpoint of the current
set (round-robin, chosen at send time), run by a pool of ``--threads``.

Protocol: JSON lines on stdout, ``time.monotonic()`` timestamps:
``ready`` (the initial set), ``add``/``del`` (an endpoint, as the balancer
applied the change), ``done`` (counts; every request is in ``--out``).
Commands on stdin: ``go`` starts the traffic, ``stop`` (or EOF) ends it,
waits for the requests in flight and exits. Everything stops by itself
after ``--max-seconds``.
"""
from __future__ import annotations

import argparse
import base64
import errno
import http.client
import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import etcd3gw

_print_lock = threading.Lock()


def emit(**fields) -> None:
    with _print_lock:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


class Balancer:
    """The endpoint set, as the watch keeps it, and round-robin over it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[bytes, str] = {}
        self._list: list[str] = []
        self._next = 0

    def put(self, key: bytes, value: bytes) -> str | None:
        try:
            addr = json.loads(value)["Addr"]
        except (ValueError, KeyError, TypeError):
            return None
        with self._lock:
            new = addr not in self._list
            self._by_key[key] = addr
            self._list = sorted(set(self._by_key.values()))
        return addr if new else None

    def delete(self, key: bytes) -> str | None:
        with self._lock:
            addr = self._by_key.pop(key, None)
            self._list = sorted(set(self._by_key.values()))
        return addr

    def pick(self) -> str | None:
        with self._lock:
            if not self._list:
                return None
            addr = self._list[self._next % len(self._list)]
            self._next += 1
            return addr

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self._list)


def request(addr: str, timeout: float) -> tuple[str, bool, str]:
    """(outcome kind, connected?, detail) of one GET / to addr."""
    host, _, port = addr.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    connected = False
    try:
        conn.connect()
        connected = True
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        if resp.status >= 500:
            return "http5xx", connected, str(resp.status)
        return "ok", connected, ""
    except ConnectionRefusedError:
        return "refused", connected, ""
    except (ConnectionResetError, BrokenPipeError) as exc:  # RemoteDisconnected is one
        return "reset", connected, type(exc).__name__
    except TimeoutError:
        return "timeout", connected, ""
    except http.client.HTTPException as exc:
        return "protocol", connected, type(exc).__name__
    except OSError as exc:
        return "other", connected, errno.errorcode.get(exc.errno or 0, repr(exc))
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--etcd", required=True, help="the ONE member this consumer reads")
    parser.add_argument("--prefix", default="/services/web/")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    args = parser.parse_args()
    began = time.monotonic()

    parts = urlsplit(args.etcd)
    client = etcd3gw.Etcd3Client(host=parts.hostname, port=parts.port, timeout=5)
    prefix = args.prefix.encode()
    balancer = Balancer()
    listing = client.post(client.get_url("/kv/range"), json={
        "key": _b64(prefix), "range_end": _b64(_prefix_end(prefix)), "serializable": True})
    for kv in listing.get("kvs", []):
        balancer.put(base64.b64decode(kv["key"]), base64.b64decode(kv.get("value", "")))
    revision = int(listing["header"]["revision"])
    events, cancel = client.watch_prefix(prefix, start_revision=revision + 1)

    def watch() -> None:
        try:
            for event in events:
                kv = event["kv"]
                if event.get("type") == "DELETE":
                    addr = balancer.delete(kv["key"])
                    if addr:
                        emit(ev="del", ep=addr, t=time.monotonic(),
                             rev=int(kv.get("mod_revision", 0)))
                else:
                    addr = balancer.put(kv["key"], kv.get("value", b""))
                    if addr:
                        emit(ev="add", ep=addr, t=time.monotonic(),
                             rev=int(kv.get("mod_revision", 0)))
        except Exception as exc:  # noqa: BLE001 - reported; the bench fails on it
            emit(ev="error", what=f"watch ended: {exc!r}", t=time.monotonic())

    threading.Thread(target=watch, name="watch", daemon=True).start()
    emit(ev="ready", t=time.monotonic(), endpoints=balancer.snapshot(), revision=revision)

    records: list[tuple] = []  # (t_sched, t_start, t_end, addr, kind, connected, detail)
    pool = ThreadPoolExecutor(max_workers=args.threads, thread_name_prefix="req")
    go, stop = threading.Event(), threading.Event()

    def one(t_sched: float) -> None:
        t_start = time.monotonic()
        addr = balancer.pick()
        if addr is None:
            records.append((t_sched, t_start, t_start, None, "noendpoint", False, ""))
            return
        kind, connected, detail = request(addr, args.timeout)
        records.append((t_sched, t_start, time.monotonic(), addr, kind, connected, detail))

    behind = [0]

    def dispatch() -> None:
        interval = 1.0 / args.rate
        next_t = time.monotonic()
        limit = int(args.rate * args.max_seconds) + 1
        for _ in range(limit):
            if stop.is_set():
                return
            now = time.monotonic()
            if now < next_t:
                if stop.wait(next_t - now):
                    return
            elif now - next_t > 0.2:  # fell far behind: skip, do not burst
                behind[0] += 1
                next_t = now
            pool.submit(one, next_t)
            next_t += interval

    def stdin_reader() -> None:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "go":
                go.set()
            elif cmd == "stop":
                break
        stop.set()
        go.set()

    threading.Thread(target=stdin_reader, name="stdin", daemon=True).start()
    remaining = args.max_seconds - (time.monotonic() - began)
    go.wait(max(remaining, 0))
    sender = threading.Thread(target=dispatch, name="dispatch", daemon=True)
    if not stop.is_set():
        sender.start()
    stop.wait(max(args.max_seconds - (time.monotonic() - began), 0))
    stop.set()
    if sender.is_alive():
        sender.join(1.0)
    pool.shutdown(wait=True)  # each request is bounded by --timeout
    cancel()
    with open(args.out, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    kinds: dict[str, int] = {}
    for r in records:
        kinds[r[4]] = kinds.get(r[4], 0) + 1
    emit(ev="done", t=time.monotonic(), sent=len(records), kinds=kinds, fell_behind=behind[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
