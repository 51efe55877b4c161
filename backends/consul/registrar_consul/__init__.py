"""Consul backend: an agent service with a TTL check, drained with
maintenance mode.

The instance is registered at the local Consul agent (``ID`` = instance id)
with a TTL check that heartbeats mark passing and that carries
``DeregisterCriticalServiceAfter``, so a SIGKILLed pod goes critical within
its TTL and is then reaped by Consul itself. Consumers read
``/v1/health/service/<name>?passing``; the observers read the same thing on
each configured address (the servers, typically), with blocking queries.

Two things this adds because the client agent sits between us and the
servers (see _watch.py and ConsulBackend.deregister): ``registered`` holds
only while a server lists us, and a removal that the agent cannot carry to
the servers is made through the servers themselves.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar

import consul
from urllib3.exceptions import InsecureRequestWarning

from registrar.plugin import (Backend, ConfigError, Deadline, Instance, Observer, RegistrarError,
                              RegistrationRejected, RegistryUnavailable, read_token)

from ._client import (Forgotten, TLSRejected, catalog_deregister, go_duration, make_client, quote,
                      read_health, request)
from ._watch import ListingWatch
from .config import ConsulConfig, ConsulTLS, parse_address

__all__ = ["ConsulBackend", "ConsulConfig", "ConsulObserver", "ConsulRemoval", "ConsulTLS",
           "parse_address"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Longest a blocking query is held by a server (bounds how long a wait
#: lingers after close(), and how long a silent server goes unnoticed).
WATCH_WAIT = 5.0


@dataclass(frozen=True)
class ConsulRemoval:
    """Where the removal happened, as deregister() returns it: from
    ``gone_index`` on, consumers' view lacks us (the drain's maintenance
    already took us out of ?passing); from ``removed_index`` on, a listing
    with our id is a new incarnation's. Either may be None (unknown)."""
    gone_index: int | None
    removed_index: int | None


