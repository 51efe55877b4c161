"""Real Consul agents on 127.0.0.1 for tests and benchmarks: one `-dev`
agent, or a cluster of servers and client agents with optional ACLs and TLS
(HTTPS only, client certificates required, RPC verified both ways), each
agent serving DNS on a port of its own unless ``dns=False``; and
passing_ids(), a server's own view of a service."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import requests

from . import free_ports, wait_until
from .process import ServerProcess

if TYPE_CHECKING:
    from .certs import CertificateAuthority

log = logging.getLogger(__name__)

CONSUL_VERSION = "1.8.7"


def consul_binary() -> str:
    """$CONSUL_BIN, else `consul` on PATH, else the cache that
    scripts/install-consul.sh fills."""
    env = os.environ.get("CONSUL_BIN")
    if env:
        if os.access(env, os.X_OK):
            return env
        raise FileNotFoundError(f"CONSUL_BIN={env!r} is not an executable file")
    if on_path := shutil.which("consul"):
        return on_path
    cache = Path(os.environ.get("REGISTRAR_CACHE") or Path.home() / ".cache" / "registrar")
    cached = cache / f"consul-{CONSUL_VERSION}" / "usr" / "bin" / "consul"
    if os.access(cached, os.X_OK):
        return str(cached)
    raise FileNotFoundError(f"no consul binary (not in $CONSUL_BIN, on PATH, nor at {cached}): "
                            f"run scripts/install-consul.sh to fetch Consul {CONSUL_VERSION}")


def passing_ids(addr: str, service: str, token: str | None = None, *,
                verify: bool | str = True, cert: tuple[str, str] | None = None) -> set[str]:
    """The instance ids a server's own replica lists as passing (what a
    consumer of ?passing&stale gets from it), read without the backend.
    ``verify`` and ``cert`` are requests' (a TLS cluster's ``tls_args``)."""
    headers = {"X-Consul-Token": token} if token else {}
    r = requests.get(f"{addr}/v1/health/service/{service}", params={"passing": "", "stale": ""},
                     headers=headers, timeout=2, verify=verify, cert=cert)
    r.raise_for_status()
    return {entry["Service"]["ID"] for entry in r.json()}


class ConsulAgent:
    """One consul agent process with its own ports and data dir; `token`
    (the management token, if ACLs are on) is sent by request()/get().
    With ``tls`` (requests' ``verify`` and ``cert`` arguments) the port
    serves HTTPS and `http_addr` is an https:// address. `dns_port` is the
    port its DNS interface answers on at 127.0.0.1 (UDP and TCP), None if off."""

    def __init__(self, name: str, workdir: Path, argv: list[str], http_port: int,
                 token: str | None = None, tls: dict | None = None,
                 dns_port: int | None = None):
        self.name = name
        self.dns_port = dns_port
        self.tls_args = dict(tls or {})
        self.http_addr = f"{'https' if tls else 'http'}://127.0.0.1:{http_port}"
        self.process = ServerProcess(name, argv, workdir)
        self.token = token

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        headers = {"X-Consul-Token": self.token} if self.token else {}
        r = requests.request(method, self.http_addr + path, headers=headers, timeout=5,
                             **self.tls_args, **kwargs)
        if not r.ok:
            raise requests.HTTPError(f"{method} {self.http_addr}{path}: {r.status_code} "
                                     f"{r.text.strip()[:200]}", response=r)
        return r

    def get(self, path: str, **params) -> requests.Response:
        return self.request("GET", path, params=params)

    def leader(self) -> str:
        """This agent's view of the raft leader ("" while there is none)."""
        return self.get("/v1/status/leader").json()

    def ready(self) -> bool:
        """Sees a leader and, with ACLs, enforces them the new (1.4+) way."""
        if not self.leader():
            return False
        if not self.token:
            return True
        # Agents start in legacy ACL mode (anonymous calls fail "ACL not
        # found", /v1/acl/* answers 500 "currently in legacy mode") and switch
        # once every server has, polling at doubling intervals. Their serf tag
        # and their behaviour do not flip at the same moment: check both.
        if self.get("/v1/agent/self").json()["Member"]["Tags"].get("acls") != "1":
            return False
        r = requests.get(self.http_addr + "/v1/agent/self", timeout=5, **self.tls_args)
        return r.status_code == 403 and "Permission denied" in r.text

    def start(self) -> None:
        self.process.start()

    def kill(self) -> None:
        self.process.kill()

    def restart(self, timeout: float | None = 30, graceful: bool = False) -> None:
        """SIGKILL (``graceful``: SIGTERM and wait for the exit; a client
        agent leaves the cluster first, its node and services dropped by the
        servers), start again (same ports, same data dir) and, unless
        timeout is None, wait until ready()."""
        if graceful:
            self.process.terminate(timeout=30)
        else:
            self.process.kill()
        self.process.start()
        if timeout is not None:
            wait_until(self.ready, timeout, f"{self.name} is ready after restart",
                       interval=0.02, ignore=Exception)

    def freeze(self) -> None:
        self.process.freeze()

    def thaw(self) -> None:
        self.process.thaw()


class _Agents:
    agents: list[ConsulAgent]

    def _launch(self, agents: list[ConsulAgent], ready, timeout: float) -> None:
        for agent in agents:
            agent.start()
        try:
            # A crashed agent ends the wait at once instead of at the timeout.
            result = wait_until(
                lambda: [a.name for a in agents if not a.process.running] or ready(),
                timeout, f"consul agents {[a.name for a in agents]} are ready",
                interval=0.02, ignore=Exception)
            if isinstance(result, list):
                raise RuntimeError(f"consul agent(s) {result} exited at start")
        except Exception:
            log.error("consul agents failed to start; log tails:\n%s", "\n".join(
                f"--- {a.name}:\n{a.process.log_tail()}" for a in self.agents))
            self.stop()
            raise

    def stop(self) -> None:
        """SIGKILL every agent (fast, idempotent; no graceful leave needed)."""
        for agent in self.agents:
            agent.kill()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ConsulDev(_Agents):
    """One `consul agent -dev`: a server with in-memory raft (a restart loses
    the catalog), leader within ~0.1 s. `.agent` is its ConsulAgent; with
    ``dns`` (the default) it answers DNS on `.agent.dns_port`."""

    def __init__(self, base_dir: Path | str, name: str = "consul-dev", dns: bool = True):
        http, lan, wan, rpc, dns_port = free_ports(5)
        workdir = Path(base_dir) / name
        argv = [consul_binary(), "agent", "-dev", f"-node={name}", "-bind=127.0.0.1",
                "-client=127.0.0.1", f"-dns-port={dns_port if dns else -1}", "-grpc-port=-1",
                f"-http-port={http}", f"-serf-lan-port={lan}", f"-serf-wan-port={wan}",
                f"-server-port={rpc}", f"-data-dir={workdir / 'data'}", "-log-level=info"]
        self.agent = ConsulAgent(name, workdir, argv, http, dns_port=dns_port if dns else None)
        self.agents = [self.agent]
        self.name, self.http_addr, self.process = name, self.agent.http_addr, self.agent.process

    def start(self, timeout: float = 10) -> None:
        self._launch(self.agents, self.agent.ready, timeout)


class ConsulCluster(_Agents):
    """`servers` Consul servers (-bootstrap-expect=servers) and `clients`
    client agents, each with its own ports and data dir. With acl=True, ACLs
    default to deny, `.management_token` is the master (global-management)
    token and `.agent_token` the agents' own (node write, service read).

    With ``tls`` (a CertificateAuthority), every agent serves its API over
    HTTPS only (no plain HTTP port), requires a client certificate signed by
    that CA (verify_incoming), and RPC between agents is TLS verified both
    ways, server names included (server certificates name
    ``server.<dc>.consul``). `.ca_file` is the CA, `.tls_args` the
    ``verify``/``cert`` arguments requests needs (a client certificate of
    the launcher's own).

    With ``dns`` (the default; costs nothing measurable at start) every
    agent answers DNS (UDP and TCP) on 127.0.0.1 at its `dns_port`, with
    Consul's default `dns_config`: ``<service>.service.consul`` lists the
    instances with no critical check, read from any server (stale allowed).

    ``extra_config`` adds or overrides keys of every agent's config file
    (e.g. ``{"telemetry": {"prometheus_retention_time": "1h"}}`` for
    cumulative counters at ``/v1/agent/metrics?format=prometheus``)."""

    def __init__(self, base_dir: Path | str, servers: int = 3, clients: int = 1,
                 acl: bool = False, tls: CertificateAuthority | None = None,
                 datacenter: str = "dc1", dns: bool = True,
                 extra_config: dict | None = None):
        binary = consul_binary()
        self.datacenter = datacenter
        self.management_token = str(uuid.uuid4()) if acl else None
        self.agent_token = str(uuid.uuid4()) if acl else None
        self.ca_file: str | None = None
        self.tls_args: dict = {}
        tls_files: dict[bool, dict] = {}
        if tls is not None:
            self.ca_file = tls.ca_file
            launcher = tls.client("consul-launcher")
            self.tls_args = {"verify": tls.ca_file, "cert": (launcher.cert_file, launcher.key_file)}
            for is_server, role in ((True, "server"), (False, "client")):
                # One certificate per role, used both ways (HTTPS and RPC).
                pair = tls.server(f"consul-{role}", hosts=(
                    "127.0.0.1", "localhost", f"{role}.{datacenter}.consul"))
                tls_files[is_server] = {
                    "ca_file": tls.ca_file, "cert_file": pair.cert_file,
                    "key_file": pair.key_file, "verify_incoming": True,
                    "verify_outgoing": True, "verify_server_hostname": True}
        names = [(f"consul-server-{i}", True) for i in range(servers)] + \
                [(f"consul-client-{i}", False) for i in range(clients)]
        ports = iter(free_ports(5 * len(names)))
        port_map = {n: {k: next(ports) for k in ("http", "serf_lan", "serf_wan", "server", "dns")}
                    for n, _ in names}
        server_lan = [f"127.0.0.1:{port_map[n]['serf_lan']}" for n, srv in names if srv]
        self.servers: list[ConsulAgent] = []
        self.clients: list[ConsulAgent] = []
        for name, is_server in names:
            workdir = Path(base_dir) / name
            own_lan = f"127.0.0.1:{port_map[name]['serf_lan']}"
            agent_ports = {**port_map[name], "grpc": -1, "https": -1}
            if not dns:
                agent_ports["dns"] = -1
            if tls is not None:  # the API on HTTPS only, on the port HTTP had
                agent_ports["https"], agent_ports["http"] = agent_ports["http"], -1
            config = {
                "node_name": name, "datacenter": datacenter, "data_dir": str(workdir / "data"),
                "server": is_server, "bind_addr": "127.0.0.1", "client_addr": "127.0.0.1",
                "ports": agent_ports,
                "retry_join": [a for a in server_lan if a != own_lan],
                # The default 30 s would stall agents started before their peers listen.
                "retry_interval": "200ms",
                # Lowest allowed; the hidden `consul.raft` timings are reset by
                # the agent unless -dev, so leader election still takes 1-2 s.
                "performance": {"raft_multiplier": 1},
                # Failure detection in about a second on loopback, not ~5 s.
                "gossip_lan": {"gossip_interval": "100ms", "probe_interval": "200ms",
                               "probe_timeout": "100ms", "suspicion_mult": 3},
                "disable_update_check": True, "log_level": "info",
            }
            if is_server:
                config["bootstrap_expect"] = servers
            config.update(tls_files.get(is_server, {}))
            config.update(extra_config or {})
            if acl:
                # Client agents cache token lookups, "not found" included, for
                # token_ttl (default 30 s): a token revoked, or used before
                # every server applied it, would keep its stale answer that long.
                config["acl"] = {"enabled": True, "default_policy": "deny",
                                 "down_policy": "extend-cache", "token_ttl": "1s",
                                 "policy_ttl": "1s", "role_ttl": "1s",
                                 "tokens": {"master": self.management_token,
                                            "agent": self.agent_token}}
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "config.json").write_text(json.dumps(config, indent=2))
            argv = [binary, "agent", f"-config-file={workdir / 'config.json'}"]
            agent = ConsulAgent(name, workdir, argv, port_map[name]["http"], self.management_token,
                                self.tls_args or None,
                                dns_port=port_map[name]["dns"] if dns else None)
            (self.servers if is_server else self.clients).append(agent)
        self.agents = self.servers + self.clients

    @property
    def server_addrs(self) -> list[str]:
        return [s.http_addr for s in self.servers]

    @property
    def client_addr(self) -> str:
        return self.clients[0].http_addr

    def start(self, timeout: float = 30) -> None:
        """Return once there is a leader, every agent sees all the others
        alive and is in the catalog, and (with ACLs) enforces them."""
        if not self.management_token:
            return self._launch(self.agents, self._ready, timeout)
        deadline = time.monotonic() + timeout
        # Clients leave legacy ACL mode only after every server has, backing
        # off meanwhile (up to ~6 s here): start them once the servers are done.
        self._launch(self.servers, lambda: all(s.ready() for s in self.servers), timeout)
        try:
            # In place before the clients start: their first catalog sync works.
            self.create_token('node_prefix "" { policy = "write" }\n'
                              'service_prefix "" { policy = "read" }',
                              "consul agents", secret=self.agent_token)
        except Exception:
            self.stop()
            raise
        self._launch(self.clients, self._ready, max(deadline - time.monotonic(), 1))

    def leader_server(self) -> ConsulAgent:
        """The server that leads (as a running server sees it)."""
        srv = next(s for s in self.servers if s.process.running)
        leader = srv.leader()  # "127.0.0.1:<server RPC port>"
        port = int(leader.rsplit(":", 1)[1])
        return next(s for s in self.servers if json.loads(
            (Path(s.process.workdir) / "config.json").read_text())["ports"]["server"] == port)

    def healthy(self) -> bool:
        """Autopilot's verdict: every server healthy and a voter. A server
        back from a freeze rejoins as a non-voter until it is stable (~10 s);
        until then the other two cannot elect a leader if one of them stops."""
        health = self.servers[0].get("/v1/operator/autopilot/health").json()
        return health["Healthy"] and sum(s["Voter"] for s in health["Servers"]) == len(self.servers)

    def create_token(self, rules: str, description: str = "", secret: str | None = None,
                     timeout: float = 10) -> str:
        """Mint a token with a new policy of HCL `rules`; return its SecretID
        once every running server knows it (followers apply it up to ~100 ms
        after the leader answers; a client agent asking one of them earlier
        gets 403 "ACL not found")."""
        srv = next(s for s in self.servers if s.process.running)
        policy = f"policy-{uuid.uuid4().hex[:12]}"
        srv.request("PUT", "/v1/acl/policy", json={"Name": policy, "Rules": rules})
        body = {"Description": description, "Policies": [{"Name": policy}]}
        if secret:
            body["SecretID"] = secret
        secret = srv.request("PUT", "/v1/acl/token", json=body).json()["SecretID"]
        wait_until(lambda: all(
            requests.get(f"{s.http_addr}/v1/acl/token/self", params={"stale": ""}, timeout=5,
                         headers={"X-Consul-Token": secret}, **self.tls_args).ok
            for s in self.servers if s.process.running),
            timeout, "every server knows the new ACL token", interval=0.02, ignore=Exception)
        return secret

    def _ready(self) -> bool:
        names = {a.name for a in self.agents}
        if not self.servers[0].leader():
            return False
        for agent in self.agents:
            alive = {m["Name"] for m in agent.get("/v1/agent/members").json() if m["Status"] == 1}
            if not names <= alive:
                return False
        nodes = {n["Node"] for n in self.servers[0].get("/v1/catalog/nodes").json()}
        return names <= nodes and all(a.ready() for a in self.agents)
