"""py-consul, as this backend uses it: clients with every setting explicit,
one call with its exceptions mapped to ours, and two calls that py-consul's
own cannot make: the health read (health.service() has no ``stale``) and
the catalog deregistration (catalog.deregister() puts the token in the body
as ``WriteRequest``, which Consul 1.8 refuses: 400 "unknown field")."""
from __future__ import annotations

import json
import re
import socket
import ssl
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote as url_quote

import consul
import requests
from consul import exceptions as consul_exc
from consul.callback import CB

from registrar.plugin import (RegistrarError, RegistrationRejected, RegistryUnavailable,
                              TLSConfig, client_errors, scrub, short_reason, verify_failed)

from .config import parse_address

T = TypeVar("T")

#: How an agent says it does not know our check or service (it restarted and
#: forgot us, or we are gone already): a 500 from 1.8 (with ACLs, "Unknown
#: service" even for deregister), a 404 from newer agents (py-consul: False).
_FORGOTTEN = re.compile(r"does not have associated TTL|Unknown check|Unknown service", re.I)

#: OpenSSL's reason in an SSLError's text: "[SSL: CODE] reason (_ssl.c:NNN)".
_SSL_REASON = re.compile(r"\[(?:SSL|X509): ([A-Z0-9_]+)\] ([^(]*?)\s*\(_ssl")
#: Alerts by which the agent refuses our client certificate (or its absence):
#: Go answers bad_certificate to both under TLS 1.3.
_CERT_REFUSED = ("ALERT_BAD_CERTIFICATE", "ALERT_CERTIFICATE_REQUIRED", "ALERT_UNKNOWN_CA",
                 "ALERT_CERTIFICATE_UNKNOWN", "ALERT_UNSUPPORTED_CERTIFICATE")


class Forgotten(RegistryUnavailable):
    """The agent does not know our check or service (it restarted, or we are
    gone). Handled where it means something; transient if it escapes."""


class TLSRejected(RegistrationRejected):
    """The TLS configuration cannot work with this agent (its certificate
    fails verification, or it refuses ours): unlike an ACL refusal of one
    call, nothing else will work either."""


def go_duration(seconds: float) -> str:
    """Seconds as a Go duration, to the millisecond: "3s", "2.5s",
    "12345.678s" (``:g`` would round 12345.678 to "12345.7s")."""
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


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
            source: str = "", client: consul.Consul | None = None) -> T:
    """One py-consul call, its exceptions mapped to ours. Messages name where
    the token came from (``source``), never the token: it is scrubbed even
    from Consul's own text, to be sure. ``client`` (the one ``fn`` uses)
    lets a TLS connection cut short be diagnosed."""
    with client_errors(f"{what} at {where}", _classifier(token, source, client),
                       secrets=[token]):
        return fn()


#: How a TLS connection that the agent cut short shows (see cert_refusal()).
_CUT = ("EOF occurred in violation of protocol", "UNEXPECTED_EOF", "Connection reset",
        "Connection aborted", "RemoteDisconnected")


def _classifier(token: str | None, source: str, client: consul.Consul | None = None):
    def classify(exc: BaseException) -> tuple[type[RegistrarError], str] | None:
        text = scrub(exc, [token])
        if (client is not None and client.http.scheme == "https"
                and isinstance(exc, requests.ConnectionError)
                and any(cut in str(exc) for cut in _CUT)):
            alert = cert_refusal(client)
            if alert:
                return _cert_refused(alert.lower().replace("_", " "))
        if isinstance(exc, consul_exc.ACLPermissionDenied):  # a subclass: before ConsulException
            if "ACL not found" in text:
                cause = (f"Consul does not know the ACL token{source} (ACL not found)" if token
                         else "no ACL token was given and Consul requires one")
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
        if isinstance(exc, requests.exceptions.SSLError):
            return tls_error(str(exc))
        if isinstance(exc, requests.Timeout):
            return RegistryUnavailable, "no answer in time"
        if isinstance(exc, requests.RequestException):
            return RegistryUnavailable, short_reason(exc, [token])
        return None
    return classify


