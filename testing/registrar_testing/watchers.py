"""Registry watchers written the way consumers write them, independent of
registrar's code: each follows ONE member/server of a registry and keeps
the set of ``host:port`` addresses of a service it currently lists.

  * ``EtcdPrefixWatcher``: a serializable range of the prefix, then a watch
    from the next revision (etcd3gw, through the member's JSON gateway).
    Values in the gRPC-go naming format: ``{"Op":0,"Addr":"host:port",...}``.
  * ``ZooKeeperChildrenWatcher``: kazoo ``ChildrenWatch`` on ``<path>``, each
    new child read once (Apache Curator x-discovery JSON: ``address``,
    ``port``), as Curator's ServiceCache does.
  * ``ConsulHealthWatcher``: blocking queries on
    ``/v1/health/service/<name>?passing`` (``&stale`` by default: the
    server's own replica, what most consumers ask for).

``listener(kind, addr)`` is called with ``"add"`` or ``"del"`` whenever an
address joins or leaves the set (from the watcher's thread); ``on_error``
with a message when the watch ends by itself. The client libraries are
imported lazily: importing this module costs nothing.
"""
from __future__ import annotations

import base64
import http.client
import json
import threading
import time
from collections.abc import Callable
from urllib.parse import quote, urlsplit

Listener = Callable[[str, str], None]


class InstanceSet:
    """Instance id -> address, and the listener told when an address comes or goes."""

    def __init__(self, listener: Listener | None = None):
        self._lock = threading.Lock()
        self._by_id: dict[str, str] = {}
        self._listener = listener

    def _apply(self, change: Callable[[dict[str, str]], None]) -> None:
        with self._lock:
            before = set(self._by_id.values())
            change(self._by_id)
            after = set(self._by_id.values())
        if self._listener is not None:
            for addr in sorted(after - before):
                self._listener("add", addr)
            for addr in sorted(before - after):
                self._listener("del", addr)

    def put(self, ident: str, addr: str) -> None:
        self._apply(lambda m: m.__setitem__(ident, addr))

    def remove(self, ident: str) -> None:
        self._apply(lambda m: m.pop(ident, None))

    def replace(self, mapping: dict[str, str]) -> None:
        def change(m: dict[str, str]) -> None:
            m.clear()
            m.update(mapping)
        self._apply(change)

    def addresses(self) -> list[str]:
        with self._lock:
            return sorted(set(self._by_id.values()))

    def ids(self) -> set[str]:
        with self._lock:
            return set(self._by_id)


class _Watcher:
    def __init__(self, listener: Listener | None, on_error: Callable[[str], None] | None):
        self.instances = InstanceSet(listener)
        self._on_error = on_error or (lambda _msg: None)
        self._stopped = threading.Event()

    def addresses(self) -> list[str]:
        return self.instances.addresses()

    def _failed(self, msg: str) -> None:
        if not self._stopped.is_set():
            self._on_error(msg)


# -- etcd ---------------------------------------------------------------------

def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class EtcdPrefixWatcher(_Watcher):
    def __init__(self, endpoint: str, prefix: str, listener: Listener | None = None,
                 on_error: Callable[[str], None] | None = None):
        super().__init__(listener, on_error)
        self.endpoint = endpoint
        self.prefix = prefix.encode()
        self._cancel: Callable[[], None] | None = None

    @staticmethod
    def parse(value: bytes | str) -> str | None:
        try:
            return json.loads(value)["Addr"]
        except (ValueError, KeyError, TypeError):
            return None

    def start(self) -> EtcdPrefixWatcher:
        import etcd3gw

        parts = urlsplit(self.endpoint)
        client = etcd3gw.Etcd3Client(host=parts.hostname, port=parts.port, timeout=5)
        end = self.prefix[:-1] + bytes([self.prefix[-1] + 1])
        listing = client.post(client.get_url("/kv/range"), json={
            "key": _b64(self.prefix), "range_end": _b64(end), "serializable": True})
        initial = {}
        for kv in listing.get("kvs", []):
            addr = self.parse(base64.b64decode(kv.get("value", "")))
            if addr:
                initial[base64.b64decode(kv["key"]).decode()] = addr
        self.instances.replace(initial)
        revision = int(listing["header"]["revision"])
        events, self._cancel = client.watch_prefix(self.prefix, start_revision=revision + 1)
        threading.Thread(target=self._follow, args=(events,), daemon=True,
                         name="etcd-watch").start()
        return self

    def _follow(self, events) -> None:
        try:
            for event in events:
                kv = event["kv"]
                key = kv["key"].decode() if isinstance(kv["key"], bytes) else kv["key"]
                # PUT events carry no "type" (proto3 default); DELETE ones do.
                if event.get("type") == "DELETE":
                    self.instances.remove(key)
                elif addr := self.parse(kv.get("value", b"")):
                    self.instances.put(key, addr)
        except Exception as exc:  # noqa: BLE001 - reported to the owner
            self._failed(f"etcd watch ended: {exc!r}")
        else:
            self._failed("etcd watch ended")

    def stop(self) -> None:
        self._stopped.set()
        if self._cancel is not None:
            self._cancel()


