"""etcd's JSON gateway through etcd3gw: one member's client with its TLS
and auth token, its errors mapped to ours, and the failover between
members that etcd3gw (which talks to one host) leaves to us.

etcd3gw takes TLS files but no user: authentication is ours. A member
gives a token for user + password (``/v3/auth/authenticate``); every call
carries it in the ``Authorization`` header. Tokens expire ("simple" tokens
after --auth-token-ttl, 5 min by default, without use; JWTs at a fixed
time) and vanish when etcd restarts: on "invalid auth token" the member
authenticates again once and repeats the call, as etcd's own Go client does.
"""
from __future__ import annotations

import base64
import json
import logging
import random
import time
from collections.abc import Iterator
from typing import NamedTuple
from urllib.parse import urlsplit

import etcd3gw
import requests
from etcd3gw import exceptions as etcd_exc

from registrar.plugin import (RegistrarError, RegistrationRejected, RegistryUnavailable, TLSConfig,
                              client_errors, short_reason, verify_failed)

log = logging.getLogger(__name__)

# gRPC status codes etcd puts in its gateway errors.
_NOT_FOUND = 5
_PERMISSION_DENIED = 7
# cancelled, unknown, deadline exceeded, resource exhausted, aborted, internal, unavailable
_TRANSIENT = {1, 2, 4, 8, 10, 13, 14}
# What etcd answers when a call needs a (new) token: the token expired or
# etcd restarted, auth was turned on since, or the auth store changed.
_TOKEN_ERRORS = ("invalid auth token", "user name is empty", "revision of auth store is old")
# etcd 3.4+ with --client-cert-auth and auth on: a gateway request whose
# client certificate has a Common Name gets a plain-text 400 with this.
_CN_REFUSED = "CommonName of client sending a request against gateway"


class NotFound(RegistrationRejected):
    """The lease is gone (expired or revoked)."""


class TokenRejected(RegistrationRejected):
    """The call needs a (new) auth token."""


class TLSFailed(RegistrationRejected):
    """The TLS handshake failed: certificates do not mend by retrying, but
    another member may have a good one (the cluster tries it first)."""


class Credentials(NamedTuple):
    """An etcd user and its password; ``source`` says where the password
    came from (a file, a variable) for error messages, never what it is."""
    username: str
    password: str
    source: str


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class _Session(requests.Session):
    """requests lets $REQUESTS_CA_BUNDLE / $CURL_CA_BUNDLE win over a
    session's own ``verify`` (psf/requests#3829), so etcd3gw's ``ca_cert``
    (it sets ``session.verify``) is ignored wherever those are set, as in
    many images. Here the session's setting wins; with no ``tls.ca_file``
    (verify True) the environment's bundle still applies."""

    def merge_environment_settings(self, url, proxies, stream, verify, cert):  # type: ignore
        return super().merge_environment_settings(
            url, proxies, stream, self.verify if verify is None else verify, cert)


def _session(tls: TLSConfig | None) -> requests.Session:
    session = _Session()
    if tls is not None:
        session.verify = (tls.ca_file or True) if tls.verify else False
        if tls.cert_file:
            session.cert = (tls.cert_file, tls.key_file) if tls.key_file else tls.cert_file
    return session


def _tls_reason(text: str) -> str:
    if "WRONG_VERSION_NUMBER" in text:
        return "TLS handshake failed: the server does not speak TLS (an http:// endpoint?)"
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return verify_failed(text)
    if "EOF occurred" in text or "ALERT" in text.upper():
        return ("TLS handshake failed: the server refused our client certificate (it needs "
                "tls.cert_file signed by a CA it trusts)")
    return short_reason(text)