def cert_refusal(client: consul.Consul) -> str | None:
    """The alert by which the agent refuses our client certificate (or its
    absence), e.g. "SSLV3_ALERT_BAD_CERTIFICATE"; None if it accepts it.

    Under TLS 1.3 the server checks the client's certificate after the
    client has finished its handshake and sent the request; its alert then
    races the close of a connection with that request unread (a reset), so
    a request often fails with a bare EOF or reset. A handshake that sends
    nothing reads the alert for sure: the server has nothing unread when it
    closes. Only called on that failure path."""
    http = client.http
    verify, cert = http.verify, http.cert
    host = http.host.strip("[]")
    context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
    if verify is False:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    timeout = min(client.http.connections_timeout or 1.0, 1.0)
    try:
        if cert:
            context.load_cert_chain(*((cert,) if isinstance(cert, str) else cert))
        with socket.create_connection((host, http.port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host) as conn:
            conn.recv(1)  # the server sends nothing unless it refuses us
    except ssl.SSLError as exc:
        code = _SSL_REASON.search(str(exc))
        if code and code.group(1).endswith(_CERT_REFUSED):
            return code.group(1)
    except OSError:  # timed out (accepted: it waits for a request), refused, reset
        pass
    return None


def tls_error(text: str) -> tuple[type[RegistrarError], str]:
    """An SSLError as one line naming what to fix. What the configuration
    decides (the CA, the client certificate, TLS on a plain port) is
    permanent: retrying cannot help, and `registrar agent` exits 1."""
    match = _SSL_REASON.search(text)
    code, reason = match.groups() if match else ("", "")
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return TLSRejected, verify_failed(text)
    if code.endswith(_CERT_REFUSED):
        return _cert_refused(reason)
    if code == "WRONG_VERSION_NUMBER":
        return TLSRejected, ("TLS: the address does not speak TLS (wrong version number): give "
                             "the agent's https port, or an http:// address without tls")
    return RegistryUnavailable, f"TLS handshake failed ({reason or scrub(text)})"


def _cert_refused(reason: str) -> tuple[type[RegistrarError], str]:
    return TLSRejected, (f"TLS: the agent refused our client certificate ({reason}): it "
                         f"requires one (verify_incoming) signed by a CA it trusts; give it as "
                         f"tls.cert_file and tls.key_file")


def read_health(c: consul.Consul, service: str, instance_id: str, passing: bool, stale: bool,
                datacenter: str | None, index: int = 0,
                wait: float | None = None) -> tuple[int, list[dict]]:
    """GET /v1/health/service/<name>, filtered to one id, as (index, entries)."""
    return _read(c, f"/v1/health/service/{service}", f"Service.ID == {quote(instance_id)}",
                 [("passing", "1")] if passing else [], stale, datacenter, index, wait)


def _read(c: consul.Consul, path: str, filter_expr: str, params: list[tuple[str, Any]],
          stale: bool, datacenter: str | None, index: int,
          wait: float | None) -> tuple[int, list[dict]]:
    """A filtered read as (index, items); a blocking query from ``index``
    (held up to ``wait`` seconds) when it is not 0."""
    params = [("filter", filter_expr), *params]
    if stale:
        params.append(("stale", ""))
    if datacenter:
        params.append(("dc", datacenter))
    if index:
        params += [("index", index), ("wait", go_duration(wait))]
    idx, items = c.http.get(CB.json(index=True), path, params=params,
                            headers=c.prepare_headers())
    return int(idx), items or []


def catalog_deregister(c: consul.Consul, node: str, service_id: str,
                       datacenter: str | None) -> bool:
    """PUT /v1/catalog/deregister of one service on one node, the token in
    the header as for every other call."""
    body: dict[str, Any] = {"Node": node, "ServiceID": service_id}
    if datacenter:
        body["Datacenter"] = datacenter
    return c.http.put(CB.boolean(), "/v1/catalog/deregister", headers=c.prepare_headers(),
                      data=json.dumps(body))


def read_node_checks(c: consul.Consul, node: str, service_id: str, stale: bool,
                     datacenter: str | None, index: int = 0,
                     wait: float | None = None) -> tuple[int, list[dict]]:
    """GET /v1/health/node/<node>: the node's own checks and one service's,
    as (index, checks); a blocking query from ``index`` when it is not 0.
    A server answers it when a check on that node changes, not when any
    instance of the service does."""
    return _read(c, f"/v1/health/node/{url_quote(node, safe='')}",
                 f'ServiceID == "" or ServiceID == {quote(service_id)}', [], stale, datacenter,
                 index, wait)
