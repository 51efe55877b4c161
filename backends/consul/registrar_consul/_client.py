"""py-consul, as this backend uses it: clients with every setting explicit,
one call with its exceptions mapped to ours, and the health read that
py-consul's own health.service() cannot make (no ``stale``)."""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import consul
import requests
from consul import exceptions as consul_exc
from consul.callback import CB

from registrar.plugin import (RegistrarError, RegistrationRejected, RegistryUnavailable,
                              TLSConfig, client_errors, scrub, short_reason)

from .config import parse_address

T = TypeVar("T")

#: How an agent says it does not know our check or service (it restarted and
#: forgot us, or we are gone already): a 500 from 1.8 (with ACLs, "Unknown
#: service" even for deregister), a 404 from newer agents (py-consul: False).
_FORGOTTEN = re.compile(r"does not have associated TTL|Unknown check|Unknown service", re.I)


class Forgotten(RegistryUnavailable):
    """The agent does not know our check or service (it restarted, or we are
    gone). Handled where it means something; transient if it escapes."""


def go_duration(seconds: float) -> str:
    return f"{seconds:g}s"


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def make_client(address: str, https: bool, tls: TLSConfig, timeout: float,
                token: str | None) -> consul.Consul:
    """A py-consul client for one address, with every setting explicit.

    py-consul's own environment handling is bypassed on purpose: it lets
    CONSUL_HTTP_TOKEN win over token=, and CONSUL_HTTP_SSL_VERIFY=<CA
    path> turns verification off. We resolve those ourselves.
    """
    scheme, host, port = parse_address(address, https)
    verify: bool | str = (tls.ca_file or True) if tls.verify else False
    cert = (tls.cert_file, tls.key_file) if tls.key_file else tls.cert_file
    c = consul.Consul(host=f"[{host}]" if ":" in host else host, port=port, scheme=scheme,
                      verify=verify, cert=cert, connections_timeout=timeout)
    c.token = token  # after __init__, which took CONSUL_HTTP_TOKEN over ours
    return c


def request(where: str, what: str, fn: Callable[[], T], token: str | None = None,
            source: str = "") -> T:
    """One py-consul call, its exceptions mapped to ours. Messages name where
    the token came from (``source``), never the token: it is scrubbed even
    from Consul's own text, to be sure."""
    with client_errors(f"{what} at {where}", _classifier(token, source), secrets=[token]):
        return fn()


def _classifier(token: str | None, source: str):
    def classify(exc: BaseException) -> tuple[type[RegistrarError], str] | None:
        text = scrub(exc, [token])
        if isinstance(exc, consul_exc.ACLPermissionDenied):  # a subclass: before ConsulException
            if "ACL not found" in text:
                cause = f"Consul does not know the ACL token{source} (ACL not found)" if token else \
                    "no ACL token was given and Consul requires one"
            else:
                cause = f"the ACL token{source} may not do this ({text})" if token else \
                    f"no ACL token was given and the anonymous token may not do this ({text})"
            return RegistrationRejected, cause
        if isinstance(exc, (consul_exc.BadRequest, consul_exc.ACLDisabled)):
            return RegistrationRejected, f"Consul refused it: {text}"
        if isinstance(exc, consul_exc.ClientError):
            return (RegistryUnavailable if str(exc)[:3] == "429" else RegistrationRejected), text
        if isinstance(exc, consul_exc.ConsulException):  # 5xx: no leader, rpc errors, or forgotten
            return (Forgotten if _FORGOTTEN.search(str(exc)) else RegistryUnavailable), text
        if isinstance(exc, requests.Timeout):
            return RegistryUnavailable, "no answer in time"
        if isinstance(exc, requests.RequestException):
            return RegistryUnavailable, short_reason(exc, [token])
        return None
    return classify


def read_health(c: consul.Consul, service: str, instance_id: str, passing: bool, stale: bool,
                datacenter: str | None, index: int = 0,
                wait: float | None = None) -> tuple[int, list[dict]]:
    """GET /v1/health/service/<name>, filtered to one id, as (index, entries)."""
    params: list[tuple[str, Any]] = [("filter", f"Service.ID == {quote(instance_id)}")]
    if passing:
        params.append(("passing", "1"))
    if stale:
        params.append(("stale", ""))
    if datacenter:
        params.append(("dc", datacenter))
    if index:
        params += [("index", index), ("wait", go_duration(wait))]
    idx, entries = c.http.get(CB.json(index=True), f"/v1/health/service/{service}",
                              params=params, headers=c.prepare_headers())
    return int(idx), entries or []
