"""The etcd backend's config section, and where its password comes from."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from registrar.plugin import (BackendConfig, ConfigError, Duration, SecretFile, StrList, TLSConfig,
                              read_token, show)

#: The environment variable read for the password when no password_file is given.
PASSWORD_ENV = "ETCD_PASSWORD"


class EtcdTLS(TLSConfig):
    """TLS to the members and the observers (https endpoints). With
    --client-cert-auth and auth enabled, etcd's JSON gateway refuses a client
    certificate that has a Common Name: use one without CN, plus username."""


class EtcdConfig(BackendConfig):
    type: Literal["etcd"]
    endpoints: StrList = Field(
        default_factory=lambda: ["http://127.0.0.1:2379"], min_length=1,
        description="Client URLs of the cluster members; also the observers.")
    prefix: str = Field("services", description=(
        "Key prefix; the key is <prefix>/<service>/<addr>:<port>, the prefix as written. "
        "gRPC-go dials etcd:/// + prefix + / + service: etcd:///services/web by default, "
        "etcd:////services/web for the prefix /services."))
    metadata: Literal["string", "object", "none"] = Field("string", description=(
        "The value's Metadata: string = {\"id\",\"tags\",\"meta\"} as JSON text (every "
        "gRPC-go balancer takes it); none = no Metadata; object = the same as a JSON object, "
        "marked draining before removal (gRPC-go's round_robin panics on it: pick_first or "
        "non-gRPC readers only)."))
    ttl: Duration = Field(10.0, ge=2.0, description="Lease TTL (whole seconds).")
    timeout: Duration = Field(2.0, gt=0, description="Timeout of one request to one member.")
    tls: EtcdTLS | None = Field(None, description=(
        "CA, client certificate and key for https endpoints (default for https: the system's "
        "CA bundle, no client certificate)."))
    username: str | None = Field(None, min_length=1, description=(
        "etcd user when auth is enabled: the backend authenticates with it and the password "
        "and sends the token (renewed when it expires)."))
    password_file: SecretFile | None = Field(None, description=(
        f"File holding the password of username (a mounted Secret); default: ${PASSWORD_ENV}. "
        "Never logged."))

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, endpoints: list[str]) -> list[str]:
        for url in endpoints:
            try:
                parts = urlsplit(url)
                ok = parts.scheme in ("http", "https") and parts.hostname and parts.port
            except ValueError:  # "http://[::1", a port past 65535
                ok = False
            if not ok:
                raise ValueError(f"expected a URL like http://10.0.0.1:2379 (port 1..65535), "
                                 f"got {show(url)}")
        return endpoints

    @model_validator(mode="after")
    def _consistent(self) -> "EtcdConfig":
        if self.tls is not None:
            plain = [url for url in self.endpoints if urlsplit(url).scheme != "https"]
            if plain:
                raise ValueError(f"tls is for https:// endpoints, got {plain[0]!r}")
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs username")
        return self


def read_password(config: EtcdConfig, environ: Mapping[str, str]) -> tuple[str, str] | None:
    """(password, where it came from) for ``config.username``, or None
    without a username; ConfigError naming the field (never the value)."""
    if config.username is None:
        return None
    if config.password_file is not None:
        return read_token(config.password_file, "password_file"), config.password_file
    password = environ.get(PASSWORD_ENV, "").strip()
    if not password:
        raise ConfigError("password_file", f"username {config.username!r} needs a password: "
                                           f"give password_file or set ${PASSWORD_ENV}")
    return password, f"${PASSWORD_ENV}"
