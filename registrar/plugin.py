"""Everything a backend may import: the contract, its config base classes
and field types, the error types, and the helpers backends share.

This module's docstrings are the backend contract, written once; the
docs (CONTRIBUTING.md, "Writing a backend") point here.

A backend is a distribution with an entry point in the group
``registrar.backends`` (``<type> = "package:BackendClass"``), a subclass of
:class:`Backend` with a ``config_model`` (a :class:`BackendConfig` with
``type: Literal["<type>"]``). Of registrar it imports this module alone. The core
(docs/design.md) serialises every call into one backend (never two at once),
runs them in worker threads and bounds them with its deadline; the backend
maps its client's exceptions to ``RegistryUnavailable`` (transient: the core
retries) or ``RegistrationRejected`` (permanent), and never returns False for
failure. ``client_errors(what, classify, secrets)`` does the mapping around a
block of client calls: ``classify`` picks the kind and a short reason, every
secret is scrubbed from it, and a refused connection becomes ``MemberDown``.

To write one: subclass :class:`Backend` and :class:`BackendConfig`,
implement the abstract methods below (``register``, ``refresh``, ``drain``,
``deregister``, ``make_observers``, ``close``; and an :class:`Observer` with
``sees``, and ``wait_gone`` where the registry has a way to wait for a
change), declare the entry point, and pass the conformance suite of the
testing kit (``registrar_testing.conformance.BackendConformance``, against a
real three-member cluster: testing/README.md). The ``doc()`` strings of the
config model are the user's reference: docs/configuration.md is generated
from them (``python -m registrar.docgen``).
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar

from ._shared import TLSConfig, client_errors, scrub, short_reason, verify_failed
from .clock import Deadline
from .errors import (ConfigError, MemberDown, RegistrarError, RegistrationRejected,
                     RegistryUnavailable)
from .fields import (Annotated, Duration, Meta, Model, Rule, Secret, SecretFile, SecretText,
                     StrList, at_least, doc, field, format_duration, more_than, non_empty,
                     read_token, refuse_credentials, show)
from .instance import Instance

__all__ = ["Backend", "Observer", "BackendConfig", "TLSConfig", "Instance", "Model", "Duration",
           "StrList", "SecretFile", "SecretText", "Secret", "Annotated", "Meta", "Rule", "doc",
           "field", "at_least", "more_than", "non_empty", "read_token", "format_duration",
           "RegistrarError", "ConfigError", "RegistryUnavailable", "RegistrationRejected",
           "MemberDown", "client_errors", "short_reason", "verify_failed", "scrub", "show",
           "refuse_credentials", "Deadline", "POLL_FIRST", "POLL_MAX", "watch_windows"]

#: The default ``Observer.wait_gone()`` asks again after POLL_FIRST seconds,
#: doubling up to POLL_MAX: a removal that reaches the member within a few
#: milliseconds (a healthy cluster) is seen within a few milliseconds, and a
#: member that lags costs ~10 requests a second instead of 500.
POLL_FIRST = 0.002
POLL_MAX = 0.1


def watch_windows(removal_deleted: bool) -> tuple[float, float]:
    """(first, cap) seconds of the windows, doubling, after which a
    watch-based ``wait_gone()`` asks a member that lags once more. When the
    removal deleted something there, its event comes the moment the member
    applies it: the watch is simply left open (re-asked only in case the
    entry went some other way meanwhile). When it deleted nothing, no event
    will come: it reads the member's position again soon."""
    return (0.5, 8.0) if removal_deleted else (0.02, 1.0)


class BackendConfig(Model):
    """Base of a backend's config section: subclass it with
    ``type: Literal["<type>"]`` and the backend's own keys, msgspec fields
    written like ``ttl: Annotated[Duration, at_least(2.0), doc("Lease
    TTL.")] = 10.0`` (``TLSConfig``, ``Duration``, ``StrList``,
    ``SecretFile`` and ``read_token`` are here for them). A ``Rule(func)``
    in the ``Annotated`` checks one value; ``check()`` checks what spans
    fields, raising ``ValueError("<field>: <message>")``; ``parse(mapping)``
    validates a section as the core does, ConfigError naming the field (see
    registrar.fields)."""
    type: str
    name: Annotated[str | None, doc("Name in logs and reports (default: the type).")] = None


