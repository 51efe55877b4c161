"""Real ZooKeeper 3.8 servers (standalone or an ensemble) on 127.0.0.1, and
the fault helpers ZooKeeper tests share: per-server views, forced session
expiry, a simulated crash.

The JVMs are started directly from Debian's jars (scripts/install-zookeeper.sh)
with small heaps; readiness and roles come from the `srvr` four-letter word.
"""
from __future__ import annotations

import logging
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from kazoo.client import KazooClient
from kazoo.exceptions import ConnectionLoss, SessionExpiredError
from kazoo.handlers.threading import KazooTimeoutError

from . import free_ports, wait_until
from .process import ServerProcess

log = logging.getLogger(__name__)

ZK_JAR = "/usr/share/java/zookeeper.jar"
# Debian's zookeeper.jar has no SLF4J binding: without one the server logs nothing.
ZK_CLASSPATH = f"{ZK_JAR}:/usr/share/java/slf4j-simple.jar"
# The jar's manifest lists netty-handler/-transport/-buffer/-common but not
# what they need for TLS (SslHandler is a netty-codec decoder; the transport
# needs the resolver): all from Debian's libnetty-java.
NETTY_JARS = [f"/usr/share/java/netty-{name}.jar" for name in ("codec", "resolver")]
JVM_ARGS = ["-Xms16m", "-Xmx64m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            "-Dorg.slf4j.simpleLogger.showDateTime=true",
            "-Dorg.slf4j.simpleLogger.dateTimeFormat=HH:mm:ss.SSS"]
MAIN_CLASS = "org.apache.zookeeper.server.quorum.QuorumPeerMain"
SERVING_MODES = ("standalone", "leader", "follower", "observer")
_MODE_RE = re.compile(r"^Mode: (\w+)", re.MULTILINE)


def four_letter(host: str, port: int, cmd: str, timeout: float = 1.0) -> str:
    """Send a four-letter word (e.g. "srvr") and return the whole answer.

    `timeout` bounds the whole exchange: a frozen server accepts the
    connection (the kernel does) but never answers, which raises TimeoutError.
    """
    deadline = time.monotonic() + timeout
    chunks = []
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(cmd.encode("ascii"))
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{cmd} to {host}:{port}: no complete answer in {timeout}s")
            sock.settimeout(remaining)
            data = sock.recv(4096)
            if not data:  # the server closes after answering
                return b"".join(chunks).decode("utf-8", errors="replace")
            chunks.append(data)


@dataclass(frozen=True)
class ServerTLS:
    """TLS on each server's ``secureClientPort`` (Netty), from PKCS#12 files
    such as registrar_testing.certs.CertificateAuthority writes.
    ``client_auth``: "need" (mutual TLS), "want" or "none"."""
    keystore: str
    truststore: str
    password: str = "changeit"
    client_auth: str = "need"

    def config(self) -> dict[str, str]:
        return {"serverCnxnFactory": "org.apache.zookeeper.server.NettyServerCnxnFactory",
                "ssl.keyStore.location": self.keystore, "ssl.keyStore.password": self.password,
                "ssl.keyStore.type": "PKCS12",
                "ssl.trustStore.location": self.truststore,
                "ssl.trustStore.password": self.password, "ssl.trustStore.type": "PKCS12",
                "ssl.clientAuth": self.client_auth}


