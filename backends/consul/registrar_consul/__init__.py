"""Consul backend: an agent service with a TTL check, drained with
maintenance mode.

The instance is registered at the local Consul agent (``ID`` = instance id)
with a TTL check that heartbeats mark passing and that carries
``DeregisterCriticalServiceAfter``, so a SIGKILLed pod goes critical within
its TTL and is then reaped by Consul itself. Consumers read
``/v1/health/service/<name>?passing``; the observers read the same thing on
each configured address (the servers, typically), with blocking queries.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import consul
import requests
from consul import exceptions as consul_exc
from consul.callback import CB

from registrar.backend import Backend, Observer
from registrar.config import read_token
from registrar.errors import ConfigError, RegistrarError, RegistrationRejected, RegistryUnavailable
from registrar.instance import Instance

from .config import ConsulConfig, ConsulTLS, parse_address

__all__ = ["ConsulBackend", "ConsulConfig", "ConsulObserver", "ConsulTLS", "parse_address"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Longest a blocking query is held by a server (bounds how long a watcher
#: lingers after close(), and how long a silent server goes unnoticed).
WATCH_WAIT = 5.0
#: A sees() this soon after the previous one starts the watcher (a single
#: question, such as the start-up warm-up or `status`, is one plain read).
WATCH_START = 0.5
#: A watcher nobody has asked for this long stops: no pod keeps long-polls
#: open on the servers for its whole life.
WATCH_IDLE = 10.0
#: How an agent says it does not know our check or service (it restarted and
#: forgot us, or we are gone already): a 500 from 1.8 (with ACLs, "Unknown
#: service" even for deregister), a 404 from newer agents (py-consul: False).
_FORGOTTEN = re.compile(r"does not have associated TTL|Unknown check|Unknown service", re.I)


def _go_duration(seconds: float) -> str:
    return f"{seconds:g}s"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _request(where: str, what: str, fn: Callable[[], T], token: str | None = None,
             source: str = "") -> T:
    """One py-consul call, its exceptions mapped to ours. Messages name where
    the token came from (``source``), never the token: it is scrubbed even
    from Consul's own text, to be sure."""
    def scrub(text: Any) -> str:
        text = " ".join(str(text).split())
        text = text.replace(token, "<token>") if token else text
        return text if len(text) <= 200 else text[:197] + "..."

    try:
        return fn()
    except consul_exc.ACLPermissionDenied as exc:  # a subclass: before ConsulException
        body = scrub(exc)
        if "ACL not found" in body:
            cause = f"Consul does not know the ACL token{source} (ACL not found)" if token else \
                "no ACL token was given and Consul requires one"
        else:
            cause = f"the ACL token{source} may not do this ({body})" if token else \
                f"no ACL token was given and the anonymous token may not do this ({body})"
        raise RegistrationRejected(f"{what} at {where}: {cause}") from None
    except (consul_exc.BadRequest, consul_exc.ACLDisabled) as exc:
        raise RegistrationRejected(f"{what} at {where}: Consul refused it: {scrub(exc)}") from None
    except consul_exc.ClientError as exc:
        status = str(exc)[:3]
        kind = RegistryUnavailable if status == "429" else RegistrationRejected
        raise kind(f"{what} at {where}: {scrub(exc)}") from None
    except consul_exc.ConsulException as exc:  # 5xx: no leader, rpc errors, or our _FORGOTTEN
        if _FORGOTTEN.search(str(exc)):
            raise _Forgotten(f"{what} at {where}: {scrub(exc)}") from None
        raise RegistryUnavailable(f"{what} at {where}: {scrub(exc)}") from None
    except requests.Timeout:
        raise RegistryUnavailable(f"{what} at {where}: no answer in time") from None
    except requests.RequestException as exc:
        raise RegistryUnavailable(f"{what} at {where}: {_why(exc, scrub)}") from None


def _why(exc: Exception, scrub: Callable[[Any], str]) -> str:
    """A short reason instead of requests' paragraph-long one."""
    text = str(exc)
    for needle, reason in (("Connection refused", "connection refused"),
                           ("Name or service not known", "unknown host"),
                           ("Connection reset", "connection reset"),
                           ("CERTIFICATE_VERIFY_FAILED", "TLS: certificate verify failed"),
                           ("SSLError", "TLS handshake failed")):
        if needle in text:
            return reason
    return scrub(text)


