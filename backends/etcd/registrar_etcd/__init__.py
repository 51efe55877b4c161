"""etcd v3 backend: a leased key in the gRPC naming format.

Key ``<prefix>/<service>/<address>:<port>``, value
``{"Op":0,"Addr":"<address>:<port>","Metadata":{...}}`` attached to a lease,
so gRPC-go clients using etcd's resolver (``go.etcd.io/etcd/client/v3/naming``)
find the instance with no code of ours. Talks to etcd's JSON gateway through
etcd3gw, failing over between endpoints itself.
"""
from __future__ import annotations

import base64
import json
import logging
import math
from typing import Any, Literal
from urllib.parse import urlsplit

import etcd3gw
from etcd3gw import exceptions as etcd_exc
from pydantic import Field, field_validator

from registrar.backend import Backend, Observer
from registrar.config import BackendConfig, Duration, StrList
from registrar.errors import RegistrationRejected, RegistryUnavailable
from registrar.instance import Instance

log = logging.getLogger(__name__)

# gRPC status codes etcd puts in its gateway errors.
_NOT_FOUND = 5
_TRANSIENT = {1, 2, 4, 8, 10, 13, 14}  # cancelled, unknown, deadline, exhausted, aborted, internal, unavailable


class EtcdConfig(BackendConfig):
    type: Literal["etcd"]
    endpoints: StrList = Field(default_factory=lambda: ["http://127.0.0.1:2379"], min_length=1,
                               description="Client URLs of the cluster members; also the observers.")
    prefix: str = Field("/services", description="Key prefix; the key is <prefix>/<service>/<addr>:<port>.")
    ttl: Duration = Field(10.0, ge=2.0, description="Lease TTL (whole seconds).")
    timeout: Duration = Field(2.0, gt=0, description="Timeout of one request to one member.")

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, endpoints: list[str]) -> list[str]:
        for url in endpoints:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
                raise ValueError(f"expected a URL like http://10.0.0.1:2379, got {url!r}")
        return endpoints


def _client(url: str, timeout: float) -> etcd3gw.Etcd3Client:
    parts = urlsplit(url)
    return etcd3gw.Etcd3Client(host=parts.hostname, port=parts.port, protocol=parts.scheme,
                               timeout=timeout)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _post(client: etcd3gw.Etcd3Client, path: str, payload: dict) -> dict:
    """One gateway call to one member, with errors mapped to ours."""
    try:
        return client.post(client.get_url(path), json=payload)
    except etcd_exc.ConnectionTimeoutError:
        raise RegistryUnavailable(f"{client.base_url}: no answer within {client.timeout}s") from None
    except etcd_exc.ConnectionFailedError as exc:
        raise RegistryUnavailable(f"{client.base_url}: {_why(exc)}") from None
    except etcd_exc.Etcd3Exception as exc:
        try:
            detail = json.loads(exc.detail_text or "{}")
        except ValueError:
            detail = {}
        code, message = detail.get("code"), detail.get("message") or exc.detail_text or str(exc)
        if code == _NOT_FOUND:
            raise _NotFound(message) from None
        if code in _TRANSIENT or code is None:
            raise RegistryUnavailable(f"{client.base_url}: {message}") from None
        raise RegistrationRejected(f"{client.base_url}: {message}") from None


def _why(exc: etcd_exc.Etcd3Exception) -> str:
    """A short reason instead of requests' paragraph-long one."""
    text = exc.detail_text or str(exc)
    for needle, reason in (("Connection refused", "connection refused"),
                           ("Name or service not known", "unknown host"),
                           ("Connection reset", "connection reset"),
                           ("Service Unavailable", "service unavailable")):
        if needle in text:
            return reason
    return text if len(text) <= 120 else text[:117] + "..."


class _NotFound(RegistrationRejected):
    """The lease is gone (expired or revoked)."""