class ConsulBackend(Backend):
    """Registration = an agent service with a TTL check; heartbeat = check
    pass (re-registering at once if the agent forgot us); drain =
    maintenance mode; deregister = agent service deregister."""

    config_model = ConsulConfig
    #: The TTL check runs in the client agent: an agent that cannot reach
    #: the leader (a frozen leader holds its RPCs) never tells the servers
    #: that the check went critical, and they list the pod as passing for
    #: as long as that lasts (36 s measured). A removal is worth trying for
    #: the whole stop budget, not only for a TTL.
    expires_unaided = False

    def __init__(self, instance: Instance, config: ConsulConfig,
                 environ: Mapping[str, str] | None = None):
        super().__init__(instance, config)
        env = os.environ if environ is None else environ
        tls = config.tls
        with_tls = bool(tls.ca_file or tls.cert_file or not tls.verify)
        https = with_tls or env.get("CONSUL_HTTP_SSL", "").lower() in ("1", "true")
        self.address = (config.address or env.get("CONSUL_HTTP_ADDR")
                        or ("https://127.0.0.1:8501" if https else "http://127.0.0.1:8500"))
        try:
            scheme, _, _ = parse_address(self.address, https)
        except ValueError as exc:  # only the environment's can be wrong here
            raise ConfigError("address", f"$CONSUL_HTTP_ADDR: {exc}") from None
        if with_tls and scheme == "http":  # else tls would be silently unused
            raise ConfigError("tls", f"set, but the agent's address {self.address} is http://: "
                                     f"give its https:// address")
        if not tls.verify:
            log.warning("%s: tls.verify is false: nobody checks that %s is the agent",
                        self.name, self.address)
            warnings.filterwarnings("ignore", category=InsecureRequestWarning)
        self._https = https
        self._token, source = self._resolve_token(config, env)
        self._source = f" from {source}" if source else ""
        self.check_id = f"service:{instance.id}"
        self._agent = self._client_for(self.address)
        self._node: str | None = None
        self._gone_index: int | None = None  # from here on consumers' view lacks us
        self._removed_index: int | None = None
        self._watch = ListingWatch(self)
        #: Clients for the servers (observers other than the agent), made
        #: when a removal must go through them (deregister()).
        self._servers: dict[str, consul.Consul] = {}
        self._agent_failed = False  # the agent failed a removal call of this stop

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
        return make_client(address, self._https, self.config.tls, self.config.timeout,
                           self._token)

    def _call(self, what: str, fn: Callable[[consul.Consul], T]) -> T:
        return request(self.address, what, lambda: fn(self._agent), self._token, self._source,
                       self._agent)

    # -- the contract ---------------------------------------------------------

    def register(self) -> None:
        inst = self.instance
        self._watch.unfollow()  # a verdict on the previous registration must not land on this one
        if self._node is None:
            self._learn_node()
        check = {"Name": "registrar TTL", "TTL": go_duration(self.config.ttl),
                 "DeregisterCriticalServiceAfter":
                     go_duration(self.config.deregister_critical_after),
                 "Status": "passing"}  # consumers see us at once, not after the first pass
        # replace_existing_checks also drops a maintenance check left by drain().
        self._call(f"register {inst.service}/{inst.id}", lambda c: c.agent.service.register(
            inst.service, service_id=inst.id, address=inst.address, port=inst.port,
            tags=list(inst.tags), meta=dict(inst.meta), check=check, replace_existing_checks=True))
        if not self._call(f"pass {self.check_id}", lambda c: c.agent.check.ttl_pass(self.check_id)):
            raise RegistryUnavailable(f"{self.address}: the agent lost {self.check_id} at once")
        self._gone_index = self._removed_index = None
        self._agent_failed = False
        if self._node is None:
            self._node = self._node_from_check()
        self._read_back()
        self.registered = True
        self._watch.follow()

    def refresh(self) -> bool:
        try:
            if self._call(f"pass {self.check_id}", lambda c: c.agent.check.ttl_pass(self.check_id)):
                return False
        except Forgotten:
            pass
        log.warning("%s: the agent at %s has forgotten %s; registering it again",
                    self.name, self.address, self.instance.id)
        self.registered = False  # a retry of a failed repair is a repair too
        self.register()
        return True

    def drain(self, reason: str) -> None:
        inst = self.instance
        self._watch.unfollow()
        why = f"registrar: pod {inst.id} is stopping ({reason or 'stop sequence'})"
        try:
            known = self._call(f"maintenance {inst.service}/{inst.id}",
                               lambda c: c.agent.service.maintenance(inst.id, True, reason=why))
        except Forgotten:
            known = False
        except RegistryUnavailable:
            self._agent_failed = True
            raise
        if not known:
            log.info("%s: %s is not registered at %s: nothing to drain", self.name, inst.id,
                     self.address)
            return
        if self.config.health_filter == "passing":
            self._gone_index = self._index_without_us(passing=True)

    def deregister(self) -> ConsulRemoval | None:
        self._watch.unfollow()
        server = self._remove()
        self.registered = False
        if self._node is None:  # not registered by this process (the `deregister` command)
            try:
                self._learn_node()
            except RegistrarError as exc:
                log.debug("%s: %s", self.name, exc)
        if self._removed_index is None:
            self._removed_index = self._index_without_us(passing=False, server=server)
            if self._gone_index is None:
                self._gone_index = self._removed_index
        if self._gone_index is None:
            return None  # the observers can only go by what they list
        return ConsulRemoval(self._gone_index, self._removed_index)

    def make_observers(self) -> list[ConsulObserver]:
        return [ConsulObserver(self, a) for a in self.config.observers or [self.address]]

    def close(self) -> None:
        self._watch.close()
        self._agent.http.session.close()
        for client in self._servers.values():
            client.http.session.close()
        self.close_observers()

    # -- removal --------------------------------------------------------------

    def _remove(self) -> str | None:
        """Deregister at the agent; when the agent cannot carry it to the
        servers, through the servers. Returns the server that took it, or
        None when the agent did.

        Why through the servers: the agent answers a deregistration only
        once it has synced it to the servers, and holds its local state
        while it tries. With the leader frozen (SIGSTOP, a stalled VM) the
        agent's RPC waits on it for tens of seconds, every call to the agent
        times out meanwhile, and the servers go on listing the pod as
        passing, TTL or not (its check runs in the agent). Any server takes
        a catalog deregistration and forwards it to the leader, the new one
        once the others have elected it (1-2 s). Each call goes to every
        server at once: which one is stuck is not known in advance.

        What it leaves: the agent keeps the service until its own call (still
        queued there) runs; should its anti-entropy sync first, it pushes the
        entry back with the check it has by then, critical once the TTL has
        passed without a heartbeat, so consumers of ?passing do not list it,
        and Consul reaps it after deregister_critical_after. Needs the ACL
        token's service:write on the service, which registering needed too."""
        servers = [a for a in self.config.observers or () if a != self.address]
        agent_error: RegistryUnavailable | None = None
        if not (self._agent_failed and servers and self._node):
            try:
                self._deregister_at_agent()
                return None
            except RegistryUnavailable as exc:
                self._agent_failed = True
                if not servers:
                    raise
                if self._node is None:
                    raise RegistryUnavailable(f"{exc}; not known on which node to deregister it "
                                              f"through the servers") from None
                agent_error = exc
                log.warning("%s: %s; deregistering through the servers", self.name, exc,
                            extra={"backend": self.name})
        try:
            server = self._remove_through(servers)
        except RegistrarError as exc:
            server_error = exc
        else:
            if agent_error is None:
                self._tell_the_agent()
            return server
        if agent_error is None:  # the servers could not (no leader yet): the agent once more
            try:
                self._deregister_at_agent()
                return None
            except RegistryUnavailable as exc:
                agent_error = exc
        raise RegistryUnavailable(f"{agent_error}; through the servers: {server_error}")

    def _deregister_at_agent(self) -> None:
        inst = self.instance
        try:  # an unknown id: True without ACLs, a 500 "Unknown service" with them
            self._call(f"deregister {inst.service}/{inst.id}",
                       lambda c: c.agent.service.deregister(inst.id))
        except Forgotten:
            pass
        self._agent_failed = False

    def _tell_the_agent(self) -> None:
        """Send the agent its deregistration too, without waiting: it reads
        the request once it answers again (a frozen agent's kernel holds it),
        and drops the service from its own state. Otherwise its anti-entropy
        would put the entry back in the catalog (critical by then, so out of
        ?passing) until deregister_critical_after."""
        def tell() -> None:
            try:
                self._deregister_at_agent()
            except RegistrarError as exc:
                log.debug("%s: %s", self.name, exc)

        threading.Thread(target=tell, name=f"tell-agent-{self.name}", daemon=True).start()

    def _remove_through(self, servers: list[str]) -> str:
        """Catalog deregistration of our service on our node, asked of every
        server at once; the first that answers has had the leader commit it.
        Raises RegistryUnavailable (every error) when none did."""
        inst, node, dc = self.instance, self._node, self.config.datacenter

        for address in servers:
            if address not in self._servers:
                self._servers[address] = self._client_for(address)

        def one(address: str) -> str:
            client = self._servers[address]
            try:
                request(address, f"deregister {inst.service}/{inst.id} from node {node}",
                        lambda: catalog_deregister(client, node, inst.id, dc),
                        self._token, self._source, client)
            except Forgotten:  # gone already ("Unknown service" with ACLs)
                pass
            return address

        pool = ThreadPoolExecutor(len(servers), thread_name_prefix=f"deregister-{self.name}")
        try:
            pending = {pool.submit(one, a) for a in servers}
            errors = []
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    try:
                        address = future.result()
                    except RegistrarError as exc:
                        log.debug("%s: %s", self.name, exc)
                        errors.append(str(exc))
                        continue
                    log.warning("%s: deregistered %s/%s through the server at %s", self.name,
                                inst.service, inst.id, address, extra={"backend": self.name})
                    return address
            raise RegistryUnavailable("; ".join(dict.fromkeys(errors)))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    # -- helpers --------------------------------------------------------------

    def _learn_node(self) -> None:
        """Our agent's node name, to tell our entry from one with the same id
        on another node (a StatefulSet pod's next incarnation), and a check
        that the agent is in the configured datacenter."""
        try:
            config = self._call("read the agent's config", lambda c: c.agent.self())["Config"]
        except TLSRejected:
            raise
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
        if not self.lists(entries):
            raise RegistryUnavailable(
                f"{self.address}: {self.instance.id} is registered at the agent but the servers "
                f"do not list it: the agent could not sync it, or the ACL token{self._source} may "
                f"not read it back (it needs service:read on {self.instance.service!r} and "
                f"node:read on the agent's node)")

    def _node_from_check(self) -> str | None:
        checks = self._call("read our check", lambda c: c.agent.checks(
            filter_expr=f"CheckID == {quote(self.check_id)}")) or {}
        return checks.get(self.check_id, {}).get("Node")

    def _read(self, c: consul.Consul, passing: bool, stale: bool, index: int = 0,
              wait: float = WATCH_WAIT) -> tuple[int, list[dict]]:
        """Our entries in the health view, as (index, entries); a blocking
        query from ``index`` (held up to ``wait`` seconds) when it is not 0."""
        return read_health(c, self.instance.service, self.instance.id, passing, stale,
                           self.config.datacenter, index, wait)

    def lists(self, entries: list[dict]) -> bool:
        """Whether health entries list this instance (on our agent's node,
        once we know it)."""
        return any(e["Service"]["ID"] == self.instance.id
                   and (self._node is None or e["Node"]["Node"] == self._node) for e in entries)

    def _index_without_us(self, passing: bool, server: str | None = None) -> int | None:
        """The index of a read through our agent, or the ``server`` that took
        the removal (answered by the leader), that no longer lists us: every
        server that has reached it has dropped us. The change was committed
        before it was answered, so one read normally suffices; None if it
        cannot tell."""
        try:
            if server is None:
                index, entries = self._call("read the health view",
                                            lambda c: self._read(c, passing, stale=False))
            else:
                client = self._servers[server]
                index, entries = request(server, "read the health view", lambda: self._read(
                    client, passing, stale=False), self._token, self._source, client)
        except RegistrationRejected as exc:
            log.info("%s: observers will confirm by listing alone: %s", self.name, exc)
            return None
        except RegistryUnavailable as exc:
            log.warning("%s: observers will confirm by listing alone: %s", self.name, exc)
            return None
        if self.lists(entries):
            log.warning("%s: the servers still list %s after the agent at %s accepted the "
                        "change (its sync failed?)", self.name, self.instance.id, self.address)
            return None
        return index