class _Forgotten(RegistryUnavailable):
    """The agent does not know our check or service (it restarted, or we are
    gone). Handled where it means something; transient if it escapes."""


class ConsulBackend(Backend):
    """Registration = an agent service with a TTL check; heartbeat = check
    pass (re-registering at once if the agent forgot us); drain =
    maintenance mode; deregister = agent service deregister."""

    Config = ConsulConfig

    def __init__(self, instance: Instance, config: ConsulConfig,
                 environ: Mapping[str, str] | None = None):
        super().__init__(instance, config)
        env = os.environ if environ is None else environ
        https = env.get("CONSUL_HTTP_SSL", "").lower() in ("1", "true")
        self.address = config.address or env.get("CONSUL_HTTP_ADDR") or "http://127.0.0.1:8500"
        try:
            parse_address(self.address, https)
        except ValueError as exc:  # only the environment's can be wrong here
            raise ConfigError("address", f"$CONSUL_HTTP_ADDR: {exc}") from None
        self._https = https
        self._token, source = self._resolve_token(config, env)
        self._source = f" from {source}" if source else ""
        self.check_id = f"service:{instance.id}"
        self._agent = self._client_for(self.address)
        self._node: str | None = None
        self._registered = False
        self._gone_index: int | None = None  # from here on consumers' view lacks us
        self._removed_index: int | None = None
        self._observers: list[ConsulObserver] | None = None

    @staticmethod
    def _resolve_token(config: ConsulConfig, env: Mapping[str, str]) -> tuple[str | None, str]:
        """(token, where it came from): the config first, then the environment."""
        if config.token is not None and config.token.get_secret_value():
            return config.token.get_secret_value(), "the config"
        if config.token_file is not None:
            return read_token(config.token_file, "token_file"), config.token_file
        if env.get("CONSUL_HTTP_TOKEN"):
            return env["CONSUL_HTTP_TOKEN"], "CONSUL_HTTP_TOKEN"
        if env.get("CONSUL_HTTP_TOKEN_FILE"):
            path = env["CONSUL_HTTP_TOKEN_FILE"]
            try:
                return read_token(path, "token_file"), path
            except ConfigError as exc:
                raise ConfigError("token_file", f"$CONSUL_HTTP_TOKEN_FILE: {exc.message}") from None
        return None, ""

    def _client_for(self, address: str) -> consul.Consul:
        """A py-consul client for one address, with every setting explicit.

        py-consul's own environment handling is bypassed on purpose: it lets
        CONSUL_HTTP_TOKEN win over token=, and CONSUL_HTTP_SSL_VERIFY=<CA
        path> turns verification off. We resolve those ourselves.
        """
        scheme, host, port = parse_address(address, self._https)
        tls = self.config.tls
        verify: bool | str = (tls.ca_file or True) if tls.verify else False
        cert = (tls.cert_file, tls.key_file) if tls.key_file else tls.cert_file
        c = consul.Consul(host=f"[{host}]" if ":" in host else host, port=port, scheme=scheme,
                          verify=verify, cert=cert, connections_timeout=self.config.timeout)
        c.token = self._token  # after __init__, which took CONSUL_HTTP_TOKEN over ours
        return c

    @property
    def ttl(self) -> float:
        return self.config.ttl

    def _call(self, what: str, fn: Callable[[consul.Consul], T]) -> T:
        return _request(self.address, what, lambda: fn(self._agent), self._token, self._source)

    # -- the contract ---------------------------------------------------------

    def register(self) -> None:
        inst = self.instance
        if self._node is None:
            self._learn_node()
        check = {"Name": "registrar TTL", "TTL": _go_duration(self.config.ttl),
                 "DeregisterCriticalServiceAfter": _go_duration(self.config.deregister_critical_after),
                 "Status": "passing"}  # consumers see us at once, not after the first pass
        # replace_existing_checks also drops a maintenance check left by drain().
        self._call(f"register {inst.service}/{inst.id}", lambda c: c.agent.service.register(
            inst.service, service_id=inst.id, address=inst.address, port=inst.port,
            tags=list(inst.tags), meta=dict(inst.meta), check=check, replace_existing_checks=True))
        if not self._call(f"pass {self.check_id}", lambda c: c.agent.check.ttl_pass(self.check_id)):
            raise RegistryUnavailable(f"{self.address}: the agent lost {self.check_id} at once")
        self._gone_index = self._removed_index = None
        if self._node is None:
            self._node = self._node_from_check()
        self._read_back()
        self._registered = True

    def heartbeat(self) -> bool:
        if not self._registered:
            self.register()
            return True
        try:
            if self._call(f"pass {self.check_id}", lambda c: c.agent.check.ttl_pass(self.check_id)):
                return False
        except _Forgotten:
            pass
        log.warning("consul: the agent at %s has forgotten %s; registering it again",
                    self.address, self.instance.id)
        self._registered = False  # a retry of a failed repair is a repair too
        self.register()
        return True

    def drain(self, reason: str = "") -> None:
        inst = self.instance
        why = f"registrar: pod {inst.id} is stopping ({reason or 'stop sequence'})"
        try:
            known = self._call(f"maintenance {inst.service}/{inst.id}",
                               lambda c: c.agent.service.maintenance(inst.id, True, reason=why))
        except _Forgotten:
            known = False
        if not known:
            log.info("consul: %s is not registered at %s: nothing to drain", inst.id, self.address)
            return
        if self.config.health_filter == "passing":
            self._gone_index = self._index_without_us(passing=True)

    def deregister(self) -> int | None:
        inst = self.instance
        try:  # an unknown id: True without ACLs, a 500 "Unknown service" with them
            self._call(f"deregister {inst.service}/{inst.id}",
                       lambda c: c.agent.service.deregister(inst.id))
        except _Forgotten:
            pass
        self._registered = False
        if self._node is None:  # not registered by this process (the `deregister` command)
            try:
                self._learn_node()
            except RegistrarError as exc:
                log.debug("consul: %s", exc)
        if self._removed_index is None:
            self._removed_index = self._index_without_us(passing=False)
            if self._gone_index is None:
                self._gone_index = self._removed_index
        return self._removed_index

    def observers(self) -> list["ConsulObserver"]:
        if self._observers is None:
            self._observers = [ConsulObserver(self, a)
                               for a in self.config.observers or [self.address]]
        return self._observers

    def close(self) -> None:
        self._agent.http.session.close()
        for observer in self._observers or ():
            observer.close()

    # -- helpers --------------------------------------------------------------

    def _learn_node(self) -> None:
        """Our agent's node name, to tell our entry from one with the same id
        on another node (a StatefulSet pod's next incarnation), and a check
        that the agent is in the configured datacenter."""
        try:
            config = self._call("read the agent's config", lambda c: c.agent.self())["Config"]
        except RegistrationRejected:  # the token may not read the agent (agent:read)
            return
        dc = self.config.datacenter
        if dc and config.get("Datacenter") != dc:
            raise RegistrationRejected(f"datacenter {dc!r} is not that of the agent at "
                                       f"{self.address} ({config.get('Datacenter')!r})")
        self._node = config.get("NodeName")

    def _read_back(self) -> None:
        """The agent syncs a registration to the servers before it answers,
        so the leader lists us now. If not, the sync failed, or the token
        may not read the entry (ACLs filter it out): observers would then
        take "not listed" for a removal, so this is an error."""
        _, entries = self._call("read back the registration",
                                lambda c: self._read(c, passing=False, stale=False))
        if not self._lists_us(entries):
            raise RegistryUnavailable(
                f"{self.address}: {self.instance.id} is registered at the agent but the servers "
                f"do not list it: the agent could not sync it, or the ACL token{self._source} may "
                f"not read it back (it needs service:read on {self.instance.service!r} and "
                f"node:read on the agent's node)")

    def _node_from_check(self) -> str | None:
        checks = self._call("read our check", lambda c: c.agent.checks(
            filter_expr=f"CheckID == {_quote(self.check_id)}")) or {}
        return checks.get(self.check_id, {}).get("Node")

    def _read(self, c: consul.Consul, passing: bool, stale: bool,
             index: int = 0, wait: float | None = None) -> tuple[int, list[dict]]:
        """GET /v1/health/service/<name>, filtered to our id, as (index, entries).

        Through py-consul's HTTP layer: its health.service() has no `stale`.
        """
        params: list[tuple[str, Any]] = [("filter", f"Service.ID == {_quote(self.instance.id)}")]
        if passing:
            params.append(("passing", "1"))
        if stale:
            params.append(("stale", ""))
        if self.config.datacenter:
            params.append(("dc", self.config.datacenter))
        if index:
            params += [("index", index), ("wait", _go_duration(wait or WATCH_WAIT))]
        idx, entries = c.http.get(CB.json(index=True), f"/v1/health/service/{self.instance.service}",
                                  params=params, headers=c.prepare_headers())
        return int(idx), entries or []

    def _lists_us(self, entries: list[dict]) -> bool:
        return any(e["Service"]["ID"] == self.instance.id
                   and (self._node is None or e["Node"]["Node"] == self._node) for e in entries)

    def _index_without_us(self, passing: bool) -> int | None:
        """The index of a read through our agent (answered by the leader) that
        no longer lists us: every server that has reached it has dropped us.
        The agent syncs our change to the servers before answering the
        change, so one read normally suffices; None if it cannot tell."""
        try:
            index, entries = self._call("read the health view",
                                        lambda c: self._read(c, passing, stale=False))
        except RegistrationRejected as exc:
            log.info("consul: observers will confirm by listing alone: %s", exc)
            return None
        except RegistryUnavailable as exc:
            log.warning("consul: observers will confirm by listing alone: %s", exc)
            return None
        if self._lists_us(entries):
            log.warning("consul: the servers still list %s after the agent at %s accepted the "
                        "change (its sync failed?)", self.instance.id, self.address)
            return None
        return index

    def _judge(self, index: int, entries: list[dict]) -> bool:
        """Whether a view taken at ``index`` still lists the instance."""
        gone = self._gone_index
        if gone is None:
            return self._lists_us(entries)
        if index < gone:
            # This server has not applied our exit yet; a view that lacks us
            # here may even predate our registration.
            return True
        removed = self._removed_index
        # Past our removal, a listing is a new incarnation's (same node, same id).
        return self._lists_us(entries) and (removed is None or index < removed)


