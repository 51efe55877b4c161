"""The etcd backend's config section, and where its password comes from."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Literal
from urllib.parse import urlsplit

from registrar.plugin import (Annotated, BackendConfig, ConfigError, Duration, Meta, Rule,
                              SecretFile, StrList, TLSConfig, at_least, doc, field, more_than,
                              non_empty, read_token, refuse_credentials, show)

#: The environment variable read for the password when no password_file is given.
PASSWORD_ENV = "ETCD_PASSWORD"


class EtcdTLS(TLSConfig):
    """TLS to the members and the observers (https endpoints). With
    --client-cert-auth and auth enabled, etcd's JSON gateway refuses a client
    certificate that has a Common Name: use one without CN, plus username."""


def _urls(endpoints: list[str]) -> list[str]:
    for url in endpoints:
        refuse_credentials(url, "give username and password_file (or $ETCD_PASSWORD)")
        try:
            parts = urlsplit(url)
            ok = parts.scheme in ("http", "https") and parts.hostname and parts.port
        except ValueError:  # "http://[::1", a port past 65535
            ok = False
        if not ok:
            raise ValueError(f"expected a URL like http://10.0.0.1:2379 (port 1..65535), "
                             f"got {show(url)}")
    return endpoints


class EtcdConfig(BackendConfig):
    type: Literal["etcd"]
    endpoints: Annotated[StrList, Rule(non_empty), Rule(_urls), doc(
        "Client URLs of the cluster members; also the observers.")] = \
        field(default_factory=lambda: ["http://127.0.0.1:2379"])
    prefix: Annotated[str, doc(
        "Key prefix; the key is <prefix>/<service>/<addr>:<port>, the prefix as written. "
        "gRPC-go dials etcd:/// + prefix + / + service: etcd:///services/web by default, "
        "etcd:////services/web for the prefix /services.")] = "services"
    metadata: Annotated[Literal["string", "object", "none"], doc(
        "The value's Metadata: string = {\"id\",\"tags\",\"meta\"} as JSON text (every "
        "gRPC-go balancer takes it); none = no Metadata; object = the same as a JSON object, "
        "marked draining before removal (gRPC-go's round_robin panics on it: pick_first or "
        "non-gRPC readers only).")] = "string"
    ttl: Annotated[Duration, at_least(2.0), doc("Lease TTL (whole seconds).")] = 10.0
    timeout: Annotated[Duration, more_than(0), doc(
        "Timeout of one request to one member.")] = 2.0
    tls: Annotated[EtcdTLS | None, doc(
        "CA, client certificate and key for https endpoints (default for https: the system's "
        "CA bundle, no client certificate).")] = None
    username: Annotated[Annotated[str, Meta(min_length=1)] | None, doc(
        "etcd user when auth is enabled: the backend authenticates with it and the password "
        "and sends the token (renewed when it expires).")] = None
    password_file: Annotated[SecretFile | None, doc(
        f"File holding the password of username (a mounted Secret); default: ${PASSWORD_ENV}. "
        "Never logged.")] = None

    def check(self) -> None:
        if self.tls is not None:
            plain = [url for url in self.endpoints if urlsplit(url).scheme != "https"]
            if plain:
                raise ValueError(f"tls is for https:// endpoints, got {plain[0]!r}")
        if self.password_file is not None and self.username is None:
            raise ValueError("password_file needs username")


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
