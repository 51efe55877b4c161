"""The three-node clusters of the fleet bench, started with the testing kit's launchers, and
what the bench reads of each server: its process (CPU from /proc), its own request counter,
the TCP connections established to its client port, and the sessions or leases it holds.

Request counters (cumulative, read at phase boundaries):
  etcd       grpc_server_started_total summed over every method from /metrics: unary calls
             and streams opened (the JSON gateway turns each HTTP call into one of them, a
             lease refresh into a LeaseKeepAlive stream);
  ZooKeeper  zk_packets_received from `mntr` (requests and pings; four-letter words are not
             packets);
  Consul     every consul_http_*_count (but /v1/agent/metrics itself) plus consul_rpc_request
             (RPCs from client agents, on servers) from /v1/agent/metrics?format=prometheus,
             which needs telemetry.prometheus_retention_time (the launcher's extra_config).
"""
from __future__ import annotations

import json
import re
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from registrar_testing import ESTABLISHED, tcp_sockets
from registrar_testing.agents import consul_setup, etcd_setup, port_of, zookeeper_setup
from registrar_testing.consul import ConsulCluster
from registrar_testing.etcd import EtcdCluster
from registrar_testing.process import ServerProcess
from registrar_testing.zookeeper import ZooKeeperEnsemble, four_letter

SERVICE = "fleet"
TTL = 10.0  # every backend's default TTL / session timeout: the default heartbeat is a third
CLK_TCK = 100  # os.sysconf("SC_CLK_TCK") on Linux


