"""The backend contract: what a registry plugin provides, and how the core
finds plugins (the ``registrar.backends`` entry-point group)."""
from __future__ import annotations

import abc
import importlib.metadata
import logging
from typing import Any, ClassVar

from .config import BackendConfig
from .errors import BackendNotFound
from .instance import Instance

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "registrar.backends"


class Observer(abc.ABC):
    """One view of the registry the way consumers see it (one etcd member,
    one ZooKeeper server, one Consul server)."""

    #: Human-readable, e.g. ``etcd http://10.0.0.1:2379``.
    name: str

    @abc.abstractmethod
    def sees(self, instance: Instance) -> bool:
        """Whether this view still lists the instance. After ``deregister()``
        it must answer False only once this view has applied the removal
        (e.g. its revision has reached the removal's). Raises
        ``RegistryUnavailable`` when the view cannot be asked."""

    def close(self) -> None:
        """Release what the observer holds (connections)."""


class Backend(abc.ABC):
    """One registry. Constructed with the instance and the backend's own
    validated config section; ``Config`` is that section's model.

    The core serialises calls into one backend (never two at once), runs them
    in worker threads and bounds them with its deadline. Every method maps
    client exceptions to ``RegistryUnavailable`` (transient) or
    ``RegistrationRejected`` (permanent) and never returns False for failure.
    """

    #: The pydantic model of this backend's config section.
    Config: ClassVar[type[BackendConfig]]
    #: The config field behind ``ttl`` (for the heartbeat-interval check).
    ttl_field: ClassVar[str] = "ttl"

    def __init__(self, instance: Instance, config: BackendConfig):
        self.instance = instance
        self.config = config

    @property
    def name(self) -> str:
        """The name used in logs and reports: the section's ``name``, else its type."""
        return self.config.name or self.config.type

    @property
    @abc.abstractmethod
    def ttl(self) -> float:
        """Seconds a registration lives without a heartbeat; the default
        heartbeat interval is a third of it."""

    @abc.abstractmethod
    def register(self) -> None:
        """Create the entry with its liveness mechanism. Idempotent."""

    @abc.abstractmethod
    def heartbeat(self) -> bool:
        """Keep the entry alive and repair it: re-create it after a lost
        session, an expired lease, or a registry that forgot it. Returns True
        when it had to repair."""

    @abc.abstractmethod
    def drain(self, reason: str) -> None:
        """Mark the entry not-to-be-used before removal, where the registry
        has a way to say so. ``reason`` names what began the stop (e.g.
        "SIGTERM", "preStop (/prestop)"), for operators to read."""

    @abc.abstractmethod
    def deregister(self) -> Any:
        """Remove the entry. Idempotent: an entry already gone is success.
        Returns where the removal happened (revision, zxid, index) or None."""

    @abc.abstractmethod
    def observers(self) -> list[Observer]:
        """The views whose confirmation the stop sequence waits for."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and sessions. Idempotent."""


_KNOWN_DISTRIBUTIONS = {"etcd": "registrar-etcd", "zookeeper": "registrar-zookeeper",
                        "consul": "registrar-consul"}


def available_backends() -> dict[str, importlib.metadata.EntryPoint]:
    """Installed backend plugins by type name."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def backend_class(type_name: str, path: str = "type") -> type[Backend]:
    """The Backend class for a ``type``; a BackendNotFound naming the field,
    the installed types and the distribution to install otherwise."""
    eps = available_backends()
    ep = eps.get(type_name)
    if ep is None:
        known = ", ".join(sorted(eps)) or "none"
        dist = _KNOWN_DISTRIBUTIONS.get(type_name, f"registrar-{type_name}")
        raise BackendNotFound(
            path, f"unknown backend type {type_name!r} (installed: {known}); "
                  f"install the distribution {dist!r} to add it")
    try:
        cls = ep.load()
    except ImportError as exc:
        raise BackendNotFound(
            path, f"backend {type_name!r} is installed but cannot be imported: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendNotFound(path, f"entry point {ep.value!r} is not a registrar Backend")
    return cls
