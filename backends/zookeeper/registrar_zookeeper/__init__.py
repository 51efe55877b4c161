"""ZooKeeper backend: an ephemeral znode in Apache Curator's x-discovery format.

Znode ``<base_path>/<service>/<id>`` holding a Curator ``ServiceInstance``
JSON document, so Java services using Curator's ServiceDiscovery or
ServiceCache (and Spring Cloud Zookeeper) list the pod with no code of
theirs. The node is ephemeral: it lives as long as our session, which
kazoo's own pings keep alive; the heartbeat checks that the node is still
there and still ours, and writes it again if not.
"""
from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kazoo.client import KazooClient
from kazoo.exceptions import (AuthFailedError, BadArgumentsError, BadVersionError,
                              ConnectionClosedError, ConnectionLoss, InvalidACLError,
                              KazooException, MarshallingError, NodeExistsError, NoAuthError,
                              NoChildrenForEphemeralsError, NoNodeError, QuotaExceededError,
                              RolledBackError, SessionExpiredError, UnimplementedError)
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import KazooState, KeeperState

from registrar.plugin import (Backend, ConfigError, Deadline, Instance, MemberDown, Observer,
                              RegistrarError, RegistrationRejected, RegistryUnavailable,
                              client_errors, watch_windows)

from ._kazoo import (new_client, stop_clients, stop_in_background, tls_context, tls_failure,
                     wait)
from .config import (ZooKeeperAuth, ZooKeeperConfig, ZooKeeperTLS, parse_acl, read_credentials,
                     split_hosts, uri_spec)

__all__ = ["ZooKeeperBackend", "ZooKeeperObserver", "ZooKeeperConfig", "ZooKeeperAuth",
           "ZooKeeperTLS", "Superseded", "parse_acl", "split_hosts", "uri_spec"]

log = logging.getLogger(__name__)

#: An observer's session (one per server) closes after this many seconds
#: unused: a pod holds its one registration session, and 1 + N only while
#: it stops (drain() opens them, in parallel with the drain and the
#: delete), or for this long after a `status` or the registration's
#: warm-up. They are needed: a session's reads are answered by its own
#: server, the only way to read each server's view. Opening them at the
#: stop measured +6 ms of propagation p50 (18 ms against 12.5 ms warm,
#: bench/propagation.py, 100 cycles, 2 cores under a load average of 50)
#: and 2 more requests per server (connect, close), against N sessions per
#: pod held for its whole life, each pinging every few seconds.
OBSERVER_IDLE = 5.0

#: Answers that retrying will not change.
_REJECTED = (NoAuthError, AuthFailedError, InvalidACLError, BadArgumentsError, MarshallingError,
             UnimplementedError, NoChildrenForEphemeralsError, QuotaExceededError)


class Superseded(RegistrationRejected):
    """A newer registration of the same instance id (a new incarnation of the
    pod) owns the node: we leave it alone."""


T = TypeVar("T")