def _get(url: str, timeout: float = 2.0, data: bytes | None = None) -> str:
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=timeout) as r:
        return r.read().decode()


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process, in clock ticks (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def established(ports: set[int]) -> dict[int, int]:
    """Established TCP connections per local port (the server's side of each connection),
    from /proc/net/tcp and tcp6 (a JVM listens on a dual-stack socket)."""
    counts = dict.fromkeys(ports, 0)
    for sock in tcp_sockets():
        if sock.state == ESTABLISHED and sock.local_port in counts:
            counts[sock.local_port] += 1
    return counts


@dataclass
class Server:
    """One process of a cluster as the bench measures it. ``requests`` and ``sessions``
    return None when the server does not answer (frozen, cut off)."""
    name: str
    role: str
    process: ServerProcess
    port: int
    requests: Callable[[], float | None]
    sessions: Callable[[], int | None] = lambda: None
    freeze: Callable[[], None] = lambda: None
    thaw: Callable[[], None] = lambda: None

    def __post_init__(self) -> None:
        self._total: float | None = None
        self._last: float | None = None
        self.reads = 0  # counter reads that succeeded
        self.failed = 0  # and that failed (frozen, cut off, or a slow metrics endpoint)
        self.last_error = ""
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def sample(self) -> None:
        """Read the request counter and add what it grew by. A counter that went down was
        reset (a ZooKeeper follower that rejoins the quorum starts a new server object):
        all of its new value is new."""
        try:
            value = self.requests()
        except (OSError, ValueError, KeyError) as exc:
            with self._lock:
                self.failed += 1  # frozen or cut off: the next read catches up
                self.last_error = f"{type(exc).__name__}: {exc}"[:200]
            return
        if value is None:
            return
        with self._lock:
            self.reads += 1
            if self._last is None:
                self._total = 0.0
            else:
                self._total += value - self._last if value >= self._last else value
            self._last = value

    def follow(self, interval: float = 1.0) -> None:
        """Sample every ``interval`` in a thread of its own (a frozen server's read blocks
        only this thread), until close()."""
        def loop() -> None:
            while not self._stopped.wait(interval):
                self.sample()
        self.sample()
        threading.Thread(target=loop, daemon=True, name=f"sample-{self.name}").start()

    def close(self) -> None:
        self._stopped.set()

    def snapshot(self) -> dict:
        self.sample()
        with self._lock:
            req, reads, failed, error = self._total, self.reads, self.failed, self.last_error
        try:
            sessions = self.sessions()
        except (OSError, ValueError):
            sessions = None
        return {"cpu_ticks": cpu_ticks(self.process.pid) if self.process.running else None,
                "requests": req, "sessions": sessions, "reads": reads, "failed": failed,
                "last_error": error}


@dataclass
class Cluster:
    """A started registry: its servers, each pod's backend section, the watch targets (one
    per member, as consumers read them) and a follower to fault."""
    name: str
    servers: list[Server]
    sections: Callable[[int], dict]
    watch_targets: list[str]
    faulted: int  # index in servers of the follower the fault phases cut off or freeze
    fault_port: int
    healthy: Callable[[], bool]
    stop: Callable[[], None]
    sessions_label: str = "sessions"
    notes: list[str] = field(default_factory=list)


def _section(section: dict) -> dict:
    """The kit's backend section with the defaults the fleet runs at: TTL (and so the
    heartbeat) and request timeout left to the backend."""
    return {k: v for k, v in section.items() if k not in ("ttl", "session_timeout", "timeout")}


# -- etcd ---------------------------------------------------------------------

def _etcd_requests(endpoint: str) -> float:
    text = _get(endpoint + "/metrics")
    return sum(float(m) for m in re.findall(r"^grpc_server_started_total\{.*\} (\S+)$", text,
                                            re.MULTILINE))


def _etcd_leases(endpoint: str) -> int:
    doc = json.loads(_get(endpoint + "/v3/lease/leases", data=b"{}"))
    return len(doc.get("leases") or [])


def start_etcd(workdir: Path, pods_clients: int) -> Cluster:
    del pods_clients
    cluster = EtcdCluster(3, workdir / "etcd").start()
    leader = cluster.leader_index()
    follower = max(i for i in range(3) if i != leader)
    section = _section(etcd_setup(cluster, SERVICE, TTL).backend)
    servers = []
    for i, m in enumerate(cluster.members):
        ep = m.endpoint
        servers.append(Server(m.name, "leader" if i == leader else "follower", m.process,
                              m.client_port, lambda ep=ep: _etcd_requests(ep),
                              lambda ep=ep: _etcd_leases(ep), m.freeze, m.thaw))
    return Cluster("etcd", servers, lambda i: dict(section), list(cluster.endpoints), follower,
                   cluster.members[follower].client_port,
                   lambda: all(m.healthy() for m in cluster.members), cluster.stop, "leases")


# -- ZooKeeper ----------------------------------------------------------------

def _mntr(port: int) -> dict[str, str]:
    text = four_letter("127.0.0.1", port, "mntr", timeout=1.0)
    return dict(line.split("\t", 1) for line in text.splitlines() if "\t" in line)


def start_zookeeper(workdir: Path, pods_clients: int) -> Cluster:
    del pods_clients
    # maxClientCnxns caps connections per client IP (default 60): every pod here connects
    # from 127.0.0.1, each with 1 + 3 sessions. 0 lifts the cap (the launcher's extra_config).
    ensemble = ZooKeeperEnsemble(3, workdir / "zookeeper",
                                 extra_config={"maxClientCnxns": "0"}).start()
    leader = ensemble.wait_leader()
    follower = max(i for i in range(3) if i != leader)
    # The views are only read by the setup's `listed`, which the fleet does not use.
    section = _section(zookeeper_setup(ensemble, SERVICE, None, TTL).backend)
    servers = []
    for i, s in enumerate(ensemble.servers):
        port = s.client_port
        servers.append(Server(
            f"zk{s.sid}", "leader" if i == leader else "follower", s.process, port,
            lambda port=port: float(_mntr(port)["zk_packets_received"]),
            # Every server counts the sessions of its own connections in num_alive_connections;
            # global_sessions (all of the ensemble's) is the leader's figure.
            lambda port=port: int(_mntr(port).get("zk_global_sessions", 0)) or None,
            s.freeze, s.thaw))
    return Cluster("zookeeper", servers, lambda i: dict(section), list(ensemble.hosts), follower,
                   ensemble.servers[follower].client_port,
                   lambda: ensemble.wait_leader(10) is not None and all(
                       m is not None for m in ensemble.modes()),
                   ensemble.stop, "sessions",
                   [("maxClientCnxns=0 (ZooKeeper's default 60 per client IP: every pod is "
                     "127.0.0.1)")])


# -- Consul -------------------------------------------------------------------

_CONSUL_COUNT = re.compile(r"^(consul_http_\w+?)_count (\S+)$|^consul_rpc_request (\S+)$",
                           re.MULTILINE)


def _consul_requests(agent) -> float:
    text = agent.get("/v1/agent/metrics", format="prometheus").text
    total = 0.0
    for name, count, rpc in _CONSUL_COUNT.findall(text):
        if name and "agent_metrics" not in name:
            total += float(count)
        elif rpc:
            total += float(rpc)
    return total


def start_consul(workdir: Path, clients: int) -> Cluster:
    # limits: Consul accepts at most 200 HTTP connections per client IP (by default); here
    # every pod is 127.0.0.1, and with 200 pods the bench's own metrics reads were reset.
    cluster = ConsulCluster(workdir / "consul", servers=3, clients=clients, dns=False,
                            extra_config={"telemetry": {"prometheus_retention_time": "1h",
                                                        "disable_hostname": True},
                                          "limits": {"http_max_conns_per_client": 4096}})
    cluster.start()
    leader_port = int(cluster.servers[0].leader().rpartition(":")[2])
    ports = {a.name: json.loads((a.process.workdir / "config.json").read_text())["ports"]
             for a in cluster.agents}
    leader = next(i for i, s in enumerate(cluster.servers)
                  if ports[s.name]["server"] == leader_port)
    follower = max(i for i in range(3) if i != leader)
    base = _section(consul_setup(cluster, SERVICE, TTL).backend)
    servers = [Server(a.name, ("leader" if i == leader else "follower") if i < 3 else "client",
                      a.process, port_of(a.http_addr), lambda a=a: _consul_requests(a),
                      freeze=a.freeze, thaw=a.thaw)
               for i, a in enumerate(cluster.servers + cluster.clients)]

    def section(i: int) -> dict:
        return {**base, "address": cluster.clients[i % clients].http_addr}

    return Cluster("consul", servers, section, list(cluster.server_addrs), follower,
                   port_of(cluster.servers[follower].http_addr),
                   lambda: all(s.leader() for s in cluster.servers), cluster.stop,
                   "-", [(f"pods register at {clients} client agent(s), round robin; "
                          "observers: the 3 servers")])


STARTERS = {"etcd": start_etcd, "zookeeper": start_zookeeper, "consul": start_consul}

