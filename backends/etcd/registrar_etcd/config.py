"""The etcd backend's config section."""
from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from registrar.plugin import BackendConfig, Duration, StrList


class EtcdConfig(BackendConfig):
    type: Literal["etcd"]
    endpoints: StrList = Field(default_factory=lambda: ["http://127.0.0.1:2379"], min_length=1,
                               description="Client URLs of the cluster members; also the observers.")
    prefix: str = Field("/services", description="Key prefix; the key is <prefix>/<service>/<addr>:<port>.")
    ttl: Duration = Field(10.0, ge=2.0, description="Lease TTL (whole seconds).")
    timeout: Duration = Field(2.0, gt=0, description="Timeout of one request to one member.")

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, endpoints: list[str]) -> list[str]:
        for url in endpoints:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
                raise ValueError(f"expected a URL like http://10.0.0.1:2379, got {url!r}")
        return endpoints