class ZooKeeperServer:
    """One server of a ZooKeeperEnsemble: its ports, its JVM, its role.
    With TLS, ``secure_port`` is its secureClientPort; ``client_port`` stays
    plaintext (four-letter words, ServerViews)."""

    def __init__(self, sid: int, client_port: int, quorum_port: int,
                 election_port: int, workdir: Path, secure_port: int | None = None):
        self.sid = sid
        self.client_port = client_port
        self.quorum_port = quorum_port
        self.election_port = election_port
        self.secure_port = secure_port
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.config_path = workdir / "zoo.cfg"
        classpath = ":".join([ZK_CLASSPATH, *NETTY_JARS]) if secure_port else ZK_CLASSPATH
        self.process = ServerProcess(
            f"zk{sid}", ["java", *JVM_ARGS, "-cp", classpath, MAIN_CLASS,
                         str(self.config_path)], workdir)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def secure_host(self) -> str:
        if self.secure_port is None:
            raise RuntimeError(f"zk{self.sid} has no TLS port (ZooKeeperEnsemble(tls=...))")
        return f"127.0.0.1:{self.secure_port}"

    def connections(self, timeout: float = 1.0) -> list[int]:
        """Session ids (as ints) of the clients connected to this server
        now, from the `cons` four-letter word."""
        text = four_letter("127.0.0.1", self.client_port, "cons", timeout)
        return [int(m, 16) for m in re.findall(r"\bsid=0x([0-9a-f]+)", text)]

    def mode(self, timeout: float = 1.0) -> str | None:
        """"standalone"/"leader"/"follower"/…, or None if not serving (down,
        frozen, or a follower without quorum)."""
        try:
            match = _MODE_RE.search(four_letter("127.0.0.1", self.client_port, "srvr", timeout))
        except OSError:
            return None
        return match.group(1) if match else None

    def wait_serving(self, timeout: float = 30) -> str:
        """Wait until `srvr` reports a serving mode; return it. Fails fast,
        with the log tail, if the JVM exits."""
        def serving() -> str | None:
            if not self.process.running:
                return "exited"  # ends the wait at once; raised below with the log tail
            mode = self.mode(timeout=0.5)
            return mode if mode in SERVING_MODES else None
        try:
            mode = wait_until(serving, timeout, f"zk{self.sid} serves", interval=0.05,
                              ignore=OSError)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n--- zk{self.sid} log tail ---\n"
                               f"{self.process.log_tail()}") from None
        if mode == "exited":
            raise RuntimeError(f"zk{self.sid} exited:\n{self.process.log_tail()}")
        return mode

    def kill(self) -> None:
        """SIGKILL: a crash (also a frozen server)."""
        self.process.kill()

    def restart(self, timeout: float = 30) -> str:
        """(Kill if running, then) start the JVM again with its old data and
        ports; return its mode once serving."""
        self.process.kill()
        self.process.start()
        return self.wait_serving(timeout)

    def freeze(self) -> None:
        self.process.freeze()

    def thaw(self) -> None:
        self.process.thaw()

    def rss_kib(self) -> int:
        """Resident set size of the JVM, from /proc (0 if not running)."""
        if not self.process.running:
            return 0
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0


