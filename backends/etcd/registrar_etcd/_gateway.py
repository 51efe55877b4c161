"""etcd's JSON gateway through etcd3gw: one call to one member, its errors
mapped to ours, and the failover between members that etcd3gw (which talks
to one host) leaves to us."""
from __future__ import annotations

import base64
import json
import logging
from urllib.parse import urlsplit

import etcd3gw
from etcd3gw import exceptions as etcd_exc

from registrar.plugin import (RegistrarError, RegistrationRejected, RegistryUnavailable,
                              client_errors, short_reason)

log = logging.getLogger(__name__)

# gRPC status codes etcd puts in its gateway errors.
_NOT_FOUND = 5
_TRANSIENT = {1, 2, 4, 8, 10, 13, 14}  # cancelled, unknown, deadline, exhausted, aborted, internal, unavailable


class NotFound(RegistrationRejected):
    """The lease is gone (expired or revoked)."""


def client(url: str, timeout: float) -> etcd3gw.Etcd3Client:
    parts = urlsplit(url)
    return etcd3gw.Etcd3Client(host=parts.hostname, port=parts.port, protocol=parts.scheme,
                               timeout=timeout)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _classify(c: etcd3gw.Etcd3Client):
    def classify(exc: BaseException) -> tuple[type[RegistrarError], str] | None:
        if isinstance(exc, etcd_exc.ConnectionTimeoutError):
            return RegistryUnavailable, f"no answer within {c.timeout}s"
        if isinstance(exc, etcd_exc.ConnectionFailedError):
            return RegistryUnavailable, short_reason(exc.detail_text or str(exc))
        if not isinstance(exc, etcd_exc.Etcd3Exception):
            return None
        try:
            detail = json.loads(exc.detail_text or "{}")
        except ValueError:
            detail = {}
        code, message = detail.get("code"), detail.get("message") or exc.detail_text or str(exc)
        if code == _NOT_FOUND:
            return NotFound, message
        if code in _TRANSIENT or code is None:
            return RegistryUnavailable, message
        return RegistrationRejected, message
    return classify


def post(c: etcd3gw.Etcd3Client, path: str, payload: dict) -> dict:
    """One gateway call to one member, with errors mapped to ours."""
    with client_errors(c.base_url, _classify(c)):
        return c.post(c.get_url(path), json=payload)


class Cluster:
    """Every member's client; a call goes to the member that answered last
    and fails over to the next while one is unreachable."""

    def __init__(self, name: str, endpoints: list[str], timeout: float):
        self.name = name
        self.endpoints = endpoints
        self.clients = [client(url, timeout) for url in endpoints]
        self.current = 0

    def call(self, path: str, payload: dict) -> dict:
        errors = []
        for step in range(len(self.clients)):
            index = (self.current + step) % len(self.clients)
            try:
                result = post(self.clients[index], path, payload)
            except RegistryUnavailable as exc:
                errors.append(str(exc))
                continue
            if index != self.current:
                log.info("%s: now using %s", self.name, self.endpoints[index])
                self.current = index
            return result
        raise RegistryUnavailable("no etcd endpoint answered: " + "; ".join(errors))

    def close(self) -> None:
        for c in self.clients:
            c.session.close()
