"""The ZooKeeper backend's config section, and the parsing it needs."""
from __future__ import annotations

import os
import re
from typing import Any, Literal

from kazoo.security import ACL, Id, Permissions
from pydantic import Field, ValidationInfo, field_validator, model_validator

from registrar.plugin import (BackendConfig, ConfigError, Duration, Model, StrList, TLSConfig,
                              read_token)

_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(\d{1,5}))?$")
_SCHEMES = ("world", "auth", "digest", "ip", "x509", "sasl")
_PERMS = {"r": Permissions.READ, "w": Permissions.WRITE, "c": Permissions.CREATE,
          "d": Permissions.DELETE, "a": Permissions.ADMIN}


def split_hosts(hosts: list[str]) -> tuple[list[str], str]:
    """``["a:2181", "b:2181/chroot"]`` -> ``(["a:2181", "b:2181"], "/chroot")``;
    a missing port is 2181. Raises ValueError on a malformed entry."""
    servers, chroot = [], ""
    for i, entry in enumerate(hosts):
        host, slash, root = entry.strip().partition("/")
        if slash:
            if i != len(hosts) - 1:
                raise ValueError(f"only the last host may end with a chroot, got {entry!r}")
            chroot = "/" + root.strip("/") if root.strip("/") else ""
        m = _HOST.match(host)
        if not m or not 0 < int(m.group(2) or 2181) < 65536:
            raise ValueError(f"expected host:port (a chroot may follow the last one), "
                             f"got {entry!r}")
        servers.append(host if m.group(2) else f"{host}:2181")
    return servers, chroot


def parse_acl(entry: str) -> ACL:
    """``"scheme:id:perms"`` (perms from ``rwcda``, or ``all``) -> a kazoo ACL."""
    scheme, _, rest = entry.partition(":")
    ident, sep, perms = rest.rpartition(":")
    if scheme not in _SCHEMES or not sep or not perms or not (
            perms == "all" or set(perms) <= set(_PERMS)):
        raise ValueError(f'expected "scheme:id:perms" like "world:anyone:r" or "auth::all" '
                         f'(schemes {", ".join(_SCHEMES)}; perms from rwcda or all), got {entry!r}')
    mask = Permissions.ALL if perms == "all" else sum(_PERMS[p] for p in set(perms))
    return ACL(mask, Id(scheme, ident))


def uri_spec(template: str) -> dict[str, Any]:
    """A Curator ``UriSpec`` as Jackson writes it: ``"{scheme}://{address}:{port}"``
    -> ``{"parts": [{"value": "scheme", "variable": true}, {"value": "://", ...}]}``."""
    parts = []
    for token in re.split(r"(\{[^{}]*\})", template):
        if not token:
            continue
        variable = token.startswith("{") and token.endswith("}")
        if not variable and ("{" in token or "}" in token):
            raise ValueError(f"unbalanced braces in {template!r}")
        if variable and len(token) == 2:
            continue  # Curator skips an empty {}
        parts.append({"value": token[1:-1] if variable else token, "variable": variable})
    return {"parts": parts}


class ZooKeeperAuth(Model):
    """Digest credentials user:password, read from a file or an environment
    variable when the backend is built; never written in the configuration
    itself, never logged."""
    file: str | None = Field(None, description="A file holding user:password (a mounted Secret).")
    env: str | None = Field(None, description="An environment variable holding user:password.")

    @model_validator(mode="after")
    def _one_source(self) -> "ZooKeeperAuth":
        if (self.file is None) == (self.env is None):
            raise ValueError("give exactly one of file or env")
        return self


class ZooKeeperTLS(TLSConfig):
    """TLS to the servers (their secureClientPort), as kazoo supports it."""
    check_hostname: bool = Field(False, description="Check the certificate names the server.")

    @model_validator(mode="after")
    def _hostname_needs_verify(self) -> "ZooKeeperTLS":
        if self.check_hostname and not self.verify:
            raise ValueError("check_hostname needs verify")
        return self


