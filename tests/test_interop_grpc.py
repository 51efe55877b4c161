"""Interop with gRPC-go's own etcd resolver: a Go client built from Debian's
packaged sources (golang-etcd-server-dev 3.4.23, golang-google-grpc-dev 1.33.3)
dials etcd:///services/<name>, the gRPC convention, and must see the pod a real
`registrar agent` registers, then see it gone before the agent exits, under
both of grpc-go's built-in balancers. round_robin is the one that panicked on
a Metadata that is a JSON object (a Go map is no map key).

The Go program (tests/interop/grpc_resolver/main.go) is built once and cached
in $REGISTRAR_CACHE (~/.cache/registrar), keyed by its source and the
toolchain's versions: a cold build costs ~30 s of CPU (26-76 s of wall time
measured on two cores shared with other work), a cached one nothing. Go and the
sources come from scripts/install-go.sh (./dev test runs it)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

SOURCE = Path(__file__).parent / "interop" / "grpc_resolver" / "main.go"
GOPATH = Path("/usr/share/gocode")
# What the program imports, in the Debian packages named beside them.
NEEDED = {GOPATH / "src/go.etcd.io/etcd/clientv3/naming/resolver": "golang-etcd-server-dev",
          GOPATH / "src/google.golang.org/grpc/balancer/roundrobin": "golang-google-grpc-dev"}
POD_IP, PORT = "10.20.30.40", 8080


def _toolchain() -> str:
    """The go binary; fail (not skip) where scripts/install-go.sh would
    install what is missing; skip only where it cannot (no apt-get)."""
    go = shutil.which("go") or ("/usr/bin/go" if os.access("/usr/bin/go", os.X_OK) else None)
    missing = ([] if go else ["golang-go"]) + [pkg for path, pkg in NEEDED.items()
                                                 if not path.is_dir()]
    if missing:
        if not shutil.which("apt-get"):
            pytest.skip(f"needs Debian's {', '.join(missing)} and this machine has no apt-get")
        pytest.fail(f"missing {', '.join(missing)}: run scripts/install-go.sh as root "
                    "(./dev test installs them)", pytrace=False)
    return go


@pytest.fixture(scope="session")
def grpc_resolver() -> str:
    """Path of the built Go program, from the cache when its inputs did not
    change (main.go, the go version, the grpc and etcd sources' versions).
    The cache is the project's ($REGISTRAR_CACHE, default ~/.cache/registrar,
    where Consul's binary is kept too), so a fresh checkout reuses it; Go's
    build cache sits beside it, so an edited main.go rebuilds in seconds."""
    go = _toolchain()
    cache = Path(os.environ.get("REGISTRAR_CACHE") or Path.home() / ".cache" / "registrar")
    root = cache / "grpc_resolver"
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOPATH": str(GOPATH), "GO111MODULE": "off", "CGO_ENABLED": "0",
           "GOCACHE": str(root / "gocache")}
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(subprocess.run([go, "version"], capture_output=True, text=True,
                                 check=True).stdout.encode())
    for versions in ("src/google.golang.org/grpc/version.go",
                     "src/go.etcd.io/etcd/version/version.go"):
        path = GOPATH / versions
        digest.update(path.read_bytes() if path.exists() else versions.encode())
    binary = root / f"grpc_resolver-{digest.hexdigest()[:16]}"
    if not binary.exists():
        partial = binary.with_suffix(".partial")
        started = time.monotonic()
        built = subprocess.run([go, "build", "-o", str(partial), SOURCE.name], cwd=SOURCE.parent,
                               env=env, capture_output=True, text=True, timeout=300,
                               check=False)
        if built.returncode != 0:
            pytest.fail(f"go build of {SOURCE.name} failed (GOPATH={GOPATH}, "
                        f"GO111MODULE=off):\n{built.stderr}", pytrace=False)
        partial.replace(binary)
        print(f"built {binary.name} in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return str(binary)


class Resolver:
    """The Go client as a process; its JSON lines collected by a thread."""

    def __init__(self, binary: str, endpoints: list[str], target: str, balancer: str,
                 stderr_path: Path):
        self.lines: list[dict] = []
        self._changed = threading.Condition()
        self._stderr_path = stderr_path
        with open(stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [binary, "-endpoints", ",".join(endpoints), "-target", target,
                 "-balancer", balancer],
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(json.loads(line))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, predicate, timeout: float, what: str) -> dict:
        """The first line matching ``predicate``, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = next((line for line in self.lines if predicate(line)), None)
                if match is not None:
                    return match
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    pytest.fail(f"gRPC client: no {what} within {timeout:g} s; "
                                f"{self.report()}", pytrace=False)
                self._changed.wait(min(left, 0.5))

    def report(self) -> str:
        state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        err = self._stderr_path.read_text(errors="replace")[-3000:]
        return f"client {state}; lines {self.lines}; stderr:\n{err}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._reader.join(timeout=5)


def listed(line: dict, hostport: str) -> list[dict]:
    return [a for a in line.get("addresses") or [] if a["addr"] == hostport]


@pytest.mark.parametrize("balancer", ["pick_first", "round_robin"])
def test_grpc_go_resolver_sees_the_pod_come_and_go_before_exit(
        etcd_cluster, grpc_resolver, tmp_path, balancer):
    service = f"grpc-{uuid.uuid4().hex[:8]}"
    pod, hostport = f"pod-{uuid.uuid4().hex[:6]}", f"{POD_IP}:{PORT}"
    client = Resolver(grpc_resolver, etcd_cluster.endpoints, f"services/{service}", balancer,
                      tmp_path / "client.stderr")
    config = {"service": {"name": service, "id": pod, "address": POD_IP, "port": PORT,
                          "tags": ["grpc"], "meta": {"version": "1"}},
              "backends": [{"type": "etcd", "endpoints": etcd_cluster.endpoints,
                            "ttl": "3s", "timeout": "1s"}],  # default prefix and metadata
              "stop": {"grace_period": "10s", "propagation_timeout": "5s"},
              "control": {"listen": None},
              "health": False}  # no app listens here: register at once
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp_path / "agent.log"
    agent = None
    try:
        client.wait_for(lambda line: "watching" in line, 20, "watch")
        with open(log_path, "wb") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "registrar", "agent", "--config", str(path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        added = client.wait_for(lambda line: listed(line, hostport), 20, f"update listing {pod}")
        (address,) = listed(added, hostport)
        # A JSON string: hashable for the balancer, our id/tags/meta inside.
        assert isinstance(address["metadata"], str), address
        assert json.loads(address["metadata"]) == {"id": pod, "tags": ["grpc"],
                                                   "meta": {"version": "1"}}
        assert agent.poll() is None, log_path.read_text()
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=15)
        exited_us = time.time_ns() // 1000  # at or after the exit
        assert code == 0, log_path.read_text()
        gone = client.wait_for(lambda line: "addresses" in line and line["t_us"] > added["t_us"]
                               and not listed(line, hostport), 10, f"update without {pod}")
        assert gone["t_us"] < exited_us, (
            f"the client saw the removal {(gone['t_us'] - exited_us) / 1000:.1f} ms after the "
            f"agent exited; {client.report()}")
        # Until the delete the client saw one address, never changed (the drain
        # rewrote nothing: a new Metadata would be a new connection to the pod).
        seen = [a for line in client.lines for a in listed(line, hostport)]
        assert all(a == address for a in seen), seen
        assert client.proc.poll() is None, client.report()  # no panic in the balancer
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait(timeout=10)
        client.close()
