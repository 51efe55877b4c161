"""The ZooKeeper backend's config section, and the parsing it needs."""
from __future__ import annotations

import os
import re
from typing import Any, Literal

from kazoo.security import ACL, Id, Permissions
from registrar.plugin import (Annotated, BackendConfig, ConfigError, Duration, Meta, Model, Rule,
                              StrList, TLSConfig, at_least, doc, field, more_than, non_empty,
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
    file: Annotated[str | None, doc("A file holding user:password (a mounted Secret).")] = None
    env: Annotated[str | None, doc("An environment variable holding user:password.")] = None

    def check(self) -> None:
        if (self.file is None) == (self.env is None):
            raise ValueError("give exactly one of file or env")


class ZooKeeperTLS(TLSConfig):
    """TLS to the servers (their secureClientPort), as kazoo supports it."""
    check_hostname: Annotated[bool, doc("Check the certificate names the server.")] = False

    def check(self) -> None:
        super().check()
        if self.check_hostname and not self.verify:
            raise ValueError("check_hostname needs verify")


def _hosts(hosts: list[str]) -> list[str]:
    split_hosts(hosts)
    return hosts


def _base_path(path: str) -> str:
    path = path.rstrip("/") or "/"
    if any(part in ("", ".", "..") for part in path.split("/")[1:]) and path != "/":
        raise ValueError(f"not a valid znode path: {path!r}")
    return path


def _uri_spec(template: str) -> str:
    uri_spec(template)
    return template


class ZooKeeperConfig(BackendConfig):
    type: Literal["zookeeper"]
    hosts: Annotated[StrList, Rule(non_empty), Rule(_hosts), doc(
        "Servers as host:port; the last may end with a chroot (/path, created if missing). "
        "One observer per server.")] = field(default_factory=lambda: ["127.0.0.1:2181"])
    base_path: Annotated[str, Meta(pattern=r"^/"), Rule(_base_path), doc(
        "Parent of the service nodes: the node is <base_path>/<service>/<id> "
        "(Curator's ServiceDiscoveryBuilder.basePath).")] = "/services"
    session_timeout: Annotated[Duration, at_least(1.0), doc(
        "Session timeout asked of the servers (they clamp it to their min/maxSessionTimeout); "
        "a crashed pod's node goes this long after its last ping.")] = 10.0
    timeout: Annotated[Duration, more_than(0), doc(
        "Longest wait for one request, or for a session to be (re)established.")] = 2.0
    auth: Annotated[ZooKeeperAuth | None, doc("Digest authentication.")] = None
    acl: Annotated[StrList | None, doc(
        'ACL of the node and of the parents this backend creates, as "scheme:id:perms" '
        '(perms from rwcda, or all). Default with auth: ["auth::all", "world:anyone:r"] '
        "(no other client can change or delete our node); without: world:anyone:all.")] = None
    tls: Annotated[ZooKeeperTLS | None, doc("Connect with TLS.")] = None
    ssl_port: Annotated[Annotated[int, Meta(ge=1, le=65535)] | None, doc(
        "Curator sslPort (default null).")] = None
    uri_spec: Annotated[str | None, Rule(_uri_spec), doc(
        'Curator uriSpec template, e.g. "{scheme}://{address}:{port}" (default null).')] = None
    payload: Annotated[Literal["map", "none"], doc(
        'What the ServiceInstance\'s "payload" holds. map: {"tags": [...], "meta": {...}}, '
        'plus "status": "draining" while draining (Curator readers built with Object.class or '
        'Map.class). none: null, for readers built with Void.class, which drop any instance '
        "whose payload is not null; the drain then leaves the node as it is.")] = "map"
    payload_class: Annotated[str | None, doc(
        'The payload\'s "@class", for Curator readers with a typed payload (Spring Cloud '
        "Zookeeper: org.springframework.cloud.zookeeper.discovery.ZookeeperInstance). "
        "Default: none, read as a map. Only with payload: map.")] = None

    def check(self) -> None:
        if self.acl is not None:
            if not self.acl:
                raise ValueError("acl: an empty ACL would lock everyone out; "
                                 "leave acl out for the default")
            for entry in self.acl:
                try:
                    scheme = parse_acl(entry).id.scheme
                except ValueError as exc:
                    raise ValueError(f"acl: {exc}") from None
                if scheme == "auth" and self.auth is None:
                    raise ValueError(f"acl: {entry!r} grants the authenticated creator: "
                                     "configure auth")
        if self.payload_class is not None and self.payload == "none":
            raise ValueError("payload_class: a payload class needs a payload: leave it out "
                             "with payload: none")


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