class ZooKeeperEnsemble:
    """`size` ZooKeeper servers on loopback (size 1: standalone), each with its
    config, data and log under `base_dir/zk<sid>/`.

    `extra_config` adds or overrides zoo.cfg keys on every server; `tls`
    adds a secureClientPort to each (see `secure_hosts`).
    """

    def __init__(self, size: int, base_dir: Path, extra_config: dict[str, str] | None = None,
                 tls: ServerTLS | None = None):
        if size < 1:
            raise ValueError("size must be >= 1")
        self.size = size
        self.base_dir = Path(base_dir)
        self.extra_config = dict(extra_config or {})
        self.tls = tls
        self.servers: list[ZooKeeperServer] = []

    @property
    def hosts(self) -> list[str]:
        return [s.host for s in self.servers]

    @property
    def secure_hosts(self) -> list[str]:
        """host:port of every server's TLS port."""
        return [s.secure_host for s in self.servers]

    @property
    def connect_string(self) -> str:
        return ",".join(self.hosts)

    def _write_configs(self) -> None:
        per = 4 if self.tls else 3
        ports = free_ports(per * self.size)
        self.servers = [
            ZooKeeperServer(i + 1, *ports[per * i:per * i + 3], self.base_dir / f"zk{i + 1}",
                            secure_port=ports[per * i + 3] if self.tls else None)
            for i in range(self.size)]
        peers = [f"server.{s.sid}=127.0.0.1:{s.quorum_port}:{s.election_port}"
                 for s in self.servers] if self.size > 1 else []
        for s in self.servers:
            s.data_dir.mkdir(parents=True, exist_ok=True)
            (s.data_dir / "myid").write_text(f"{s.sid}\n")
            config = {
                "tickTime": "500", "initLimit": "10", "syncLimit": "5",
                "dataDir": str(s.data_dir), "clientPort": str(s.client_port),
                "clientPortAddress": "127.0.0.1", "admin.enableServer": "false",
                "4lw.commands.whitelist": "srvr,ruok,mntr,cons",
                # The default cap is 20 ticks (10 s here): clients asking for
                # longer sessions would be silently cut down to 10 s.
                "maxSessionTimeout": "60000",
                **({"secureClientPort": str(s.secure_port),
                    "secureClientPortAddress": "127.0.0.1", **self.tls.config()}
                   if self.tls else {}),
                **self.extra_config}
            s.config_path.write_text(
                "".join(f"{k}={v}\n" for k, v in config.items()) + "".join(f"{p}\n" for p in peers))

    def start(self, timeout: float = 30) -> ZooKeeperEnsemble:
        """Write configs, start every JVM, wait until all serve (an ensemble:
        exactly one leader). On failure kill them all and raise with log tails."""
        if self.servers and any(s.process.running for s in self.servers):
            raise RuntimeError("ensemble already started")
        if not Path(ZK_JAR).is_file():
            raise FileNotFoundError(f"{ZK_JAR} missing: run scripts/install-zookeeper.sh")
        began = time.monotonic()
        for attempt in (1, 2):
            self._write_configs()
            try:
                for s in self.servers:
                    s.process.start()
                deadline = began + timeout
                for s in self.servers:
                    s.wait_serving(max(0.1, deadline - time.monotonic()))
                if self.size > 1:
                    self.wait_leader(max(0.1, deadline - time.monotonic()))
                break
            except BaseException:
                tails = "\n".join(f"--- zk{s.sid} ---\n{s.process.log_tail(15)}"
                                  for s in self.servers)
                self.stop()
                # free_ports() cannot reserve a port until the JVM binds it.
                if attempt == 1 and "Address already in use" in tails:
                    log.warning("ZooKeeper port taken meanwhile; retrying with new ports")
                    continue
                log.error("ZooKeeper x%d failed to start; log tails:\n%s", self.size, tails)
                raise
        log.info("ZooKeeper x%d ready in %.2fs at %s", self.size,
                 time.monotonic() - began, self.connect_string)
        return self

    def modes(self) -> list[str | None]:
        """Every server's mode (None for down/frozen/not serving)."""
        return [s.mode(timeout=0.5) if s.process.running else None for s in self.servers]

    def leader_index(self) -> int | None:
        """Index in `servers` of the leader (or the standalone server), if any."""
        for i, mode in enumerate(self.modes()):
            if mode in ("leader", "standalone"):
                return i
        return None

    def wait_leader(self, timeout: float = 15) -> int:
        """Wait until exactly one server leads and a majority serves; return
        the leader's index."""
        def settled() -> tuple[int] | None:
            modes = self.modes()
            leaders = [i for i, m in enumerate(modes) if m in ("leader", "standalone")]
            serving = sum(m in SERVING_MODES for m in modes)
            return (leaders[0],) if len(leaders) == 1 and serving > self.size // 2 else None
        return wait_until(settled, timeout, "a single ZooKeeper leader is elected",
                          interval=0.05, ignore=OSError)[0]

    def stop(self) -> None:
        """SIGKILL every server (SIGTERM takes seconds); idempotent."""
        began = time.monotonic()
        for s in self.servers:
            s.process.kill()
        log.debug("ZooKeeper x%d stopped in %.3fs", self.size, time.monotonic() - began)

    def __enter__(self) -> ZooKeeperEnsemble:
        if not self.servers:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ServerViews:
    """One kazoo client per server, each connected to that server alone: a
    read through it is what a consumer connected there sees (no sync)."""

    def __init__(self, hosts: list[str], auth: str | None = None):
        self.clients: list[KazooClient] = []
        try:
            for host in hosts:
                client = KazooClient(hosts=host, timeout=10,
                                     auth_data=[("digest", auth)] if auth else None)
                client.start(timeout=10)
                self.clients.append(client)
        except BaseException:
            self.close()
            raise

    def stat(self, index: int, path: str, timeout: float = 5.0):
        """exists() on one server, riding out a reconnection (bounded)."""
        end = time.monotonic() + timeout
        while True:
            try:
                return self.clients[index].exists_async(path).get(timeout=1)
            except (ConnectionLoss, SessionExpiredError, KazooTimeoutError):
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)

    def exists(self, path: str, servers=None) -> list[bool]:
        indexes = range(len(self.clients)) if servers is None else servers
        return [self.stat(i, path) is not None for i in indexes]

    def close(self) -> None:
        for client in self.clients:
            client.stop()
            client.close()


def expire_session(connect_string: str, client: KazooClient) -> None:
    """Expire a live session the way kazoo's own tests did: a second client
    joins it with its id and password, then closes it."""
    other = KazooClient(hosts=connect_string, client_id=client.client_id, timeout=10)
    other.start(timeout=10)
    other.stop()
    other.close()


def crash_session(client: KazooClient) -> None:
    """What SIGKILL leaves behind: the TCP connection closes, no
    closeSession is sent, and the session lives on in the ensemble until it
    expires. kazoo has no such call, and its stop() closes the session:
    flag the client stopped (its connection loop then ends instead of
    reconnecting) and cut the socket under it."""
    client._stopped.set()
    client._connection._socket.shutdown(socket.SHUT_RDWR)
