"""etcd v3 backend: a leased key in the gRPC naming format.

Key ``<prefix>/<service>/<address>:<port>`` (default prefix ``services``, no
leading slash, as in etcd's naming examples), value
``{"Op":0,"Addr":"<address>:<port>","Metadata":"<JSON text>"}`` attached to a
lease, so gRPC-go clients dialling ``etcd:///services/<service>`` with etcd's
resolver (``go.etcd.io/etcd/client/v3/naming/resolver``; ``clientv3/naming``
in 3.4) find the instance with no code of ours, under any balancer. Talks to
etcd's JSON gateway through etcd3gw (``_gateway.py``), failing over between
endpoints itself, over TLS (``tls``) and with etcd's auth (``username`` +
``password_file`` or ``$ETCD_PASSWORD``) where configured; the observers use
the same.

Why ``Metadata`` is a string by default (``metadata: string``): gRPC-go's
resolver hands ``Metadata`` to the balancer inside ``resolver.Address``, and
``round_robin`` (grpc-go 1.33, balancer/base) uses each address as a map key:
a JSON object unmarshals to a Go map, which is unhashable, and the client
panics at the first update. A string is hashable, and still carries our id,
tags and meta (``{"id":…,"tags":[…],"meta":{…}}``) for whoever parses it.
``metadata: none`` writes no ``Metadata`` (what etcd's own endpoints manager
writes for ``Endpoint{Addr: addr}``); ``metadata: object`` is the earlier format
(an object, rewritten with ``"status":"draining"`` at the drain), for readers
that want an object and gRPC clients that use only ``pick_first``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

from registrar.plugin import (Backend, Deadline, Instance, Observer, RegistrationRejected,
                              RegistryUnavailable, watch_windows)

from ._gateway import Cluster, Credentials, Member, NotFound, b64
from .config import PASSWORD_ENV, EtcdConfig, EtcdTLS, read_password

__all__ = ["EtcdBackend", "EtcdConfig", "EtcdObserver", "EtcdTLS", "PASSWORD_ENV"]

log = logging.getLogger(__name__)


class EtcdBackend(Backend):
    """Registration = a key attached to a lease; heartbeat = lease keep-alive
    plus a check that the key is still ours."""

    config_model = EtcdConfig

    def __init__(self, instance: Instance, config: EtcdConfig,
                 environ: Mapping[str, str] | None = None):
        super().__init__(instance, config)
        self.key = entry_key(config.prefix, instance)
        password = read_password(config, os.environ if environ is None else environ)
        self._credentials = None if password is None else Credentials(
            config.username or "", *password)
        self._cluster = Cluster(self.name, config.endpoints, config.timeout, config.tls,
                                self._credentials)
        self._lease: int | None = None
        self._removed_revision: int | None = None
        #: Whether the removal deleted the key (a DELETE event marks its revision).
        self.removal_deleted = False

    def value(self, status: str | None = None) -> str:
        """The entry's JSON text, in the configured ``metadata`` form. The
        same instance always gives the same text (a repair rewrites nothing
        a gRPC client could see as a new address)."""
        entry: dict[str, Any] = {"Op": 0, "Addr": self.instance.hostport}
        if self.config.metadata != "none":
            meta: dict[str, Any] = {"id": self.instance.id, "tags": list(self.instance.tags),
                                    "meta": dict(self.instance.meta)}
            if status:
                meta["status"] = status
            entry["Metadata"] = (meta if self.config.metadata == "object"
                                 else json.dumps(meta, separators=(",", ":")))
        return json.dumps(entry, separators=(",", ":"))

    def _call(self, path: str, payload: dict) -> dict:
        return self._cluster.call(path, payload)

    def _grant(self) -> None:
        result = self._call("/lease/grant", {"TTL": math.ceil(self.config.ttl), "ID": 0})
        self._lease = int(result["ID"])
        self._removed_revision = None

    def _put(self, status: str | None = None) -> None:
        try:
            self._call("/kv/put", {"key": b64(self.key), "value": b64(self.value(status)),
                                   "lease": self._lease})
        except NotFound:  # the lease expired between grant/keep-alive and put
            self._grant()
            self._call("/kv/put", {"key": b64(self.key), "value": b64(self.value(status)),
                                   "lease": self._lease})

    def register(self) -> None:
        if self._lease is None:
            self._grant()
        self._put()
        self.registered = True

    def refresh(self) -> bool:
        result = self._call("/lease/keepalive", {"ID": self._lease})
        if int(result.get("result", {}).get("TTL", -1)) <= 0:
            log.warning("%s: lease %x expired; granting a new one", self.name, self._lease)
            self._grant()
            self._put()
            return True
        kvs = self._call("/kv/range", {"key": b64(self.key)}).get("kvs", [])
        if not kvs or int(kvs[0].get("lease", 0)) != self._lease:
            log.warning("%s: %s is missing or not ours; writing it again", self.name, self.key)
            self._put()
            return True
        return False

    def drain(self, reason: str) -> None:
        """Only with ``metadata: object``: rewrite the value with
        ``"status":"draining"``. With ``string`` or ``none`` the value stays
        as it is until the delete: gRPC-go does not read a status, and any
        change of ``Metadata`` makes the address a new one to its balancers,
        so every client opens a second connection to the pod that is leaving
        (measured with grpc-go 1.33, ``pick_first`` and ``round_robin``
        alike: 2 connections instead of 1, no RPC failed). The delete, right
        after, is what takes the pod out of their rotation."""
        if self._lease is None or self.config.metadata != "object":
            return  # not registered by us, or nothing a client would act on
        value = self.value(status="draining")
        self._call("/kv/txn", {
            "compare": [{"key": b64(self.key), "target": "LEASE", "result": "EQUAL",
                         "lease": self._lease}],
            "success": [{"request_put": {"key": b64(self.key), "value": b64(value),
                                         "lease": self._lease}}]})

    def deregister(self) -> int:
        if self._removed_revision is not None:
            return self._removed_revision
        if self._lease is None:
            # Not registered by this process (the `deregister` command):
            # remove whatever entry the key holds.
            result = self._call("/kv/deleterange", {"key": b64(self.key)})
            self.removal_deleted = int(result.get("deleted", 0)) > 0
        else:
            # Revoking the lease deletes the key in the same step, and only
            # while the key is still ours: a new incarnation that took the
            # key over holds it with a lease of its own.
            try:
                result = self._call("/kv/lease/revoke", {"ID": self._lease})
                self.removal_deleted = True  # our key was on the lease (heartbeats checked)
            except NotFound:  # expired: the key went with it
                result = self._call("/kv/range", {"key": b64(self.key), "count_only": True})
                self.removal_deleted = False
            self._lease = None
        self.registered = False
        # The revision at which the removal happened (or a later one):
        # observers confirm once their member has applied it.
        self._removed_revision = int(result["header"]["revision"])
        return self._removed_revision

    def make_observers(self) -> list[EtcdObserver]:
        return [EtcdObserver(self, url) for url in self.config.endpoints]

    def close(self) -> None:
        self._cluster.close()
        self.close_observers()


def entry_key(prefix: str, instance: Instance) -> str:
    """``<prefix>/<service>/<address>:<port>``, the prefix as written (a
    leading slash kept, trailing ones dropped; an empty prefix: no prefix).
    gRPC-go dials ``etcd:///`` + prefix + ``/`` + service."""
    head = f"{prefix.rstrip('/')}/" if prefix else ""
    return f"{head}{instance.service}/{instance.hostport}"


