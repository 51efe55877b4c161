"""A real `registrar agent` process and the registries' own views of its
entry, for fault tests and benchmarks: the agent may run under a group id
of its own, so that nftables (faults.Blackhole(gid=...)) cuts off the agent
alone while the test keeps reading the servers; ReadySampler checks that
/readyz never says ready while no member lists the entry."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from . import free_port
from .consul import passing_ids
from .etcd import kv_get_serializable
from .zookeeper import ServerViews

#: The group id agents run under in fault tests: what nftables rules match.
AGENT_GID = 4714
POD_IP = "10.20.30.40"
POD_NAME = "truth-pod"


def port_of(address: str) -> int:
    if "://" not in address:
        address = "tcp://" + address
    return urlsplit(address).port


@dataclass
class Setup:
    """One registry as a fault test uses it: the agent's backend section,
    the ports the agent talks to, whether any member lists the entry (as
    consumers read it), the members' addresses, and ``listed_on(i)``:
    whether member i lists it (raises if that member does not answer)."""
    name: str
    backend: dict
    ports: list[int]
    listed_on: Callable[[int], bool]
    members: list[str] = field(default_factory=list)

    def listed(self) -> bool:
        return any(self.listed_on(i) for i in range(len(self.members)))

    def listed_by(self, members) -> bool:
        """Whether any of these members (indexes) lists the entry."""
        return any(self.listed_on(i) for i in members)


def etcd_setup(cluster, service: str, ttl: float = 3.0) -> Setup:
    key = f"services/{service}/{POD_IP}:8080"
    endpoints = list(cluster.endpoints)
    return Setup("etcd", {"type": "etcd", "endpoints": endpoints, "ttl": f"{ttl:g}s",
                          "timeout": "1s"},
                 [port_of(e) for e in endpoints],
                 lambda i: bool(kv_get_serializable(endpoints[i], key, timeout=1)[1]), endpoints)


def zookeeper_setup(ensemble, service: str, views: ServerViews, ttl: float = 3.0) -> Setup:
    path = f"/services/{service}/{POD_NAME}"
    return Setup("zookeeper", {"type": "zookeeper", "hosts": ensemble.hosts,
                               "session_timeout": f"{ttl:g}s", "timeout": "1s"},
                 [port_of(h) for h in ensemble.hosts],
                 lambda i: views.exists(path, [i])[0], list(ensemble.hosts))


def consul_setup(cluster, service: str, ttl: float = 3.0) -> Setup:
    servers = list(cluster.server_addrs)
    return Setup("consul", {"type": "consul", "address": cluster.client_addr,
                            "observers": servers, "ttl": f"{ttl:g}s", "timeout": "1s"},
                 [port_of(a) for a in [cluster.client_addr, *servers]],
                 lambda i: POD_NAME in passing_ids(servers[i], service), servers)


class Agent:
    """`registrar agent` as a child process (under ``gid`` if given), with a
    control server on a free port and its log in a file.

    By default it has no app (``health: false``, port 8080) and runs as
    POD_NAME/POD_IP above. A fleet gives each agent its own ``port`` and
    ``health`` gate, ``env`` (added to and overriding the environment:
    POD_NAME, POD_IP, PYTHONPATH), ``backend`` a list of sections to
    register in several registries, and a ``cwd`` other than the work tree
    when PYTHONPATH must win over it (the current directory comes first)."""

    def __init__(self, tmp_path: Path, service: str, backend: dict | list[dict],
                 gid: int | None = AGENT_GID, *, port: int = 8080,
                 health: dict | bool = False, env: dict[str, str] | None = None,
                 cwd: Path | None = None, **stop):
        self.control = f"127.0.0.1:{free_port()}"
        config = tmp_path / "agent.yaml"
        config.write_text(yaml.safe_dump({
            "service": {"name": service, "port": port},
            "backends": backend if isinstance(backend, list) else [backend],
            "stop": {"grace_period": "10s", "safety_margin": "1s", **stop},
            "control": {"listen": self.control},
            "health": health,  # False: no app here, register at once
        }))
        self.log_path = tmp_path / "agent.log"
        env = {**os.environ, "POD_NAME": POD_NAME, "POD_IP": POD_IP, **(env or {})}
        for name in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN"):
            env.pop(name, None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "registrar", "agent", "--config", str(config)],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                group=gid, cwd=cwd)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def readyz(self, timeout: float = 0.3) -> int | None:
        try:
            with urllib.request.urlopen(f"http://{self.control}/readyz", timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None  # frozen, or not up yet

    def terminate(self, timeout: float = 15) -> float:
        """SIGTERM; seconds until it exited."""
        began = time.monotonic()
        self.proc.send_signal(signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=timeout)
        return time.monotonic() - began

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)


class ReadySampler:
    """Every 50 ms: listed?, /readyz, listed? A violation is a 200 with no
    member listing the entry on both sides of it."""

    def __init__(self, agent: Agent, listed: Callable[[], bool]):
        self.agent, self.listed = agent, listed
        self.samples: list[tuple[float, bool, int | None, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _listed(self) -> bool | None:
        try:
            return bool(self.listed())
        except Exception:  # noqa: BLE001 - a read that failed proves nothing
            return None

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            before = self._listed()
            code = self.agent.readyz()
            after = self._listed()
            self.samples.append((time.monotonic(), before is not False, code, after is not False))

    def __enter__(self) -> ReadySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def violations(self) -> list:
        return [s for s in self.samples if s[2] == 200 and not s[1] and not s[3]]

    def saw_unlisted(self) -> bool:
        """Whether some sample found no member listing the entry (on either
        side of an answer that was not 200: no answer while frozen counts)."""
        return any((not s[1] or not s[3]) and s[2] != 200 for s in self.samples)