class Observer(abc.ABC):
    """One view of the registry the way consumers see it (one etcd member,
    one ZooKeeper server, one Consul server)."""

    #: Human-readable, e.g. ``etcd http://10.0.0.1:2379``.
    name: str

    @abc.abstractmethod
    def sees(self, instance: Instance, since: Any = None) -> bool:
        """Whether this view lists the instance.

        ``since`` is None before any removal (and when the removal's
        position is unknown): answer from what the view lists. Otherwise it
        is what ``deregister()`` returned: answer False once this view has
        applied the removal (its revision, zxid or index has reached
        ``since``), whatever it lists by then -- an entry there now is a
        newer registration's. Raise only ``RegistryUnavailable``: the core
        asks again until its deadline; raise ``MemberDown`` (a subclass)
        when the member refused the connection (nothing listens there):
        after a removal the core reports that observer down rather than
        wait on it (``client_errors`` does this for a refused connection)."""

    def wait_gone(self, instance: Instance, since: Any, deadline: Deadline) -> bool:
        """Block until this view no longer lists the instance (in the sense
        of ``sees(instance, since)``): True then, False once ``deadline``
        has passed first. What the stop sequence calls after a removal.

        Raise like ``sees()``: ``RegistryUnavailable`` for a failed request
        (the core calls again, backing off), ``MemberDown`` when the member
        refuses the connection. This default polls ``sees()`` with backoff
        (POLL_FIRST doubling to POLL_MAX), so a member that lags costs a
        few requests per second, not one every 2 ms; a backend overrides it
        with its registry's own way to wait for a change (a watch, a
        blocking query), which costs a bounded number of requests however
        long the member lags."""
        interval = POLL_FIRST
        while self.sees(instance, since=since):
            if deadline.expired:
                return False
            deadline.clock.sleep(deadline.cap(interval))
            interval = min(interval * 2, POLL_MAX)
        return True

    def close(self) -> None:  # noqa: B027 - optional: an observer that holds nothing has no close
        """Release what the observer holds (connections). Idempotent. The
        default does nothing."""


class Backend(abc.ABC):
    """One registry, for one instance. Rules the core relies on:

    - ``register()`` and ``deregister()`` are idempotent; ``deregister()``
      and ``drain()`` also work on a backend that never registered (the
      ``deregister`` command removes what another process registered).
    - ``registered`` is True from a successful ``register()`` until
      ``deregister()``; ``heartbeat()`` registers while it is False, and a
      backend that learns its entry is gone for good may clear it.
    - ``observers()`` returns the same objects on every call (their
      connections are warmed once and reused by the stop sequence).
    - After ``close()`` nothing may open a connection again.
    """

    #: The model of this backend's config section (a BackendConfig).
    config_model: ClassVar[type[BackendConfig]]
    #: The config field that holds the registration's time to live.
    ttl_field: ClassVar[str] = "ttl"
    #: Whether the registry ends the entry by itself within its TTL once
    #: heartbeats stop, even when the member the backend talks to is stuck:
    #: then a removal that keeps failing is retried for a TTL at most (the
    #: entry is gone by then anyway). False where the TTL is kept by
    #: something that can be stuck itself (Consul's client agent): the
    #: removal is retried for the whole stop budget.
    expires_unaided: ClassVar[bool] = True

    def __init__(self, instance: Instance, config: BackendConfig):
        self.instance = instance
        self.config = config
        self.registered = False
        self._observers: list[Observer] | None = None

    @property
    def name(self) -> str:
        """The name used in logs and reports: the section's ``name``, else its type."""
        return self.config.name or self.config.type

    @property
    def ttl(self) -> float:
        """Seconds a registration lives without a heartbeat; the default
        heartbeat interval is a third of it."""
        return float(getattr(self.config, self.ttl_field))

    @abc.abstractmethod
    def register(self) -> None:
        """Create the entry with its liveness mechanism (lease, TTL check,
        ephemeral node) and set ``registered``. Idempotent."""

    @abc.abstractmethod
    def refresh(self) -> bool:
        """Keep a registered entry alive and repair it: re-create it after a
        lost session, an expired lease, or a registry that forgot it.
        Returns True when it had to repair."""

    def heartbeat(self) -> bool:
        """What the core calls on every tick: ``refresh()``, or
        ``register()`` while not registered (which counts as a repair)."""
        if not self.registered:
            self.register()
            return True
        return self.refresh()

    @abc.abstractmethod
    def drain(self, reason: str) -> None:
        """Mark the entry not-to-be-used before removal, where the registry
        has a way to say so; nothing where it has none. ``reason`` names
        what began the stop (e.g. "SIGTERM", "preStop (/prestop)")."""

    @abc.abstractmethod
    def deregister(self) -> Any:
        """Remove the entry and clear ``registered``. Idempotent: an entry
        already gone is success. Returns the removal's position (revision,
        zxid, index) for the observers' ``sees(since=...)``, or None."""

    @abc.abstractmethod
    def make_observers(self) -> list[Observer]:
        """The views whose confirmation the stop sequence waits for; called
        once, by ``observers()``."""

    def observers(self) -> list[Observer]:
        """The observers, made once and then the same objects every call."""
        if self._observers is None:
            self._observers = list(self.make_observers())
        return self._observers

    def close_observers(self) -> None:
        """Close every observer made so far (for ``close()``)."""
        for observer in self._observers or ():
            observer.close()

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections and sessions. Idempotent and final."""