class ZooKeeperConfig(BackendConfig):
    type: Literal["zookeeper"]
    hosts: StrList = Field(default_factory=lambda: ["127.0.0.1:2181"], min_length=1,
                           description="Servers as host:port; the last may end with a chroot "
                                       "(/path, created if missing). One observer per server.")
    base_path: str = Field("/services", pattern=r"^/", description=(
        "Parent of the service nodes: the node is <base_path>/<service>/<id> "
        "(Curator's ServiceDiscoveryBuilder.basePath)."))
    session_timeout: Duration = Field(10.0, ge=1.0, description=(
        "Session timeout asked of the servers (they clamp it to their min/maxSessionTimeout); "
        "a crashed pod's node goes this long after its last ping."))
    timeout: Duration = Field(2.0, gt=0, description="Longest wait for one request, or for a "
                                                     "session to be (re)established.")
    auth: ZooKeeperAuth | None = Field(None, description="Digest authentication.")
    acl: StrList | None = Field(None, description=(
        'ACL of the node and of the parents this backend creates, as "scheme:id:perms" '
        '(perms from rwcda, or all). Default with auth: ["auth::all", "world:anyone:r"] '
        "(no other client can change or delete our node); without: world:anyone:all."))
    tls: ZooKeeperTLS | None = Field(None, description="Connect with TLS.")
    ssl_port: int | None = Field(None, ge=1, le=65535,
                                 description="Curator sslPort (default null).")
    uri_spec: str | None = Field(None, description='Curator uriSpec template, e.g. '
                                                   '"{scheme}://{address}:{port}" (default null).')
    payload: Literal["map", "none"] = Field("map", description=(
        'What the ServiceInstance\'s "payload" holds. map: {"tags": [...], "meta": {...}}, '
        'plus "status": "draining" while draining (Curator readers built with Object.class or '
        'Map.class). none: null, for readers built with Void.class, which drop any instance '
        "whose payload is not null; the drain then leaves the node as it is."))
    payload_class: str | None = Field(None, description=(
        'The payload\'s "@class", for Curator readers with a typed payload (Spring Cloud '
        "Zookeeper: org.springframework.cloud.zookeeper.discovery.ZookeeperInstance). "
        "Default: none, read as a map. Only with payload: map."))

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        split_hosts(hosts)
        return hosts

    @field_validator("base_path")
    @classmethod
    def _base_path(cls, path: str) -> str:
        path = path.rstrip("/") or "/"
        if any(part in ("", ".", "..") for part in path.split("/")[1:]) and path != "/":
            raise ValueError(f"not a valid znode path: {path!r}")
        return path

    @field_validator("acl")
    @classmethod
    def _acl(cls, acl: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if acl is not None:
            if not acl:
                raise ValueError("an empty ACL would lock everyone out; "
                                 "leave acl out for the default")
            for entry in acl:
                if parse_acl(entry).id.scheme == "auth" and info.data.get("auth") is None:
                    raise ValueError(f"{entry!r} grants the authenticated creator: configure auth")
        return acl

    @field_validator("payload_class")
    @classmethod
    def _payload_class(cls, name: str | None, info: ValidationInfo) -> str | None:
        if name is not None and info.data.get("payload") == "none":
            raise ValueError("a payload class needs a payload: leave it out with payload: none")
        return name

    @field_validator("uri_spec")
    @classmethod
    def _uri_spec(cls, template: str | None) -> str | None:
        if template is not None:
            uri_spec(template)
        return template


def read_credentials(auth: ZooKeeperAuth | None) -> str | None:
    """user:password from the configured file or variable (never shown)."""
    if auth is None:
        return None
    if auth.file is not None:
        field, text = "auth.file", read_token(auth.file, "auth.file")
    else:
        field, text = "auth.env", os.environ.get(auth.env or "", "").strip()
        if not text:
            raise ConfigError(field, f"environment variable {auth.env} is not set")
    user, sep, password = text.partition(":")
    if not (user and sep and password):
        raise ConfigError(field, "expected user:password (the value is not shown)")
    return text
