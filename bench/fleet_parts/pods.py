"""The pods of the fleet bench: one `registrar agent` each (the testing kit's Agent, under the
kit's AGENT_GID so that nftables can cut off the agents alone), its app a listening socket
held by ports.py, and what the bench reads of each agent from /proc."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from registrar_testing import wait_until
from registrar_testing.agents import Agent

from .registries import CLK_TCK, SERVICE, cpu_ticks

HERE = Path(__file__).resolve().parent
STOP_TIMEOUT = 45.0  # the default grace period is 30 s: a stop never takes longer


class Apps:
    """ports.py: every pod's app, one listening socket each, in one process."""

    def __init__(self, count: int):
        self.proc = subprocess.Popen([sys.executable, str(HERE / "ports.py"), str(count)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("ports.py exited before listing its ports")
        self.ports: list[int] = json.loads(line)
        self._lock = threading.Lock()

    def close(self, port: int) -> None:
        """The app of a stopping pod stops listening (after its preStop hook returned)."""
        with self._lock:
            self.proc.stdin.write(f"close {port}\n")
            self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def source_env(source: Path | None) -> dict[str, str]:
    """PYTHONPATH that makes the agents import registrar, its backends and the kit from
    ``source`` (a git worktree of another version): the editable installs' entry points
    name modules, which resolve through PYTHONPATH first. The agents run in a directory of
    their own, so the work tree (the current directory) does not come first."""
    if source is None:
        return {}
    dirs = [source, *sorted(p for p in (source / "backends").iterdir() if p.is_dir()),
            source / "testing"]
    old = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": os.pathsep.join([*(str(d) for d in dirs), *([old] if old else [])])}


class Pod:
    """One pod: the agent, its app's port, and the times of its stop."""

    def __init__(self, index: int, port: int, workdir: Path, sections: list[dict],
                 env: dict[str, str]):
        self.index, self.port = index, port
        self.name = f"pod-{index:03d}"
        workdir.mkdir(parents=True)
        self.agent = Agent(workdir, SERVICE, sections, port=port, health={}, cwd=workdir,
                           env={"POD_NAME": self.name, "POD_IP": "127.0.0.1", **env},
                           grace_period="30s", safety_margin="2s")
        self.addr = f"127.0.0.1:{port}"
        self.trigger: float | None = None
        self.exited: float | None = None
        self.report: dict | None = None
        self.error: str | None = None
        self.stop_cpu_s: float | None = None

    @property
    def pid(self) -> int:
        return self.agent.proc.pid

    @property
    def alive(self) -> bool:
        return self.agent.proc.poll() is None

    def stop(self, apps: Apps) -> None:
        """What the kubelet does to a pod whose app's preStop hook is `registrar prestop`:
        the hook (POST /prestop) returns once the pod is out of the registry; then the app
        stops listening and the agent gets SIGTERM; it exits."""
        self.trigger = time.monotonic()
        cpu0 = self.cpu()
        try:
            req = urllib.request.Request(f"http://{self.agent.control}/prestop", data=b"",
                                         method="POST")
            try:
                with urllib.request.urlopen(req, timeout=STOP_TIMEOUT) as resp:
                    body = resp.read()
            except urllib.error.HTTPError as exc:  # 503: the stop is incomplete
                body = exc.read()
            self.report = json.loads(body)
        except (OSError, ValueError) as exc:
            self.error = f"/prestop: {exc!r}"
        cpu1 = self.cpu()
        if cpu0 is not None and cpu1 is not None:
            self.stop_cpu_s = (cpu1 - cpu0) / CLK_TCK  # the stop's own work, to /prestop's answer
        apps.close(self.port)
        self.agent.proc.send_signal(signal.SIGTERM)
        try:
            self.agent.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.error = (self.error or "") + " did not exit; killed"
            self.agent.kill()
        self.exited = time.monotonic()

    def memory(self) -> dict[str, int]:
        """kB: VmRSS and its anonymous / file / shared parts (status), Pss (smaps_rollup):
        RSS counts the pages the agents share (the interpreter, the libraries' .so files)
        once per agent, PSS divides them among the processes that map them."""
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1])
        for line in Path(f"/proc/{self.pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1])
        return out

    def cpu(self) -> int | None:
        return cpu_ticks(self.pid)

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.agent.log.splitlines()[-lines:])


def start_pods(first: int, count: int, apps: Apps, workdir: Path, sections, env: dict[str, str],
               batch: int, progress, pods: list[Pod]) -> None:
    """Start ``count`` pods, ``batch`` at a time; each batch is ready (/readyz 200: the
    app's port passed the gate and every backend holds the entry) before the next starts.
    Each pod goes into ``pods`` as it starts, so that the caller stops it even when a
    later one fails."""
    retries: dict[int, int] = {}
    for at in range(first, first + count, batch):
        began = time.monotonic()
        group: list[Pod] = []
        for i in range(at, min(at + batch, first + count)):
            group.append(Pod(i, apps.ports[i], workdir / f"pod-{i:03d}", sections(i), env))
            pods.append(group[-1])

        def ready(group=group) -> bool:
            for k, pod in enumerate(group):
                if pod.alive:
                    continue
                log = pod.log_tail()
                tries = retries.get(pod.index, 0)
                if "Address already in use" not in log or tries >= 3:
                    raise RuntimeError(f"{pod.name} exited at start:\n{log}")
                # Its free control port was taken between the pick and the bind: a new one.
                retries[pod.index] = tries + 1
                group[k] = Pod(pod.index, pod.port, workdir / f"{pod.name}.{tries + 1}",
                               sections(pod.index), env)
                pods[pods.index(pod)] = group[k]
            return all(p.agent.readyz(timeout=2) == 200 for p in group)

        try:
            wait_until(ready, 120 + 3 * len(group), f"pods {group[0].name}.. are ready",
                       interval=0.2)
        except TimeoutError:
            late = next(p for p in group if p.agent.readyz(timeout=2) != 200)
            raise TimeoutError(f"{late.name} not ready:\n{late.log_tail()}") from None
        progress(f"  pods {group[0].index}-{group[-1].index} ready in "
                 f"{time.monotonic() - began:.1f}s (load {os.getloadavg()[0]:.1f})")


def stop_pods(pods: list[Pod], apps: Apps) -> None:
    """Stop these pods at once (one thread each); return when every one has exited."""
    if not pods:
        return
    with ThreadPoolExecutor(len(pods)) as pool:
        list(pool.map(lambda p: p.stop(apps), pods))
