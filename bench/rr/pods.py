"""The pods of the rolling-restart bench: one container each (a wrapper
and bench/apps/webapp.py under it), started and deleted by the kubelet
simulator, per strategy."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from registrar_testing import free_ports
from registrar_testing.kubelet import Container, Exec, HttpGet, Pod

from .registries import SERVICE, Registry

PY = sys.executable
APPS = Path(__file__).resolve().parent.parent / "apps"
SLEEP = 5  # the "sleep" strategy's preStop sleep

STRATEGIES = {
    "naive": "a wrapper registers the app; on SIGTERM it stops the app and deregisters "
             "nothing (only the TTL / session / lease removes the entry)",
    "sigterm-dereg": "the wrapper deregisters on SIGTERM, then stops the app at once "
                     "(ContainerPilot, Spring Cloud)",
    "sleep": f"preStop exec: the registry's own tool deregisters, then `sleep {SLEEP}`; "
             "then the kubelet's SIGTERM stops the app",
    "registrar": "`registrar run` (config: service, backends, control, stop.grace_period "
                 "only) with a preStop httpGet to /prestop",
}


@dataclass
class PodRun:
    name: str
    port: int
    pod: Pod
    started_at: float
    deleted_at: float | None = None
    exited_at: float | None = None  # the last container exited
    hook_output: str = ""

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def stop_seconds(self) -> float | None:
        if self.deleted_at is None or self.exited_at is None:
            return None
        return self.exited_at - self.deleted_at

    def delete(self) -> None:
        """Play the deletion; return once every container exited (or was SIGKILLed)."""
        timeline = self.pod.delete()
        self.deleted_at = self.pod.deleted_at
        exits = timeline.find("exit")
        if len(exits) == len(self.pod.containers):
            self.exited_at = max(e.t for e in exits)
        hook = timeline.first("hook_end")
        self.hook_output = str(hook.detail.get("output", "")) if hook else ""


def registrar_config(registry: Registry, port: int, control: str, grace: float) -> dict:
    """Only service, backends, control and stop.grace_period: registrar's
    defaults must do the rest. The backend section says where the registry
    is (and, for Consul, which servers the consumers read)."""
    return {"service": {"name": SERVICE, "port": port},
            "backends": [registry.backend_section()],
            "control": {"listen": control},
            "stop": {"grace_period": f"{grace:g}s"}}


def make_pod(strategy: str, registry: Registry, app: str, args, workdir: Path,
             name: str) -> PodRun:
    port, control_port = free_ports(2)
    addr = f"127.0.0.1:{port}"
    app_argv = [PY, str(APPS / "webapp.py"), "--port", str(port),
                "--events", str(workdir / f"{name}.events.jsonl"),
                "--on-term", app, "--work-ms", f"{args.work_ms:g}"]
    hook: Exec | HttpGet | None = None
    if strategy == "registrar":
        config = workdir / f"{name}.yaml"
        config.write_text(yaml.safe_dump(registrar_config(
            registry, port, f"127.0.0.1:{control_port}", args.grace)))
        argv = [PY, "-m", "registrar", "run", "--config", str(config), "--", *app_argv]
        hook = HttpGet(control_port, "/prestop")
    else:
        on_term = "deregister" if strategy == "sigterm-dereg" else "keep"
        argv = [PY, str(APPS / "naive_wrapper.py"), "--registry", registry.name,
                "--target", registry.wrapper_target(), "--service", SERVICE, "--id", name,
                "--addr", addr, "--health", f"http://{addr}/health", "--ttl", "10",
                "--on-term", on_term, "--", *app_argv]
        if strategy == "sleep":
            hook = Exec(["sh", "-c", f"{registry.deregister_command(name, addr)}; sleep {SLEEP}"])
    pod = Pod(name, [Container("app", argv, pre_stop=hook)], workdir / name,
              grace_period=args.grace, env={"POD_IP": "127.0.0.1"})
    pod.start()
    return PodRun(name, port, pod, started_at=time.monotonic())
