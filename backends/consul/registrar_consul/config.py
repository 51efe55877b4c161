"""The Consul backend's config section, and the address parsing it needs."""
from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from registrar.plugin import BackendConfig, ConfigError, Duration, StrList, TLSConfig, read_token


def parse_address(text: str, https: bool = False) -> tuple[str, str, int]:
    """``http(s)://host:port`` or ``host:port`` -> (scheme, host, port); the
    port defaults to 8500 (8501 for https). Raises ValueError."""
    url = text if "//" in text else ("https://" if https else "http://") + text
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


class ConsulConfig(BackendConfig):
    type: Literal["consul"]
    address: str | None = Field(
        None, description="The local Consul agent (default: $CONSUL_HTTP_ADDR, else "
                          "http://127.0.0.1:8500).")
    token: SecretStr | None = Field(
        None, description="ACL token (default: token_file, else $CONSUL_HTTP_TOKEN, else "
                          "$CONSUL_HTTP_TOKEN_FILE). Never logged.")
    token_file: str | None = Field(None, description="File holding the ACL token (a mounted Secret).")
    tls: ConsulTLS = Field(default_factory=ConsulTLS)
    datacenter: str | None = Field(
        None, description="The local agent's datacenter, named in every read (default: the agent's).")
    ttl: Duration = Field(10.0, ge=1.0, description="TTL of the service's check.")
    deregister_critical_after: Duration = Field(
        60.0, ge=60.0, description="Consul reaps the service once its check has been critical "
                                   "this long (Consul's minimum is 1m).")
    observers: StrList | None = Field(
        None, description="Consul HTTP addresses whose view must drop the instance before "
                          "the pod stops: the servers or other agents (default, or empty: address).")
    health_filter: Literal["passing", "any"] = Field(
        "passing", description="What consumers query: passing (the ?passing view; maintenance "
                               "drops the instance at once) or any (every registered instance).")
    timeout: Duration = Field(2.0, gt=0, description="Timeout of one request to one agent.")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            parse_address(value)
        return value

    @field_validator("observers")
    @classmethod
    def _observers(cls, value: list[str] | None) -> list[str] | None:
        for address in value or ():
            parse_address(address)
        return value or None  # empty (e.g. "${CONSUL_OBSERVERS:-}"): the default

    @field_validator("token_file")
    @classmethod
    def _token_file(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                read_token(value, "token_file")
            except ConfigError as exc:
                raise ValueError(exc.message) from None
        return value

    @model_validator(mode="after")
    def _one_token(self) -> "ConsulConfig":
        if self.token is not None and self.token_file is not None:
            raise ValueError("give token or token_file, not both")
        return self
