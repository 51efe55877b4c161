"""Apache Curator's service discovery, as a Java probe: what a Curator
consumer reads from (and writes to) ZooKeeper. Needs a JDK and Debian's
Curator jars (scripts/install-zookeeper.sh)."""
from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from . import wait_until

PROBE_SOURCE = Path(__file__).resolve().parent / "java" / "CuratorProbe.java"
WATCH_SOURCE = Path(__file__).resolve().parent / "java" / "CuratorCacheWatch.java"
#: Compiled with each of them: the stdin hold both share.
HOLD_SOURCE = Path(__file__).resolve().parent / "java" / "StdinHold.java"
CURATOR_CLASSPATH = ":".join(f"/usr/share/java/{jar}.jar" for jar in (
    "curator-x-discovery", "curator-framework", "curator-client", "zookeeper",
    "zookeeper-jute", "guava", "jackson-databind", "jackson-core",
    "jackson-annotations", "slf4j-api", "slf4j-simple"))
# What Curator 5.4's default JsonInstanceSerializer writes: "compatible" mode,
# so no "enabled" field (readers default it to true).
CURATOR_FIELDS = {"name", "id", "address", "port", "sslPort", "payload",
                  "registrationTimeUTC", "serviceType", "uriSpec"}
# ServiceCache is built on Curator's recipes (CuratorCache).
WATCH_CLASSPATH = f"{CURATOR_CLASSPATH}:/usr/share/java/curator-recipes.jar"
JVM_ARGS = ["-Xmx64m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xshare:auto"]


def compile_probe(out_dir: Path) -> list[str]:
    """javac CuratorProbe into out_dir; return the argv prefix that runs it."""
    subprocess.run(["javac", "-Xlint:-path", "-cp", CURATOR_CLASSPATH, "-d", str(out_dir),
                    str(PROBE_SOURCE), str(HOLD_SOURCE)], check=True, timeout=120)
    return ["java", *JVM_ARGS, "-Dorg.slf4j.simpleLogger.defaultLogLevel=error",
            "-cp", f"{CURATOR_CLASSPATH}:{out_dir}", "CuratorProbe"]


def probe_list(probe: list[str], connect: str, base: str, service: str) -> list[dict]:
    """The instances of `service` under `base` as Curator's ServiceDiscovery lists them."""
    out = subprocess.run([*probe, "list", connect, base, service],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


def missing_curator() -> list[str]:
    """What the Curator watch needs and this machine lacks (jars, javac)."""
    missing = [jar for jar in WATCH_CLASSPATH.split(":") if not Path(jar).exists()]
    return missing + [tool for tool in ("java", "javac") if not shutil.which(tool)]


def compile_watch(out_dir: Path) -> list[str]:
    """javac CuratorCacheWatch into out_dir; return the argv prefix that runs
    it. Raises FileNotFoundError naming what is missing."""
    missing = missing_curator()
    if missing:
        raise FileNotFoundError(f"Curator's ServiceCache needs {', '.join(missing)}: "
                                "run scripts/install-zookeeper.sh")
    subprocess.run(["javac", "-Xlint:-path", "-cp", WATCH_CLASSPATH, "-d", str(out_dir),
                    str(WATCH_SOURCE), str(HOLD_SOURCE)], check=True, timeout=120)
    # Curator logs what it swallows (a payload it cannot read) at ERROR.
    return ["java", *JVM_ARGS, "-Dorg.slf4j.simpleLogger.defaultLogLevel=error",
            "-cp", f"{WATCH_CLASSPATH}:{out_dir}", "CuratorCacheWatch"]


class CacheWatch:
    """A running CuratorCacheWatch: Curator ServiceCaches of one service, one
    per payload class, in one JVM. ``events`` collects its JSON lines as they
    come (each with "t_us", the JVM's wall clock when the cache's listener
    ran); its stderr (Curator's own log) goes to ``log_path``."""

    def __init__(self, watch: list[str], connect: str, base: str, service: str,
                 classes: list[str], log_path: Path, hold: float = 120):
        self.log_path = log_path
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*watch, connect, base, service, ",".join(classes), str(int(hold))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,),
                                        daemon=True)
        self._reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._lock:
                self.events.append(json.loads(line))

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float,
                 what: str) -> dict[str, Any]:
        """The first event matching ``predicate``, waited for up to ``timeout``."""
        def found() -> dict[str, Any] | None:
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"CuratorCacheWatch exited ({self.proc.returncode}) "
                                     f"before {what}\n{self.log[-3000:]}")
            return next((e for e in self.snapshot() if predicate(e)), None)
        try:
            return wait_until(found, timeout, what)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\nevents: {self.snapshot()}\n{self.log[-3000:]}") from None

    def close(self) -> None:
        """Close its stdin: it closes its caches and exits."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._reader.join(5)


def listed(event: dict[str, Any]) -> set[str]:
    """The instance ids a watch event lists."""
    return {i["id"] for i in event.get("instances") or ()}


def wall_us() -> int:
    """This machine's wall clock in microseconds, comparable with "t_us"."""
    return time.time_ns() // 1000