# -- ZooKeeper ----------------------------------------------------------------

class ZooKeeperChildrenWatcher(_Watcher):
    def __init__(self, host: str, path: str, listener: Listener | None = None,
                 on_error: Callable[[str], None] | None = None, session_timeout: float = 10.0):
        super().__init__(listener, on_error)
        self.host = host
        self.path = path.rstrip("/")
        self.session_timeout = session_timeout
        self._client = None

    @staticmethod
    def parse(data: bytes) -> str | None:
        try:
            doc = json.loads(data)
            return f"{doc['address']}:{int(doc['port'])}"
        except (ValueError, KeyError, TypeError):
            return None

    def start(self) -> ZooKeeperChildrenWatcher:
        from kazoo.client import KazooClient
        from kazoo.recipe.watchers import ChildrenWatch

        self._client = KazooClient(hosts=self.host, timeout=self.session_timeout)
        self._client.start(timeout=10)
        self._client.ensure_path(self.path)
        ready = threading.Event()

        def children(names: list[str]) -> bool:
            self._update(names)
            ready.set()
            return not self._stopped.is_set()

        ChildrenWatch(self._client, self.path, children)
        if not ready.wait(10):
            raise TimeoutError(f"no children listing of {self.path} from {self.host}")
        return self

    def _update(self, names: list[str]) -> None:
        from kazoo.exceptions import NoNodeError

        known = self.instances.ids()
        for name in set(names) - known:
            try:
                # A synchronous read in the callback: the reply is delivered
                # by kazoo's reader thread, not by this (callback) thread.
                data, _ = self._client.get(f"{self.path}/{name}")
            except NoNodeError:
                continue
            if addr := self.parse(data):
                self.instances.put(name, addr)
        for name in known - set(names):
            self.instances.remove(name)

    def stop(self) -> None:
        self._stopped.set()
        if self._client is not None:
            self._client.stop()
            self._client.close()


# -- Consul -------------------------------------------------------------------

class ConsulHealthWatcher(_Watcher):
    def __init__(self, addr: str, service: str, listener: Listener | None = None,
                 on_error: Callable[[str], None] | None = None, stale: bool = True,
                 wait: str = "30s"):
        super().__init__(listener, on_error)
        parts = urlsplit(addr)
        self.host, self.port = parts.hostname, parts.port
        self.path = f"/v1/health/service/{quote(service)}?passing" + ("&stale" if stale else "")
        self.wait = wait
        self.index = 0

    @staticmethod
    def parse(entry: dict) -> str:
        svc = entry["Service"]
        return f"{svc.get('Address') or entry['Node']['Address']}:{svc['Port']}"

    def _query(self, conn: http.client.HTTPConnection, index: int) -> tuple[int, list]:
        path = self.path + (f"&index={index}&wait={self.wait}" if index else "")
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise OSError(f"consul answered {resp.status}: {body[:200]!r}")
        return int(resp.getheader("X-Consul-Index", "0")), json.loads(body)

    def _set_entries(self, entries: list) -> None:
        self.instances.replace({e["Service"]["ID"]: self.parse(e) for e in entries})

    def start(self) -> ConsulHealthWatcher:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        self.index, entries = self._query(conn, 0)
        conn.close()
        self._set_entries(entries)
        threading.Thread(target=self._follow, daemon=True, name="consul-watch").start()
        return self

    def _follow(self) -> None:
        conn: http.client.HTTPConnection | None = None
        errors_since = None
        while not self._stopped.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
                index, entries = self._query(conn, self.index)
            except (OSError, ValueError, http.client.HTTPException) as exc:
                if conn is not None:
                    conn.close()
                conn = None
                errors_since = errors_since or time.monotonic()
                if time.monotonic() - errors_since > 30:
                    self._failed(f"consul watch failing for 30 s: {exc!r}")
                    return
                self._stopped.wait(0.1)
                continue
            errors_since = None
            # Consul's rule: an index that went backwards means start over.
            self.index = index if index >= self.index else 0
            self._set_entries(entries)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self._stopped.set()


def watcher(registry: str, target: str, service: str, listener: Listener | None = None,
            on_error: Callable[[str], None] | None = None):
    """The watcher of ``registry`` on ONE member: an etcd client URL, a
    ZooKeeper ``host:port``, a Consul HTTP address. Not started."""
    if registry == "etcd":
        return EtcdPrefixWatcher(target, f"services/{service}/", listener, on_error)
    if registry == "zookeeper":
        return ZooKeeperChildrenWatcher(target, f"/services/{service}", listener, on_error)
    if registry == "consul":
        return ConsulHealthWatcher(target, service, listener, on_error)
    raise ValueError(f"unknown registry {registry!r}")