class ConsulObserver(Observer):
    """One agent's or server's view (``?stale``: its own replica), kept
    current by a background blocking query so that ``sees()`` answers at
    once from the latest result.

    Without a watcher, ``sees()`` reads synchronously; a second ``sees()``
    within WATCH_START seconds (someone polls: the stop sequence) also
    starts the watcher, which stops after WATCH_IDLE seconds without a
    ``sees()``, and at ``close()``.
    """

    def __init__(self, backend: ConsulBackend, address: str):
        self.backend = backend
        self.address = address
        self.name = f"consul {address}"
        self._client = backend._client_for(address)
        self._lock = threading.Lock()
        self._view: tuple[int, list[dict]] = (0, [])
        self._error: str | None = None
        self._asked = 0.0
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def sees(self, instance: Instance) -> bool:
        with self._lock:
            now = time.monotonic()
            polled, self._asked = now - self._asked < WATCH_START, now
            if self._thread is None or not self._thread.is_alive():
                self._fetch()  # raises RegistryUnavailable
                if polled:  # asked again soon: someone polls, keep the view current
                    self._thread = threading.Thread(target=self._watch, daemon=True,
                                                    name=f"watch-{self.name}")
                    self._thread.start()
            elif self._error is not None:
                raise RegistryUnavailable(self._error)
            index, entries = self._view
        return self.backend._judge(index, entries)

    def _fetch(self, index: int = 0) -> None:
        b = self.backend
        try:
            view = _request(self.address, "read the health view", lambda: b._read(
                self._client, b.config.health_filter == "passing", stale=True, index=index),
                b._token, b._source)
        except RegistrationRejected as exc:  # sees() must raise the transient kind only
            self._error = str(exc)
            raise RegistryUnavailable(str(exc)) from None
        except RegistryUnavailable as exc:
            self._error = str(exc)
            raise
        # Taken as it comes, even an index that went backwards (a restored
        # snapshot): the next blocking query then starts from it.
        self._view = view
        self._error = None

    def _watch(self) -> None:
        backoff = 0.05
        while not self._closed.is_set() and time.monotonic() - self._asked < WATCH_IDLE:
            try:
                self._fetch(self._view[0])
                backoff = 0.05
            except RegistryUnavailable as exc:
                log.debug("%s: watch failed, again in %.2fs: %s", self.name, backoff, exc)
                self._closed.wait(backoff)
                backoff = min(backoff * 2, 1.0)

    def close(self) -> None:
        self._closed.set()
        self._client.http.session.close()