class ZooKeeperBackend(Backend):
    """Registration = an ephemeral znode holding a Curator ServiceInstance;
    heartbeat = a check that it exists and belongs to our session, written
    again if not (after a session expiry, say). A node a previous incarnation
    left behind with a session still alive is replaced at registration."""

    config_model = ZooKeeperConfig
    ttl_field = "session_timeout"

    def __init__(self, instance: Instance, config: ZooKeeperConfig):
        super().__init__(instance, config)
        for field, value in (("service.name", instance.service), ("service.id", instance.id)):
            if "/" in value or value in (".", ".."):
                raise ConfigError(field, f"{value!r} cannot be a znode name (no '/', '.' or '..')")
        self.servers, self.chroot = split_hosts(config.hosts)
        self.path = f"{config.base_path.rstrip('/')}/{instance.service}/{instance.id}"
        self._credentials = read_credentials(config.auth)
        self._acl = [parse_acl(e) for e in config.acl or (
            ["auth::all", "world:anyone:r"] if config.auth else ["world:anyone:all"])]
        self._tls, self._tls_context = None, None
        if config.tls is not None:
            tls = config.tls
            self._tls = {"use_ssl": True, "ca": tls.ca_file, "certfile": tls.cert_file,
                         "keyfile": tls.key_file or tls.cert_file, "verify_certs": tls.verify,
                         "check_hostname": tls.check_hostname}
            try:
                self._tls_context = tls_context(tls.ca_file, tls.cert_file, tls.key_file,
                                                tls.verify, tls.check_hostname)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError("tls", f"cannot use these files: {exc}") from None
        self._lock = threading.Lock()  # guards _client and _closed against close()
        self._client: KazooClient | None = None
        self._live: threading.Event | None = None
        self._closed = False
        # Creation zxid of the node we last wrote or adopted, kept after a
        # deregistration: a node created later is a newer registration's.
        self._czxid: int | None = None
        # The session our node belongs to (it goes when that session does).
        self._owner: int | None = None
        self._registered_at: int | None = None
        self._removed_zxid: int | None = None
        #: Whether the removal deleted a node (a NodeDeleted watch marks it).
        self.removal_deleted = False
        self._closer: threading.Thread | None = None

    @property
    def registered(self) -> bool:
        """Registered, and the node's session is still the client's. kazoo
        forgets the session id the moment the server says it expired
        (before any listener hears of it), and holds it while it merely
        reconnects: so an expired session reads as not registered at once,
        and a repair in the new session as registered, with no race
        against the LOST notice."""
        if not self._registered:
            return False
        owner, client = self._owner, self._client
        if owner is None or client is None:
            return True
        return client._session_id == owner  # kazoo's private: client_id is None while reconnecting

    @registered.setter
    def registered(self, value: bool) -> None:
        self._registered = value

    def document(self, status: str | None = None) -> dict[str, Any]:
        """The Curator ServiceInstance (compatible mode: no "enabled"). The
        payload uses the etcd value's keys (tags, meta), or is null with
        ``payload: none`` (Curator readers typed Void.class accept only null)."""
        if self._registered_at is None:
            self._registered_at = int(time.time() * 1000)
        payload: dict[str, Any] | None = None
        if self.config.payload == "map":
            payload = {"tags": list(self.instance.tags), "meta": dict(self.instance.meta)}
            if status:
                payload["status"] = status
            if self.config.payload_class:
                payload = {"@class": self.config.payload_class, **payload}
        spec = self.config.uri_spec
        return {"name": self.instance.service, "id": self.instance.id,
                "address": self.instance.address, "port": self.instance.port,
                "sslPort": self.config.ssl_port, "payload": payload,
                "registrationTimeUTC": self._registered_at, "serviceType": "DYNAMIC",
                "uriSpec": uri_spec(spec) if spec else None}

    def _data(self, status: str | None = None) -> bytes:
        return json.dumps(self.document(status), separators=(",", ":")).encode()

    def new_client(self, hosts: str) -> KazooClient:
        """A client (not started) with this backend's timeouts, auth and TLS."""
        return new_client(hosts, session_timeout=self.config.session_timeout,
                          connect_timeout=self.config.timeout, credentials=self._credentials,
                          tls=self._tls, tls_context=self._tls_context)

    # -- the session ----------------------------------------------------------

    def _connected(self, end: float) -> KazooClient:
        with self._lock:
            if self._closed:
                raise RegistryUnavailable(f"{self.name}: closed")
            if self._client is None:
                self._start_session()
            client, live = self._client, self._live
        if client.client_state == KeeperState.AUTH_FAILED:
            raise RegistrationRejected(f"{self.name}: authentication failed")
        # A refused TLS handshake seen already needs no second wait (the
        # stop sequence's deregister after a rejected registration).
        if (not live.is_set() and tls_failure(client)
                or not live.wait(max(0.0, end - time.monotonic()))):
            _no_session(self.name, client, ",".join(self.servers), self.config.timeout)
        return client

    def _start_session(self) -> None:
        client = self.new_client(",".join(self.servers) + self.chroot)
        client.add_listener(lambda state: self._on_state(client, state))
        self._client = client  # before it connects: _on_state tells ours by it
        self._live = client.start_async()

    def _on_state(self, client: KazooClient, state: str) -> None:
        # Called on kazoo's connection thread: note and return, never block.
        if client is not self._client:
            return  # a client we are closing
        if state == KazooState.SUSPENDED:
            log.warning("%s: connection lost; the session lives on while kazoo reconnects",
                        self.name)
        elif state == KazooState.LOST:
            # The ephemeral node went with the session: `registered` reads
            # False from now on (see there) until a heartbeat writes it again.
            log.warning("%s: session expired; %s will be written again by the next "
                        "heartbeat once a new session is up", self.name, self.path)
        else:
            log.info("%s: connected, session 0x%x", self.name, (client.client_id or (0,))[0])

    def _retry(self, what: str, body: Callable[[KazooClient, float], T]) -> T:
        """Run an idempotent body within ``timeout``, again after a dropped
        connection or an expired session (kazoo fails requests in flight then);
        map what is left of kazoo's exceptions to ours."""
        end = time.monotonic() + self.config.timeout
        with client_errors(f"{self.name}: {what}", _classify):
            while True:
                client = self._connected(end)
                try:
                    return body(client, end)
                except (ConnectionLoss, SessionExpiredError) as exc:
                    if isinstance(exc, ConnectionClosedError) or time.monotonic() >= end:
                        raise
                    time.sleep(0.005)  # kazoo clears its "live" flag before failing requests

    # -- the contract -----------------------------------------------------------

    def register(self) -> None:
        self._retry("register", self._ensure)
        self.registered, self._removed_zxid = True, None  # also: back into rotation

    def refresh(self) -> bool:
        return self._retry("heartbeat", self._ensure)

    def _ensure(self, client: KazooClient, end: float) -> bool:
        """Make the node exist and belong to our session; True if it had to
        be written."""
        session, wrote = _session(client), False
        for _attempt in range(4):
            stat = _get(client, client.exists_async(self.path), end)
            if stat is None:
                if self.registered:
                    log.warning("%s: %s is gone (session expired or node deleted); "
                                "creating it again", self.name, self.path)
                try:
                    _, stat = _get(client, client.create_async(
                        self.path, self._data(), self._acl, ephemeral=True, makepath=True,
                        include_data=True), end)
                except NodeExistsError:
                    continue  # someone was quicker: look again
                self._czxid, self._owner = stat.czxid, session
                return True
            if stat.ephemeralOwner == session:  # ours, also when an earlier try landed late
                self._czxid, self._owner = stat.czxid, session
                return wrote
            if self._czxid is not None and stat.czxid > self._czxid:
                raise Superseded(f"{self.name}: {self.path} was taken over by session "
                                 f"0x{stat.ephemeralOwner:x}, a newer registration of this id")
            # Left by a previous incarnation whose session is still alive (or
            # by hand): it would vanish under our feet when that session
            # expires. Replace it in one step, so consumers never miss us.
            tx = client.transaction()
            tx.delete(self.path, version=stat.version)
            tx.create(self.path, self._data(), self._acl, ephemeral=True)
            failed = [r for r in _get(client, tx.commit_async(), end)
                      if isinstance(r, Exception) and not isinstance(r, RolledBackError)]
            if any(isinstance(r, _REJECTED) for r in failed):
                raise _mapped(failed[0], f"{self.name}: replacing {self.path}")
            if not failed:
                log.warning("%s: replaced %s left by session 0x%x (a previous "
                            "incarnation of this pod?)", self.name, self.path, stat.ephemeralOwner)
                wrote = True
        raise RegistryUnavailable(f"{self.name}: {self.path} kept changing under us")

    def drain(self, reason: str) -> None:
        """Mark the payload "draining". With ``payload: none`` there is
        nowhere to say it (a Curator node has no status field that every
        reader accepts): the node stays as it is until the removal."""
        self._connect_observers()  # while we drain and deregister
        if self.registered and self.config.payload == "map":
            self._retry("drain", self._mark_draining)

    def _mark_draining(self, client: KazooClient, end: float) -> None:
        stat = _get(client, client.exists_async(self.path), end)
        if stat is None or stat.ephemeralOwner != _session(client):
            return  # nothing of ours to mark
        try:
            _get(client, client.set_async(self.path, self._data("draining"), stat.version), end)
        except (BadVersionError, NoNodeError):
            pass  # changed under us: the deregistration decides

    def deregister(self) -> int:
        """Delete our node (version-checked), close the session; return the
        zxid of a state that includes the removal."""
        if self._removed_zxid is not None:
            return self._removed_zxid
        self._removed_zxid = self._retry("deregister", self._remove)
        self.registered = False
        with self._lock:
            client, self._client = self._client, None
        if client is not None:  # ordered after the delete; nothing waits for it
            self._closer = stop_in_background(client)
        return self._removed_zxid

    def _remove(self, client: KazooClient, end: float) -> int:
        self.removal_deleted = False
        for _attempt in range(4):
            stat = _get(client, client.exists_async(self.path), end)
            if stat is None:
                break
            if (stat.ephemeralOwner != _session(client) and self._czxid is not None
                    and stat.czxid > self._czxid):
                log.info("%s: %s belongs to a newer registration (session 0x%x): "
                         "leaving it", self.name, self.path, stat.ephemeralOwner)
                break
            # Without a node of ours (the `deregister` command) whatever the
            # path holds goes.
            try:
                _get(client, client.delete_async(self.path, stat.version), end)
                self.removal_deleted = True
                break
            except NoNodeError:
                break
            except BadVersionError:
                continue
        else:
            raise RegistryUnavailable(f"{self.name}: {self.path} kept changing under us")
        # Every reply carries the zxid its server had applied (kazoo records
        # it before handing the reply over): the removal is at or before it.
        return client.last_zxid

    def make_observers(self) -> list[ZooKeeperObserver]:
        return [ZooKeeperObserver(self, server) for server in self.servers]

    def _connect_observers(self) -> None:
        for observer in self.observers():
            observer.connect()

    def close(self) -> None:
        """Final: a call after it raises RegistryUnavailable rather than open
        a session nobody would close (a late observer warm-up, say)."""
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
        observers = [o._release() for o in self._observers or ()]
        stop_clients([c for c in [client, *observers] if c], self.config.timeout)
        if self._closer is not None:
            self._closer.join(self.config.timeout)