class ConsulObserver(Observer):
    """One agent's or server's view (``?stale``: its own replica).

    ``sees()`` is one read. After a removal, ``wait_gone()`` reads once,
    then holds a blocking query from the index it read (``?index=&wait=``,
    still ``stale``) which the server answers when its own view of the
    service changes: a server that lags costs one request per change of
    the service it applies (and one per WATCH_WAIT it stays silent), not
    one every few milliseconds."""

    def __init__(self, backend: ConsulBackend, address: str):
        self.backend = backend
        self.address = address
        self.name = f"{backend.name} {address}"
        self._client = backend._client_for(address)

    def sees(self, instance: Instance, since: ConsulRemoval | None = None) -> bool:
        return self._listed(*self._fetch(), since)

    def wait_gone(self, instance: Instance, since: ConsulRemoval | None,
                  deadline: Deadline) -> bool:
        end = time.monotonic() + deadline.remaining()
        index, entries = self._fetch()
        while self._listed(index, entries, since):
            wait = end - time.monotonic()
            if wait < 0.001:
                return False
            # Consul takes a whole number of milliseconds; it adds up to
            # wait/16 of jitter, which the client's timeout allows for.
            index, entries = self._fetch(max(index, 1), max(0.001, min(WATCH_WAIT, wait)))
        return True

    def _listed(self, index: int, entries: list[dict], since: ConsulRemoval | None) -> bool:
        if since is None or since.gone_index is None:
            return self.backend.lists(entries)
        if index < since.gone_index:
            # This server has not applied our exit yet; a view that lacks us
            # here may even predate our registration.
            return True
        removed = since.removed_index
        # Past our removal, a listing is a new incarnation's (same node, same id).
        return self.backend.lists(entries) and (removed is None or index < removed)

    def _fetch(self, index: int = 0, wait: float = WATCH_WAIT) -> tuple[int, list[dict]]:
        """(index, our entries) from this server; a blocking query from
        ``index`` (held up to ``wait`` seconds) when it is not 0."""
        b = self.backend
        try:
            return request(self.address, "read the health view", lambda: b._read(
                self._client, b.config.health_filter == "passing", stale=True, index=index,
                wait=wait), b._token, b._source, self._client)
        except RegistrationRejected as exc:  # sees() must raise the transient kind only
            raise RegistryUnavailable(str(exc)) from None

    def close(self) -> None:
        self._client.http.session.close()
