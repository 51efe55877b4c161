#!/usr/bin/env python3
"""The baseline of the rolling-restart bench: what users write today
without registrar. A PID-1-style wrapper using etcd3gw directly:

    naive_wrapper.py --etcd URL[,URL...] --key KEY --addr HOST:PORT
                     --health URL [--sleep S] [--ttl N] -- APP [ARGS...]

Starts the app, waits until ``--health`` answers 200, then puts KEY (gRPC
naming format) on a lease it keeps alive. On SIGTERM: revokes the lease
(which deletes the key) on the first endpoint that answers, sleeps
``--sleep`` seconds (0: "deregister then exit"; 5: "deregister + sleep 5"),
sends SIGTERM to the app, waits for it (SIGKILL after 20 s) and exits with
its status. It never asks whether the removal reached anyone.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from urllib.parse import urlsplit

import etcd3gw


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--etcd", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--addr", required=True)
    parser.add_argument("--health", required=True)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--ttl", type=int, default=10)
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv

    app = subprocess.Popen(argv, process_group=0)
    # After the app started: a blocked mask would be inherited by it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    clients = []
    for url in args.etcd.split(","):
        parts = urlsplit(url)
        clients.append(etcd3gw.Etcd3Client(host=parts.hostname, port=parts.port, timeout=2))

    def call(fn):
        last = None
        for c in clients:
            try:
                return fn(c)
            except Exception as exc:  # noqa: BLE001 - next endpoint
                last = exc
        raise RuntimeError(f"no etcd endpoint answered: {last}")

    end = time.monotonic() + 20
    while app.poll() is None and time.monotonic() < end:
        try:
            with urllib.request.urlopen(args.health, timeout=1) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.05)
    if app.poll() is not None:
        return app.returncode
    value = json.dumps({"Op": 0, "Addr": args.addr, "Metadata": {"id": "naive"}})
    lease = call(lambda c: c.lease(args.ttl))
    call(lambda c: c.put(args.key, value, lease=lease))
    stop = threading.Event()

    def keepalive():
        while not stop.wait(args.ttl / 3):
            try:
                lease.refresh()
            except Exception as exc:  # noqa: BLE001
                print(f"naive_wrapper: keep-alive failed: {exc}", file=sys.stderr)

    threading.Thread(target=keepalive, daemon=True).start()

    # Wait for SIGTERM (or the app's own exit: poll it every 100 ms).
    while True:
        if signal.sigtimedwait({signal.SIGTERM, signal.SIGINT}, 0.1) is not None:
            break
        if app.poll() is not None:
            stop.set()
            call(lambda c: c.post(c.get_url("/kv/lease/revoke"), json={"ID": lease.id}))
            return app.returncode
    stop.set()
    try:
        call(lambda c: c.post(c.get_url("/kv/lease/revoke"), json={"ID": lease.id}))
    except RuntimeError as exc:
        print(f"naive_wrapper: delete failed: {exc}", file=sys.stderr)
    if args.sleep:
        time.sleep(args.sleep)
    app.send_signal(signal.SIGTERM)
    try:
        code = app.wait(20)
    except subprocess.TimeoutExpired:
        app.kill()
        code = app.wait()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