class ZooKeeperObserver(Observer):
    """One server's own view, through a session held with that server alone
    (a ZooKeeper session's reads are answered by the server it is connected
    to, so that is the only way to read each server's view). The session
    opens on first use (drain() opens every observer's, while the removal
    is written) and closes after OBSERVER_IDLE seconds unused.

    After a removal, ``sees()`` asks exists(path) and reads the zxid of the
    reply, which is the zxid the server had applied: the instance is gone
    from this view once that reaches the removal's zxid; ``wait_gone()``
    does the same with an exists-watch, so a server that lags costs one
    more read per change of our node there, not one every few
    milliseconds. No sync there: it would cost a round trip through the
    leader, and a sync the leader is slow to answer holds up every later
    request of the session (a session's requests are answered in order).
    Before any removal (status, the warm-up after registering) it asks
    sync(path) then exists(path), pipelined: what the server holds once
    caught up."""

    def __init__(self, backend: ZooKeeperBackend, server: str):
        self.backend = backend
        self.server = server
        self.name = f"{backend.name} {server}"
        self._lock = threading.Lock()
        self._client: KazooClient | None = None
        self._live: threading.Event | None = None
        self._used = 0.0
        self._busy = 0
        self._reaper: threading.Thread | None = None
        self._closed = threading.Event()

    def connect(self) -> tuple[KazooClient, threading.Event]:
        """Start the session (in the background) unless it is there."""
        with self._lock:
            if self.backend._closed or self._closed.is_set():
                raise RegistryUnavailable(f"{self.name}: closed")
            if self._client is None:
                self._client = self.backend.new_client(self.server + self.backend.chroot)
                self._live = self._client.start_async()
            self._used = time.monotonic()
            if self._reaper is None or not self._reaper.is_alive():
                self._reaper = threading.Thread(target=self._reap, daemon=True,
                                                name=f"zk-observer-idle-{self.server}")
                self._reaper.start()
            return self._client, self._live

    def _reap(self) -> None:
        """Close the session once it has been unused for OBSERVER_IDLE."""
        while True:
            with self._lock:
                idle = time.monotonic() - self._used
                if self._client is None:
                    return
                if self._busy == 0 and idle >= OBSERVER_IDLE:
                    client, self._client = self._client, None
                    break
            if self._closed.wait(max(0.05, OBSERVER_IDLE - idle)):
                return
        stop_in_background(client)

    def _session(self, timeout: float) -> KazooClient:
        """The live session, or MemberDown / RegistryUnavailable."""
        client, live = self.connect()
        if not live.is_set() and _refuses(self.server, self.backend.config.timeout):
            raise MemberDown(f"{self.name}: connection refused")
        if not live.wait(max(0.0, timeout)):
            raise RegistryUnavailable(f"{self.name}: no session within {timeout:.3g}s")
        return client

    def _in_use(self, delta: int) -> None:
        with self._lock:
            self._busy += delta
            self._used = time.monotonic()

    def sees(self, instance: Instance, since: int | None = None) -> bool:
        timeout = self.backend.config.timeout
        end = time.monotonic() + timeout
        self._in_use(+1)
        try:
            client = self._session(timeout)
            path = self.backend.path
            with client_errors(self.name, _classify):
                if since is not None:
                    _get(client, client.exists_async(path), end)
                    # A node there now, if any, is a newer registration's.
                    return client.last_zxid < since
                client.sync_async(path)
                return _get(client, client.exists_async(path), end) is not None
        finally:
            self._in_use(-1)

    def wait_gone(self, instance: Instance, since: int | None, deadline: Deadline) -> bool:
        """exists(path) with a watch on this server until the reply's zxid
        reaches ``since``. A lagging server fires the watch when it applies
        a change of our node (the drain's write, the delete), and we read
        again then; where no change of ours is on its way (nothing was
        deleted) we read again after windows that double
        (``watch_windows()``). Waits for a reply as long as the deadline
        allows, with no poll: a frozen server costs what kazoo's own pings
        and reconnections cost, whatever the lag."""
        if since is None:
            return super().wait_gone(instance, since, deadline)
        end = time.monotonic() + deadline.remaining()
        window, cap = watch_windows(self.backend.removal_deleted)
        fired = threading.Event()

        def watch(_event: Any) -> None:
            fired.set()

        path = self.backend.path
        self._in_use(+1)
        try:
            client = self._session(min(self.backend.config.timeout, end - time.monotonic()))
            with client_errors(self.name, _classify):
                while True:
                    fired.clear()
                    _get(client, client.exists_async(path, watch=watch), end)
                    if client.last_zxid >= since:
                        return True
                    if not fired.wait(max(0.0, min(window, end - time.monotonic()))):
                        if time.monotonic() >= end:
                            return False
                        window = min(window * 2, cap)
        finally:
            self._in_use(-1)

    def _release(self) -> KazooClient | None:
        self._closed.set()
        with self._lock:
            client, self._client = self._client, None
            return client

    def close(self) -> None:
        client = self._release()
        if client is not None:
            stop_clients([client], self.backend.config.timeout)