class Member:
    """One member: an etcd3gw client over our session, and its auth token."""

    def __init__(self, url: str, timeout: float, tls: TLSConfig | None = None,
                 credentials: Credentials | None = None):
        parts = urlsplit(url)
        self.url = url
        self.client = etcd3gw.Etcd3Client(host=parts.hostname, port=parts.port,
                                          protocol=parts.scheme, timeout=timeout,
                                          session=_session(tls))
        self.credentials = credentials
        self._token: str | None = None
        self._auth_off = False  # the member said auth is not enabled

    @property
    def secrets(self) -> list[str | None]:
        return [self.credentials.password if self.credentials else None, self._token]

    def post(self, path: str, payload: dict) -> dict:
        """One gateway call, authenticating first (or again once, if the
        token is rejected) when credentials are configured."""
        self._authenticate_first()
        try:
            return self._post(path, payload)
        except TokenRejected as exc:
            self._authenticate_again(exc)
            return self._post(path, payload)

    def _authenticate_first(self) -> None:
        if self.credentials and self._token is None and not self._auth_off:
            self._authenticate(self.credentials)

    def _authenticate_again(self, exc: TokenRejected) -> None:
        """After the member rejected our token (or asked for one): a new
        token, or RegistrationRejected when no credentials are configured."""
        if not self.credentials:
            raise RegistrationRejected(
                f"{self.url}: etcd requires authentication: configure username and "
                f"password_file (or $ETCD_PASSWORD)") from None
        log.debug("%s: %s; authenticating again as %s", self.url, exc, self.credentials.username)
        self._auth_off = False
        self._authenticate(self.credentials)

    def watch(self, key: str, start_revision: int, until: float) -> Iterator[dict]:
        """A watch of ``key`` (base64) from ``start_revision`` on this member,
        through the gateway's streaming POST /v3/watch: yields each message's
        ``result`` (the first is the "created" one, whose header carries the
        revision this member has applied) until ``until`` (time.monotonic()),
        then ends. Closing the generator closes the stream (etcd cancels the
        watch with the connection). Raises like ``post()``; a member that
        says nothing at all by ``until`` raises RegistryUnavailable."""
        self._authenticate_first()
        try:
            yield from self._watch(key, start_revision, until)
        except TokenRejected as exc:
            self._authenticate_again(exc)
            yield from self._watch(key, start_revision, until)

    def _watch(self, key: str, start_revision: int, until: float) -> Iterator[dict]:
        c = self.client
        began = time.monotonic()
        body = {"create_request": {"key": key, "start_revision": start_revision}}
        answered = False
        with client_errors(c.base_url, self._classify, secrets=self.secrets):
            try:
                # The read timeout bounds each wait for the next bytes: the
                # headers, then every message.
                resp = c.session.post(c.get_url("/watch"), json=body, stream=True,
                                      timeout=(c.timeout, max(0.001, until - began)))
            except requests.exceptions.ReadTimeout:
                raise RegistryUnavailable(f"{c.base_url}: no answer to a watch within "
                                          f"{until - began:.1f}s") from None
            except requests.exceptions.Timeout as exc:
                raise etcd_exc.ConnectionTimeoutError(str(exc)) from None
            except requests.exceptions.ConnectionError as exc:
                raise etcd_exc.ConnectionFailedError(str(exc)) from None
            try:
                if resp.status_code != requests.codes["ok"]:
                    raise etcd_exc.Etcd3Exception(resp.text, resp.reason)
                pending = b""
                chunks = resp.iter_content(chunk_size=None)
                while time.monotonic() < until:
                    try:
                        chunk = next(chunks)
                    except StopIteration:
                        raise etcd_exc.ConnectionFailedError("the watch stream ended") from None
                    except requests.exceptions.ConnectionError as exc:
                        if "Read timed out" in str(exc):
                            break  # until has come
                        raise etcd_exc.ConnectionFailedError(str(exc)) from None
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in filter(None, (ln.strip() for ln in lines)):
                        message = json.loads(line)
                        if "error" in message:
                            raise etcd_exc.Etcd3Exception(json.dumps(message["error"]),
                                                          "watch failed")
                        result = message.get("result", {})
                        answered = True
                        reason = result.get("cancel_reason")
                        if reason and int(result.get("compact_revision", 0)) <= 0:
                            raise etcd_exc.Etcd3Exception(json.dumps({"message": reason}),
                                                          "watch canceled")
                        yield result
            finally:
                resp.close()
        if not answered:
            raise RegistryUnavailable(f"{c.base_url}: no answer to a watch within "
                                      f"{until - began:.1f}s")

    def _post(self, path: str, payload: dict) -> dict:
        c = self.client
        with client_errors(c.base_url, self._classify, secrets=self.secrets):
            return c.post(c.get_url(path), json=payload)

    def _authenticate(self, credentials: Credentials) -> None:
        user, password, source = credentials
        self._token = None
        self.client.session.headers.pop("Authorization", None)
        try:
            result = self._post("/auth/authenticate", {"name": user, "password": password})
        except RegistrationRejected as exc:
            if "authentication is not enabled" in str(exc):
                # Credentials given ahead of `etcdctl auth enable`: go on
                # without a token until etcd asks for one.
                log.info("%s: auth is not enabled on this member; not sending a token", self.url)
                self._auth_off = True
                return
            if "invalid user ID or password" in str(exc):
                raise RegistrationRejected(
                    f"{self.url}: authentication failed for user {user!r}: unknown user or "
                    f"wrong password (from {source})") from None
            raise
        self._token = result["token"]
        self.client.session.headers["Authorization"] = self._token

    def _classify(self, exc: BaseException) -> tuple[type[RegistrarError], str] | None:
        c = self.client
        if isinstance(exc, etcd_exc.ConnectionTimeoutError):
            return RegistryUnavailable, f"no answer within {c.timeout}s"
        if isinstance(exc, etcd_exc.ConnectionFailedError):
            text = exc.detail_text or str(exc)
            if "SSLError" in text or "SSL:" in text:
                return TLSFailed, _tls_reason(text)
            return RegistryUnavailable, short_reason(text)
        if not isinstance(exc, etcd_exc.Etcd3Exception):
            return None
        text = exc.detail_text or str(exc)
        if _CN_REFUSED in text:
            return RegistrationRejected, (
                "etcd's JSON gateway refuses a client certificate with a Common Name while "
                "auth is enabled: use a certificate without CN and username + password_file")
        try:
            detail = json.loads(text or "{}")
        except ValueError:
            detail = {}
        code = detail.get("code") if isinstance(detail, dict) else None
        message = (detail.get("message") if isinstance(detail, dict) else None) or text
        if any(needle in message for needle in _TOKEN_ERRORS):
            return TokenRejected, message
        if code == _NOT_FOUND:
            return NotFound, message
        if code == _PERMISSION_DENIED and self.credentials:
            return RegistrationRejected, (f"{message} (user {self.credentials.username!r}: "
                                          f"its roles must allow readwrite on the prefix)")
        if code in _TRANSIENT or code is None:
            return RegistryUnavailable, message
        return RegistrationRejected, message

    def close(self) -> None:
        self.client.session.close()


