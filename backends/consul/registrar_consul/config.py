"""The Consul backend's config section, and the address parsing it needs."""
from __future__ import annotations

import ssl
from typing import Literal
from urllib.parse import urlsplit

from registrar.plugin import (Annotated, BackendConfig, Duration, Rule, SecretFile, SecretText,
                              StrList, TLSConfig, at_least, doc, field, more_than,
                              refuse_credentials)


def parse_address(text: str, https: bool = False) -> tuple[str, str, int]:
    """``http(s)://host:port`` or ``host:port`` -> (scheme, host, port); the
    port defaults to 8500 (8501 for https). Raises ValueError."""
    url = text if "//" in text else ("https://" if https else "http://") + text
    refuse_credentials(url, "give token_file (or $CONSUL_HTTP_TOKEN) for Consul's ACL token")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname \
            or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"expected an address like http://127.0.0.1:8500, got {text!r}")
    return parts.scheme, parts.hostname, port or (8501 if parts.scheme == "https" else 8500)


class ConsulTLS(TLSConfig):
    """TLS to the agent and the observers (https addresses)."""

    def check(self) -> None:
        """Load the files the way every request will, so that a file that is
        not what it should be is a config error naming it, not a failed
        handshake later (and never OpenSSL's password prompt: an encrypted
        key is refused). Without files there is nothing to load: the system's
        CA bundle is what requests itself falls back on."""
        if self.ca_file is None and self.cert_file is None:
            return
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"ca_file {self.ca_file}: no PEM CA certificate in it "
                             f"({_ssl_reason(exc)})") from None
        if self.cert_file:
            try:
                context.load_cert_chain(self.cert_file, self.key_file, password=lambda: b"")
            except (ssl.SSLError, OSError) as exc:
                key = self.key_file or "the key in it"
                raise ValueError(f"cert_file {self.cert_file} with {key}: not a PEM certificate "
                                 f"and its unencrypted private key ({_ssl_reason(exc)})") from None


def _ssl_reason(exc: BaseException) -> str:
    text = str(exc)
    return text.split("]", 1)[-1].split("(_ssl", 1)[0].strip() or text


def _address(value: str) -> str:
    parse_address(value)
    return value


def _observers(value: list[str]) -> list[str] | None:
    for address in value:
        parse_address(address)
    return value or None  # empty (e.g. "${CONSUL_OBSERVERS:-}"): the default


class ConsulConfig(BackendConfig):
    type: Literal["consul"]
    address: Annotated[str | None, Rule(_address), doc(
        "The local Consul agent (default: $CONSUL_HTTP_ADDR, else http://127.0.0.1:8500, or "
        "https://127.0.0.1:8501 with tls).")] = None
    token: Annotated[SecretText | None, doc(
        "ACL token (default: token_file, else $CONSUL_HTTP_TOKEN, else "
        "$CONSUL_HTTP_TOKEN_FILE). Never logged.")] = None
    token_file: Annotated[SecretFile | None, doc(
        "File holding the ACL token (a mounted Secret).")] = None
    tls: ConsulTLS = field(default_factory=ConsulTLS)
    datacenter: Annotated[str | None, doc(
        "The local agent's datacenter, named in every read (default: the agent's).")] = None
    ttl: Annotated[Duration, at_least(1.0), doc("TTL of the service's check.")] = 10.0
    deregister_critical_after: Annotated[Duration, at_least(60.0), doc(
        "Consul reaps the service once its check has been critical this long (Consul's "
        "minimum is 1m).")] = 60.0
    observers: Annotated[StrList | None, Rule(_observers), doc(
        "Consul HTTP addresses whose view must drop the instance before the pod stops: the "
        "servers or other agents (default, or empty: address). When the agent does not "
        "answer at the stop, the removal goes through them.")] = None
    health_filter: Annotated[Literal["passing", "any"], doc(
        "What consumers query: passing (the ?passing view; maintenance drops the instance at "
        "once) or any (every registered instance).")] = "passing"
    timeout: Annotated[Duration, more_than(0), doc(
        "Timeout of one request to one agent.")] = 2.0

    def check(self) -> None:
        if self.token is not None and self.token_file is not None:
            raise ValueError("give token or token_file, not both")
