"""A real etcd cluster (Debian's etcd 3.4) on 127.0.0.1 for tests and benchmarks."""
from __future__ import annotations

import atexit
import base64
import functools
import itertools
import json
import logging
import os
import shutil
import subprocess
import time
import urllib.request
import weakref
from pathlib import Path

from . import free_ports
from .process import ServerProcess

log = logging.getLogger(__name__)

ETCD_BIN = shutil.which("etcd") or "/usr/bin/etcd"
_cluster_seq = itertools.count()
# Members run in their own sessions, so Ctrl-C does not reach them: kill leftovers at exit.
_live_clusters: weakref.WeakSet[EtcdCluster] = weakref.WeakSet()
atexit.register(lambda: [c.stop() for c in list(_live_clusters)])


@functools.cache
def _supports_no_fsync() -> bool:
    # 3.4.10+ accepts --unsafe-no-fsync although `etcd --help` does not list it.
    probe = subprocess.run([ETCD_BIN, "--unsafe-no-fsync", "--version"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return probe.returncode == 0


def _post(endpoint: str, path: str, body: dict, timeout: float = 2.0) -> dict:
    req = urllib.request.Request(endpoint + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def kv_get_serializable(endpoint: str, key: str | bytes,
                        timeout: float = 2.0) -> tuple[int, bool, int | None]:
    """This member's own view of `key`: (header revision, present, lease id or None)."""
    raw = key.encode() if isinstance(key, str) else key
    resp = _post(endpoint, "/v3/kv/range",
                 {"key": base64.b64encode(raw).decode(), "serializable": True}, timeout)
    kvs = resp.get("kvs") or []
    # The JSON gateway omits proto3 zero values and encodes 64-bit ints as strings.
    lease = int(kvs[0].get("lease", 0)) if kvs else 0
    return int(resp["header"]["revision"]), bool(kvs), lease or None


class EtcdMember:
    """One member of an EtcdCluster: its ports, data dir and process."""

    def __init__(self, cluster: EtcdCluster, name: str, client_port: int, peer_port: int):
        self.cluster = cluster
        self.name = name
        self.client_port = client_port
        self.peer_port = peer_port
        self.workdir = cluster.base_dir / name
        self.data_dir = self.workdir / "data"
        # etcd reads ETCD_* variables as flags: keep the caller's environment out.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        self.process = ServerProcess(name, self._argv("new"), self.workdir, env=env)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def _argv(self, state: str) -> list[str]:
        argv = [
            ETCD_BIN, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.cluster.initial_cluster,
            "--initial-cluster-state", state, "--initial-cluster-token", self.cluster.token,
            "--logger=zap", "--log-level=warn",
            "--heartbeat-interval=100", "--election-timeout=1000",
            # 3.4 defaults to 100000 raft entries kept in memory between snapshots.
            "--snapshot-count=10000",
        ]
        if _supports_no_fsync():
            argv.append("--unsafe-no-fsync")
        return argv

    def healthy(self, timeout: float = 0.5) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/health", timeout=timeout) as resp:
                return json.loads(resp.read()).get("health") == "true"
        except (OSError, ValueError):
            return False

    def kill(self) -> None:
        self.process.kill()

    def restart(self, timeout: float = 20) -> None:
        """Start again on the same data dir (killing it first if running), wait healthy."""
        self.process.kill()
        self.process.argv = self._argv("existing")
        self.process.start()
        _wait_healthy([self], timeout)

    def freeze(self) -> None:
        self.process.freeze()

    def thaw(self) -> None:
        self.process.thaw()

    def __repr__(self) -> str:
        return f"<EtcdMember {self.name} {self.endpoint} running={self.process.running}>"


def _wait_healthy(members: list[EtcdMember], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(members)
    while pending:
        for m in list(pending):
            if not m.process.running:
                raise RuntimeError(f"etcd member {m.name} exited with code "
                                   f"{m.process.proc.returncode}:\n{m.process.log_tail()}")
            if m.healthy(timeout=max(0.05, min(0.25, deadline - time.monotonic()))):
                pending.remove(m)
        if pending and time.monotonic() >= deadline:
            tails = "\n".join(f"--- {m.name} ({m.endpoint}) ---\n{m.process.log_tail()}"
                              for m in pending)
            raise RuntimeError(f"etcd members not healthy after {timeout}s:\n{tails}")
        if pending:
            time.sleep(0.02)


class EtcdCluster:
    """`size` etcd members on 127.0.0.1 with free ports and data under `base_dir`.

    Use as a context manager, or call start() and stop(). stop() SIGKILLs every
    member: SIGTERM to all at once can hang on leader hand-over.
    """

    def __init__(self, size: int, base_dir: Path):
        if size < 1:
            raise ValueError("size must be >= 1")
        self.size = size
        self.base_dir = Path(base_dir)
        self.token = f"registrar-{os.getpid()}-{next(_cluster_seq)}-{os.urandom(3).hex()}"
        self._layout()

    def _layout(self) -> None:
        ports = free_ports(2 * self.size)
        names = [f"etcd{i}" for i in range(self.size)]
        self.initial_cluster = ",".join(
            f"{name}=http://127.0.0.1:{ports[2 * i + 1]}" for i, name in enumerate(names))
        self.members = [EtcdMember(self, name, ports[2 * i], ports[2 * i + 1])
                        for i, name in enumerate(names)]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self, timeout: float = 20, attempts: int = 3) -> EtcdCluster:
        """Start every member and wait until all report healthy."""
        t0 = time.monotonic()
        _live_clusters.add(self)
        for attempt in range(1, attempts + 1):
            try:
                for m in self.members:
                    m.process.start()
                _wait_healthy(self.members, timeout)
                break
            except BaseException as exc:
                self.stop()
                # A free port can be taken (e.g. as some client's ephemeral port)
                # before etcd binds it: retry on fresh ports and fresh data dirs.
                if attempt == attempts or not isinstance(exc, Exception) or not any(
                        "address already in use" in m.process.log_tail() for m in self.members):
                    raise
                log.warning("etcd port clash, retrying on new ports (attempt %d)", attempt)
                for m in self.members:
                    shutil.rmtree(m.workdir, ignore_errors=True)
                self._layout()
        log.info("etcd cluster of %d healthy in %.2fs: %s", self.size,
                 time.monotonic() - t0, ",".join(self.endpoints))
        return self

    def leader_index(self, timeout: float = 0.5) -> int | None:
        """Index of the member that reports itself leader, or None if none does."""
        for i, m in enumerate(self.members):
            if not m.process.running:
                continue
            try:
                status = _post(m.endpoint, "/v3/maintenance/status", {}, timeout)
            except (OSError, ValueError):
                continue
            if status.get("leader") and status["leader"] == status["header"].get("member_id"):
                return i
        return None

    def stop(self) -> None:
        """SIGKILL and reap every member; safe to call more than once."""
        for m in self.members:
            try:
                m.process.kill()
            except Exception:  # noqa: BLE001 - keep tearing the others down
                log.exception("could not kill etcd member %s", m.name)

    def __enter__(self) -> EtcdCluster:
        if not any(m.process.running for m in self.members):
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