class EtcdObserver(Observer):
    """One member's own view: a serializable read (answered from the
    member's local state, not through the leader); after a removal, a
    watch on that member (see wait_gone())."""

    def __init__(self, backend: EtcdBackend, url: str):
        self.backend = backend
        self.name = f"{backend.name} {url}"
        self._member = Member(url, backend.config.timeout, backend.config.tls,
                              backend._credentials)

    def sees(self, instance: Instance, since: int | None = None) -> bool:
        try:
            result = self._member.post("/kv/range", {"key": b64(self.backend.key),
                                                     "serializable": True, "keys_only": True})
        except RegistrationRejected as exc:  # the core asks again until its deadline
            raise RegistryUnavailable(str(exc)) from None
        if since is None:
            return bool(result.get("kvs"))
        # Once this member has applied the removal's revision, whatever the
        # key holds now (if anything) was written after us by someone else.
        return int(result["header"]["revision"]) < since

    def wait_gone(self, instance: Instance, since: int | None, deadline: Deadline) -> bool:
        """A watch of our key from the removal's revision, on this member.

        A member serves a watch from its own store (etcd's v3rpc/watch.go:
        the "created" header carries ``watchStream.Rev()``, the revision the
        member has applied; mvcc's watchable store sends an event when the
        member applies it): so the member has applied the removal once the
        created header's revision reaches ``since``, or once the DELETE of
        our key at ``since`` (or any later event of the key) arrives. One or
        two requests per member on a healthy cluster; a member that lags gets a
        new watch only after windows that double (``watch_windows()``), a
        handful of requests however long it lags."""
        if since is None:
            return super().wait_gone(instance, since, deadline)
        # One serializable read first: the member has usually applied the
        # removal by now, and a read answers that faster than a new watch
        # through the gateway (measured, 200 stops: p99 29-31 ms read-first
        # against 41 ms watch-only; the 2 ms poll gave 25 ms). The watch is
        # for a member still behind.
        if not self.sees(instance, since):
            return True
        key = b64(self.backend.key)
        window, cap = watch_windows(self.backend.removal_deleted)
        while True:
            end = time.monotonic() + deadline.remaining()
            until = min(end, time.monotonic() + window)
            try:
                for result in self._member.watch(key, since, until):
                    if _reached(result, since):
                        return True
            except RegistrationRejected as exc:  # the core asks again until its deadline
                raise RegistryUnavailable(str(exc)) from None
            except RegistryUnavailable:
                if time.monotonic() >= end - 0.001:
                    raise  # the member said nothing: the report says so
                if not _silent(until):
                    raise
            if time.monotonic() >= end - 0.001:
                return False
            window = min(window * 2, cap)

    def close(self) -> None:
        self._member.close()


def _silent(until: float) -> bool:
    """Whether a watch that raised had merely reached its window's end."""
    return time.monotonic() >= until - 0.001


def _reached(result: dict, since: int) -> bool:
    """Whether a watch message shows the member at or past ``since``: its
    header revision (for the "created" message, the member's own), an
    event's revision, or a compaction past it."""
    revisions = [int(result.get("header", {}).get("revision", 0)),
                 int(result.get("compact_revision", 0))]
    revisions += [int(e.get("kv", {}).get("mod_revision", 0)) for e in result.get("events", ())]
    return max(revisions) >= since
