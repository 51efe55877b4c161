"""What gets registered: one service instance, the pod itself."""
from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


#: What a name may not hold: it becomes a registry key's element (etcd,
#: ZooKeeper) and a URL's path segment (Consul's /v1/agent/service/
#: deregister/<id>), where any of these would reach another key or endpoint.
_UNSAFE = frozenset('/\\?#%') | frozenset(" \t")


def segment_error(text: str) -> str | None:
    """Why ``text`` cannot be a key element or a URL path segment, or None."""
    if text in (".", ".."):
        return f"expected a name, got {repr(text)}: it would name the key or path above it"
    if not text.strip():
        return f"expected a name, got {text!r}"
    bad = sorted({c for c in text if c in _UNSAFE or c.isspace() or not c.isprintable()})
    if bad:
        return (f"expected a name without {' '.join(repr(c) for c in bad)} (it goes into "
                f"registry keys and URLs), got {repr(text)}")
    return None


@dataclass(frozen=True)
class Instance:
    """One instance of a service, as every backend translates it.

    ``id`` defaults to the pod name (``POD_NAME`` from the Downward API, else
    the host name) and ``address`` to the pod IP (``POD_IP``, else the first
    non-loopback IPv4 address): see :meth:`create`.
    """

    service: str
    id: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def __post_init__(self) -> None:
        for what, text in (("service", self.service), ("id", self.id)):
            if error := segment_error(text):
                raise ValueError(f"instance {what}: {error}")
        # Frozen means frozen all the way down: callers may pass a list and a dict.
        object.__setattr__(self, "tags", tuple(self.tags))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    @classmethod
    def create(cls, service: str, port: int, id: str | None = None,
               address: str | None = None, tags=(), meta=None,
               environ: Mapping[str, str] | None = None) -> Instance:
        """An Instance with id and address taken from the Downward API
        environment when not given."""
        env = os.environ if environ is None else environ
        return cls(service=service,
                   id=id or env.get("POD_NAME") or socket.gethostname(),
                   address=address or env.get("POD_IP") or first_non_loopback_address(),
                   port=port, tags=tuple(tags), meta=dict(meta or {}))

    @property
    def hostport(self) -> str:
        """``address:port``, with brackets around an IPv6 address."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    def to_dict(self) -> dict:
        return {"service": self.service, "id": self.id, "address": self.address,
                "port": self.port, "tags": list(self.tags), "meta": dict(self.meta)}


def first_non_loopback_address() -> str:
    """The first IPv4 address of a non-loopback interface, read from the
    kernel without sending anything; 127.0.0.1 when there is none."""
    for _index, name in socket.if_nameindex():
        if name == "lo":
            continue
        address = _ipv4_of(name)
        if address and not address.startswith("127."):
            return address
    return "127.0.0.1"


def _ipv4_of(ifname: str) -> str | None:
    SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            req = struct.pack("256s", ifname.encode()[:15])
            res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, req)
        except OSError:
            return None
    return socket.inet_ntoa(res[20:24])
