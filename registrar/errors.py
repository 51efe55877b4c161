"""The one error tree of registrar. Backends map their client's exceptions
to these at their boundary; no bare client exception reaches the core."""
from __future__ import annotations


class RegistrarError(Exception):
    """Base of every error registrar raises on purpose."""


class ConfigError(RegistrarError):
    """The configuration is invalid. ``path`` names the offending field,
    e.g. ``backends[0].ttl``; ``str()`` is the one line the CLI prints."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class BackendNotFound(ConfigError):
    """A backend ``type`` that no installed distribution provides."""


class RegistryUnavailable(RegistrarError):
    """The registry could not be reached or did not answer in time.
    Transient: callers retry."""


class RegistrationRejected(RegistrarError):
    """The registry answered and refused (bad credentials, permission denied,
    invalid entry). Retrying the same request will not help."""


class MemberDown(RegistryUnavailable):
    """The registry member refused the connection: nothing listens there.
    Such a member serves no consumer either, so once a removal is committed
    the stop sequence reports it down instead of waiting on it. A member
    that does not answer in time is a plain RegistryUnavailable: it may
    still be serving consumers."""
