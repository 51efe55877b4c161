#!/usr/bin/env python3
"""The baselines of the rolling-restart bench: what users write today
without registrar. A PID-1-style wrapper that registers the app with the
registry's client library and keeps the registration alive:

    naive_wrapper.py --registry etcd|zookeeper|consul --target T --id ID
                     --addr HOST:PORT --health URL [--service web] [--ttl 10]
                     [--on-term keep|deregister] -- APP [ARGS...]

--target: etcd client URLs (comma-separated), a ZooKeeper connect string,
or the Consul agent's HTTP address. What it registers, once ``--health``
answers 200:
  etcd       services/<service>/<addr> = {"Op":0,"Addr":"<addr>",...} (the
             gRPC naming format) on a lease of --ttl seconds, kept alive
             every ttl/3 (etcd3gw);
  zookeeper  an ephemeral node /services/<service>/<id> holding an Apache
             Curator x-discovery ServiceInstance (kazoo, session timeout
             --ttl);
  consul     an agent service <id> with a TTL check of --ttl, passed every
             ttl/3 (plain HTTP to the agent's API).

On SIGTERM (SIGINT):
  keep        forward SIGTERM to the app at once and exit when it has,
              deregistering NOTHING: the entry lives until its lease, session
              or check TTL runs out. The ZooKeeper session is not closed
              (os._exit), as when a pod dies. With a preStop hook that
              deregisters and sleeps, this is the "sleep" strategy's container.
  deregister  remove the entry (one call; never asks whether it reached
              anyone), then SIGTERM the app at once (what ContainerPilot and
              Spring Cloud do).
The wrapper exits with the app's status (128+signal if a signal ended it).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from urllib.parse import urlsplit


def log(msg: str) -> None:
    print(f"naive_wrapper: {msg}", file=sys.stderr, flush=True)


class Etcd:
    def __init__(self, target: str, service: str, ident: str, addr: str, ttl: int):
        import etcd3gw

        self.clients = [etcd3gw.Etcd3Client(host=p.hostname, port=p.port, timeout=2)
                        for p in map(urlsplit, target.split(","))]
        self.key = f"services/{service}/{addr}"
        self.value = json.dumps({"Op": 0, "Addr": addr, "Metadata": {"id": ident}})
        self.ttl = ttl
        self.lease = None

    def _call(self, fn):
        last = None
        for c in self.clients:  # etcd3gw talks to one host: failover is ours
            try:
                return fn(c)
            except Exception as exc:  # noqa: BLE001 - next endpoint
                last = exc
        raise RuntimeError(f"no etcd endpoint answered: {last}")

    def register(self) -> None:
        self.lease = self._call(lambda c: c.lease(self.ttl))
        self._call(lambda c: c.put(self.key, self.value, lease=self.lease))

    def refresh(self) -> None:
        self.lease.refresh()

    def deregister(self) -> None:
        lease_id = self.lease.id  # revoking the lease deletes the key
        self._call(lambda c: c.post(c.get_url("/kv/lease/revoke"), json={"ID": lease_id}))


class ZooKeeper:
    def __init__(self, target: str, service: str, ident: str, addr: str, ttl: int):
        from kazoo.client import KazooClient

        self.client = KazooClient(hosts=target, timeout=ttl)
        self.path = f"/services/{service}/{ident}"
        host, _, port = addr.rpartition(":")
        self.data = json.dumps({  # Curator 5.4's ServiceInstance, as Jackson writes it
            "name": service, "id": ident, "address": host, "port": int(port), "sslPort": None,
            "payload": None, "registrationTimeUTC": int(time.time() * 1000),
            "serviceType": "DYNAMIC", "uriSpec": None}).encode()

    def register(self) -> None:
        self.client.start(timeout=10)
        self.client.create(self.path, self.data, ephemeral=True, makepath=True)

    def refresh(self) -> None:
        pass  # kazoo's own pings keep the session (and the node) alive

    def deregister(self) -> None:
        self.client.delete(self.path)


class Consul:
    def __init__(self, target: str, service: str, ident: str, addr: str, ttl: int):
        self.agent = target.rstrip("/")
        self.ident = ident
        host, _, port = addr.rpartition(":")
        self.body = {"ID": ident, "Name": service, "Address": host, "Port": int(port),
                     "Check": {"CheckID": f"service:{ident}", "TTL": f"{ttl}s",
                               "DeregisterCriticalServiceAfter": "1m"}}

    def _put(self, path: str, body: dict | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        req = urllib.request.Request(self.agent + path, data=data, method="PUT")
        with urllib.request.urlopen(req, timeout=2) as resp:
            resp.read()

    def register(self) -> None:
        self._put("/v1/agent/service/register", self.body)
        self.refresh()  # a TTL check starts critical

    def refresh(self) -> None:
        self._put(f"/v1/agent/check/pass/service:{self.ident}")

    def deregister(self) -> None:
        self._put(f"/v1/agent/service/deregister/{self.ident}")


REGISTRIES = {"etcd": Etcd, "zookeeper": ZooKeeper, "consul": Consul}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--registry", choices=sorted(REGISTRIES), required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--service", default="web")
    parser.add_argument("--id", required=True)
    parser.add_argument("--addr", required=True)
    parser.add_argument("--health", required=True)
    parser.add_argument("--ttl", type=int, default=10)
    parser.add_argument("--on-term", choices=["keep", "deregister"], default="keep")
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv

    app = subprocess.Popen(argv, process_group=0)
    # After the app started: a blocked mask would be inherited by it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    registry = REGISTRIES[args.registry](args.target, args.service, args.id, args.addr, args.ttl)

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
        os._exit(app.returncode)
    registry.register()
    stop = threading.Event()

    def keepalive() -> None:
        while not stop.wait(args.ttl / 3):
            try:
                registry.refresh()
            except Exception as exc:  # noqa: BLE001 - the next one may work
                log(f"refresh failed: {exc}")

    threading.Thread(target=keepalive, daemon=True).start()

    # Wait for SIGTERM, or the app's own exit (checked every 100 ms).
    while signal.sigtimedwait({signal.SIGTERM, signal.SIGINT}, 0.1) is None:
        if app.poll() is not None:
            stop.set()
            os._exit(exit_status(app.returncode))
    stop.set()
    if args.on_term == "deregister":
        try:
            registry.deregister()
        except Exception as exc:  # noqa: BLE001 - the TTL will remove it
            log(f"deregister failed: {exc}")
    app.send_signal(signal.SIGTERM)
    try:
        code = app.wait(20)
    except subprocess.TimeoutExpired:
        app.kill()
        code = app.wait()
    sys.stderr.flush()
    os._exit(exit_status(code))  # no atexit, no kazoo close(): the session is left to expire


def exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