class Cluster:
    """Every member's client; a call goes to the member that answered last
    and fails over to the next while one is unreachable. Each instance
    starts at a member chosen at random: a fleet whose pods share one
    config spreads its calls over the members instead of loading the first
    endpoint with all of them (measured: 114 requests/s and 23 % CPU on it
    for 200 pods, 0 on the others), as kazoo's randomized hosts do."""

    def __init__(self, name: str, endpoints: list[str], timeout: float,
                 tls: TLSConfig | None = None, credentials: Credentials | None = None):
        self.name = name
        self.endpoints = endpoints
        self.members = [Member(url, timeout, tls, credentials) for url in endpoints]
        self.current = random.randrange(len(self.members))

    def call(self, path: str, payload: dict) -> dict:
        errors: list[RegistrarError] = []
        for step in range(len(self.members)):
            index = (self.current + step) % len(self.members)
            try:
                result = self.members[index].post(path, payload)
            except (RegistryUnavailable, TLSFailed) as exc:
                errors.append(exc)
                continue
            if index != self.current:
                log.info("%s: now using %s", self.name, self.endpoints[index])
                self.current = index
            return result
        if all(isinstance(exc, TLSFailed) for exc in errors):
            raise errors[0] if len(errors) == 1 else TLSFailed(
                f"TLS failed with every etcd endpoint: {errors[0]}")
        raise RegistryUnavailable("no etcd endpoint answered: " + "; ".join(map(str, errors)))

    def close(self) -> None:
        for member in self.members:
            member.close()
