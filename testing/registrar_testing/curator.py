"""Apache Curator's service discovery, as a Java probe: what a Curator
consumer reads from (and writes to) ZooKeeper. Needs a JDK and Debian's
Curator jars (scripts/install-zookeeper.sh)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

PROBE_SOURCE = Path(__file__).resolve().parent / "java" / "CuratorProbe.java"
CURATOR_CLASSPATH = ":".join(f"/usr/share/java/{jar}.jar" for jar in (
    "curator-x-discovery", "curator-framework", "curator-client", "zookeeper",
    "zookeeper-jute", "guava", "jackson-databind", "jackson-core",
    "jackson-annotations", "slf4j-api", "slf4j-simple"))
# What Curator 5.4's default JsonInstanceSerializer writes: "compatible" mode,
# so no "enabled" field (readers default it to true).
CURATOR_FIELDS = {"name", "id", "address", "port", "sslPort", "payload",
                  "registrationTimeUTC", "serviceType", "uriSpec"}


def compile_probe(out_dir: Path) -> list[str]:
    """javac CuratorProbe into out_dir; return the argv prefix that runs it."""
    subprocess.run(["javac", "-Xlint:-path", "-cp", CURATOR_CLASSPATH, "-d", str(out_dir),
                    str(PROBE_SOURCE)], check=True, timeout=120)
    return ["java", "-Xmx64m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
            "-Xshare:auto", "-Dorg.slf4j.simpleLogger.defaultLogLevel=error",
            "-cp", f"{CURATOR_CLASSPATH}:{out_dir}", "CuratorProbe"]


def probe_list(probe: list[str], connect: str, base: str, service: str) -> list[dict]:
    """The instances of `service` under `base` as Curator's ServiceDiscovery lists them."""
    out = subprocess.run([*probe, "list", connect, base, service],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines()]
