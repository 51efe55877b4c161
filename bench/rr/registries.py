"""The three registries of the rolling-restart bench, started with the
testing kit's launchers, and what each strategy needs to know of them:
where pods register, which ONE member the consumers watch, the registry's
own command line tool for the preStop hook of the "sleep" strategy, the
registrar backend section, and how to clear the service between blocks."""
from __future__ import annotations

import base64
import json
import logging
import shlex
import shutil
import urllib.request
from pathlib import Path

from registrar_testing.consul import ConsulCluster, consul_binary
from registrar_testing.etcd import EtcdCluster
from registrar_testing.zookeeper import ZooKeeperEnsemble

SERVICE = "web"
ZKCLI = "/usr/share/zookeeper/bin/zkCli.sh"  # Debian's zookeeper package

log = logging.getLogger(__name__)


def _http(method: str, url: str, body: dict | None = None, timeout: float = 5.0) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


class Registry:
    name: str

    def start(self, workdir: Path) -> None: ...
    def stop(self) -> None: ...
    def wrapper_target(self) -> str: ...
    def consumer_target(self) -> str: ...
    def deregister_command(self, pod_id: str, addr: str) -> str: ...
    def backend_section(self) -> dict: ...
    def clear(self) -> None: ...
    def describe(self) -> str: ...


class Etcd(Registry):
    name = "etcd"

    def start(self, workdir: Path) -> None:
        self.cluster = EtcdCluster(3, workdir / "etcd")
        self.cluster.start()
        leader = self.cluster.leader_index()
        # The consumers read the last follower: a follower applies a removal
        # after the leader does, and most consumers are on followers.
        self.watched = max(i for i in range(3) if i != leader)
        self.leader = leader

    def stop(self) -> None:
        if hasattr(self, "cluster"):
            self.cluster.stop()

    def wrapper_target(self) -> str:
        return ",".join(self.cluster.endpoints)

    def consumer_target(self) -> str:
        return self.cluster.endpoints[self.watched]

    def deregister_command(self, pod_id: str, addr: str) -> str:
        endpoints = ",".join(self.cluster.endpoints)
        return (f"ETCDCTL_API=3 etcdctl --endpoints={endpoints} "
                f"del {shlex.quote(f'services/{SERVICE}/{addr}')}")

    def backend_section(self) -> dict:
        return {"type": "etcd", "endpoints": self.cluster.endpoints}

    def clear(self) -> None:
        key = f"services/{SERVICE}/".encode()
        _http("POST", self.cluster.endpoints[0] + "/v3/kv/deleterange", {
            "key": base64.b64encode(key).decode(),
            "range_end": base64.b64encode(key[:-1] + bytes([key[-1] + 1])).decode()})

    def describe(self) -> str:
        return (f"etcd: 3 members, leader etcd{self.leader}; consumers watch "
                f"etcd{self.watched} (a follower)")


class ZooKeeper(Registry):
    name = "zookeeper"

    def start(self, workdir: Path) -> None:
        if not shutil.which(ZKCLI):
            raise FileNotFoundError(f"{ZKCLI} missing: run scripts/install-zookeeper.sh")
        self.ensemble = ZooKeeperEnsemble(3, workdir / "zookeeper")
        self.ensemble.start()
        leader = self.ensemble.wait_leader()
        self.watched = max(i for i in range(3) if i != leader)
        self.leader = leader
        from kazoo.client import KazooClient

        self.admin = KazooClient(hosts=self.ensemble.connect_string, timeout=10)
        self.admin.start(timeout=10)

    def stop(self) -> None:
        admin = getattr(self, "admin", None)
        if admin is not None:
            admin.stop()
            admin.close()
        if hasattr(self, "ensemble"):
            self.ensemble.stop()

    def wrapper_target(self) -> str:
        return self.ensemble.connect_string

    def consumer_target(self) -> str:
        return self.ensemble.hosts[self.watched]

    def deregister_command(self, pod_id: str, addr: str) -> str:
        # zkCli.sh starts a JVM (~0.6 s here); its chatter goes to the hook's output.
        return (f"{ZKCLI} -server {self.ensemble.connect_string} "
                f"delete {shlex.quote(f'/services/{SERVICE}/{pod_id}')} >/dev/null 2>&1")

    def backend_section(self) -> dict:
        return {"type": "zookeeper", "hosts": self.ensemble.hosts}

    def clear(self) -> None:
        from kazoo.exceptions import NoNodeError

        path = f"/services/{SERVICE}"
        try:
            children = self.admin.get_children(path)
        except NoNodeError:
            return
        for child in children:  # another session's ephemeral node may be deleted
            try:
                self.admin.delete(f"{path}/{child}")
            except NoNodeError:
                pass

    def describe(self) -> str:
        return (f"ZooKeeper: 3 servers, leader zk{self.leader + 1}; consumers watch "
                f"zk{self.watched + 1} (a follower); preStop tool {ZKCLI}")


class Consul(Registry):
    name = "consul"

    def start(self, workdir: Path) -> None:
        self.binary = consul_binary()
        self.cluster = ConsulCluster(workdir / "consul", servers=3, clients=1)
        self.cluster.start()
        leader = self.cluster.servers[0].leader()  # "127.0.0.1:<server port>"
        port = int(leader.rpartition(":")[2])
        self.leader = next((i for i, s in enumerate(self.cluster.servers)
                            if self._server_port(s) == port), 0)
        self.watched = max(i for i in range(3) if i != self.leader)

    @staticmethod
    def _server_port(agent) -> int | None:
        try:
            config = json.loads((agent.process.workdir / "config.json").read_text())
            return config["ports"]["server"]
        except (OSError, ValueError, KeyError):
            return None

    def stop(self) -> None:
        if hasattr(self, "cluster"):
            self.cluster.stop()

    def wrapper_target(self) -> str:
        return self.cluster.client_addr

    def consumer_target(self) -> str:
        return self.cluster.server_addrs[self.watched]

    def deregister_command(self, pod_id: str, addr: str) -> str:
        return (f"CONSUL_HTTP_ADDR={self.cluster.client_addr} {shlex.quote(self.binary)} "
                f"services deregister -id={shlex.quote(pod_id)}")

    def backend_section(self) -> dict:
        return {"type": "consul", "address": self.cluster.client_addr,
                "observers": self.cluster.server_addrs}

    def clear(self) -> None:
        agent = self.cluster.client_addr
        services = json.loads(_http("GET", agent + "/v1/agent/services"))
        for sid, svc in services.items():
            if svc.get("Service") == SERVICE:
                _http("PUT", f"{agent}/v1/agent/service/deregister/{sid}")

    def describe(self) -> str:
        return (f"Consul: 3 servers + 1 client agent (pods register there), leader "
                f"consul-server-{self.leader}; consumers watch consul-server-{self.watched} "
                f"(a follower, ?passing&stale)")


REGISTRIES = {"etcd": Etcd, "zookeeper": ZooKeeper, "consul": Consul}