class EtcdBackend(Backend):
    """Registration = a key attached to a lease; heartbeat = lease keep-alive
    plus a check that the key is still ours."""

    Config = EtcdConfig

    def __init__(self, instance: Instance, config: EtcdConfig):
        super().__init__(instance, config)
        self.key = f"{config.prefix.rstrip('/')}/{instance.service}/{instance.hostport}"
        self._clients = [_client(url, config.timeout) for url in config.endpoints]
        self._current = 0
        self._lease: int | None = None
        self._removed_revision: int | None = None
        self._observers: list[EtcdObserver] | None = None

    @property
    def ttl(self) -> float:
        return self.config.ttl

    def value(self, status: str | None = None) -> str:
        meta: dict[str, Any] = {"id": self.instance.id, "tags": list(self.instance.tags),
                                "meta": dict(self.instance.meta)}
        if status:
            meta["status"] = status
        return json.dumps({"Op": 0, "Addr": self.instance.hostport, "Metadata": meta},
                          separators=(",", ":"))

    def _call(self, path: str, payload: dict) -> dict:
        """Call the cluster, failing over to the next endpoint while one is
        unreachable (etcd3gw talks to one host only)."""
        errors = []
        for step in range(len(self._clients)):
            index = (self._current + step) % len(self._clients)
            try:
                result = _post(self._clients[index], path, payload)
            except RegistryUnavailable as exc:
                errors.append(str(exc))
                continue
            if index != self._current:
                log.info("etcd: now using %s", self.config.endpoints[index])
                self._current = index
            return result
        raise RegistryUnavailable("no etcd endpoint answered: " + "; ".join(errors))

    def _grant(self) -> None:
        result = self._call("/lease/grant", {"TTL": math.ceil(self.config.ttl), "ID": 0})
        self._lease = int(result["ID"])
        self._removed_revision = None

    def _put(self, status: str | None = None) -> None:
        try:
            self._call("/kv/put", {"key": _b64(self.key), "value": _b64(self.value(status)),
                                   "lease": self._lease})
        except _NotFound:  # the lease expired between grant/keep-alive and put
            self._grant()
            self._call("/kv/put", {"key": _b64(self.key), "value": _b64(self.value(status)),
                                   "lease": self._lease})

    def register(self) -> None:
        if self._lease is None:
            self._grant()
        self._put()

    def heartbeat(self) -> bool:
        if self._lease is None:
            self.register()
            return True
        result = self._call("/lease/keepalive", {"ID": self._lease})
        if int(result.get("result", {}).get("TTL", -1)) <= 0:
            log.warning("etcd: lease %x expired; granting a new one", self._lease)
            self._grant()
            self._put()
            return True
        kvs = self._call("/kv/range", {"key": _b64(self.key)}).get("kvs", [])
        if not kvs or int(kvs[0].get("lease", 0)) != self._lease:
            log.warning("etcd: %s is missing or not ours; writing it again", self.key)
            self._put()
            return True
        return False

    def drain(self, reason: str = "") -> None:
        if self._lease is None:
            return  # not registered by us: nothing of ours to mark
        value = self.value(status="draining")
        self._call("/kv/txn", {
            "compare": [{"key": _b64(self.key), "target": "LEASE", "result": "EQUAL",
                         "lease": self._lease}],
            "success": [{"request_put": {"key": _b64(self.key), "value": _b64(value),
                                         "lease": self._lease}}]})

    def deregister(self) -> int:
        if self._removed_revision is not None:
            return self._removed_revision
        if self._lease is None:
            # Not registered by this process (the `deregister` command):
            # remove whatever entry the key holds.
            result = self._call("/kv/deleterange", {"key": _b64(self.key)})
        else:
            # Revoking the lease deletes the key in the same step, and only
            # while the key is still ours: a new incarnation that took the
            # key over holds it with a lease of its own.
            try:
                result = self._call("/kv/lease/revoke", {"ID": self._lease})
            except _NotFound:  # expired: the key went with it
                result = self._call("/kv/range", {"key": _b64(self.key), "count_only": True})
            self._lease = None
        # The revision at which the removal happened (or a later one):
        # observers confirm once their member has applied it.
        self._removed_revision = int(result["header"]["revision"])
        return self._removed_revision

    def observers(self) -> list["EtcdObserver"]:
        if self._observers is None:
            self._observers = [EtcdObserver(self, url) for url in self.config.endpoints]
        return self._observers

    def close(self) -> None:
        for client in self._clients:
            client.session.close()
        for observer in self._observers or ():
            observer.close()


class EtcdObserver(Observer):
    """One member's own view: a serializable read (answered from the
    member's local state, not through the leader)."""

    def __init__(self, backend: EtcdBackend, url: str):
        self.backend = backend
        self.name = f"etcd {url}"
        self._client = _client(url, backend.config.timeout)

    def sees(self, instance: Instance) -> bool:
        result = _post(self._client, "/kv/range",
                       {"key": _b64(self.backend.key), "serializable": True, "keys_only": True})
        removed = self.backend._removed_revision
        if removed is None:
            return bool(result.get("kvs"))
        # Once this member has applied the removal's revision, whatever the
        # key holds now (if anything) was written after us by someone else.
        return int(result["header"]["revision"]) < removed

    def close(self) -> None:
        self._client.session.close()
