"""The pods of bench/services.py: one container each, bench/apps/webapp.py
(under ``registrar run`` for the registrar strategy), started and deleted
by the kubelet simulator. A pod is behind the Service only: nothing
registers it anywhere."""
from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml
from registrar_testing import free_ports
from registrar_testing.kubelet import Container, Exec, HttpGet, Pod
from rr.pods import APPS, PY, SLEEP, PodRun

SERVICE = "web"

STRATEGIES = {
    "nothing": "no preStop hook: SIGTERM at once",
    "sleep": f"preStop exec `sleep {SLEEP}`, then SIGTERM",
    "registrar": "`registrar run` (config: service, control and stop.grace_period only, "
                 "no backends) with a preStop httpGet to /prestop",
}

# What the endpoints controller takes as "ready" (a readinessProbe's answer).
READINESS = {
    "nothing": "GET /health on the app's port answers 200",
    "sleep": "GET /health on the app's port answers 200",
    "registrar": "GET /readyz on registrar's control port answers 200",
}


@dataclass
class SvcPod(PodRun):
    """A PodRun with the URL its readiness is read from."""
    ready_url: str = ""

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.ready_url, timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False


def registrar_config(port: int, control: str, grace: float) -> dict:
    """Only service, control and stop.grace_period, and no backends at all:
    the pod is behind a Kubernetes Service and nowhere else."""
    return {"service": {"name": SERVICE, "port": port},
            "control": {"listen": control},
            "stop": {"grace_period": f"{grace:g}s"}}


def pick_ports(n: int, taken: set[int]) -> list[int]:
    """n free ports no pod of the block had: a dead pod's endpoint may
    still be in the Service (its lag), and must not reach a new pod."""
    for _ in range(100):
        ports = free_ports(n)
        if not taken.intersection(ports):
            taken.update(ports)
            return ports
    raise RuntimeError("no free ports left that no pod of the block had")


def make_pod(strategy: str, app: str, args, workdir: Path, name: str,
             taken: set[int]) -> SvcPod:
    port, control_port = pick_ports(2, taken)
    app_argv = [PY, str(APPS / "webapp.py"), "--port", str(port),
                "--events", str(workdir / f"{name}.events.jsonl"),
                "--on-term", app, "--work-ms", f"{args.work_ms:g}"]
    hook: Exec | HttpGet | None = None
    ready_url = f"http://127.0.0.1:{port}/health"
    if strategy == "registrar":
        config = workdir / f"{name}.yaml"
        config.write_text(yaml.safe_dump(registrar_config(
            port, f"127.0.0.1:{control_port}", args.grace)))
        argv = [PY, "-m", "registrar", "run", "--config", str(config), "--", *app_argv]
        hook = HttpGet(control_port, "/prestop")
        ready_url = f"http://127.0.0.1:{control_port}/readyz"
    elif strategy == "sleep":
        argv = app_argv
        hook = Exec(["sleep", str(SLEEP)])
    elif strategy == "nothing":
        argv = app_argv
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    pod = Pod(name, [Container("app", argv, pre_stop=hook)], workdir / name,
              grace_period=args.grace, env={"POD_IP": "127.0.0.1"})
    pod.start()
    return SvcPod(name, port, pod, started_at=time.monotonic(), ready_url=ready_url)