def _refuses(server: str, timeout: float) -> bool:
    """Whether ``server`` (host:port) refuses a TCP connection: nothing
    listens there, so it serves no consumer either. kazoo only retries."""
    host, _, port = server.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout, 0.25)).close()
    except ConnectionRefusedError:
        return True
    except (OSError, ValueError):
        pass
    return False


def _no_session(name: str, client: KazooClient, servers: str, timeout: float) -> None:
    """Raise why no session came up in time: a TLS handshake refused (by
    us or by the server) before any session is a setting to fix, not worth
    retrying forever."""
    tls = tls_failure(client)
    if tls:
        raise RegistrationRejected(f"{name}: TLS handshake with {servers} failed: {tls}")
    raise RegistryUnavailable(f"{name}: no session with {servers} within {timeout:g}s")


def _session(client: KazooClient) -> int:
    client_id = client.client_id
    if client_id is None:
        raise ConnectionLoss()  # between sessions: the caller retries
    return client_id[0]


def _get(client: KazooClient, result: Any, end: float) -> Any:
    """A kazoo async result, waited for until ``end`` at most (then
    KazooTimeoutError, which _classify maps)."""
    return wait(result, end, nudge=lambda: client.connected and client.exists_async("/"))


def _classify(exc: BaseException) -> tuple[type[RegistrarError], str] | None:
    if isinstance(exc, KazooTimeoutError):
        return RegistryUnavailable, "no answer in time"
    if not isinstance(exc, KazooException):
        return None
    return (RegistrationRejected if isinstance(exc, _REJECTED) else RegistryUnavailable), _why(exc)


def _mapped(exc: BaseException, what: str) -> Exception:
    kind, reason = _classify(exc)
    return kind(f"{what}: {reason}")


def _why(exc: BaseException) -> str:
    # kazoo's exceptions mostly carry no message: the class says it.
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text and text != "()" else type(exc).__name__
