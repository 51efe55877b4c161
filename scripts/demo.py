#!/usr/bin/env python3
"""The demo behind `./dev demo`: a pod's life and graceful death, for real.

Starts a three-member etcd cluster on 127.0.0.1 and runs `registrar agent`
with config/agent-etcd.yaml as a sidecar would, before its app listens:
nothing is registered until the app accepts connections. Then it starts
the app, shows what each member sees, sends a slow request and plays the
kubelet: SIGTERM while the request is in flight. The agent takes the pod
out of every member and waits for the request before it exits.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from registrar_testing import free_port
from registrar_testing.etcd import EtcdCluster, kv_get_serializable

ROOT = Path(__file__).resolve().parent.parent


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def views(cluster: EtcdCluster, key: str) -> list[bool]:
    return [kv_get_serializable(ep, key)[1] for ep in cluster.endpoints]


def readyz(control: str) -> str:
    try:
        with urllib.request.urlopen(f"http://{control}/readyz", timeout=2) as resp:
            return f"{resp.status} {resp.read().decode().strip()}"
    except urllib.error.HTTPError as exc:
        return f"{exc.code} {exc.read().decode().strip()}"
    except OSError as exc:
        return f"no answer ({exc})"


def wait_for(what: str, predicate, agent: subprocess.Popen, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline or agent.poll() is not None:
            print(f"FAILED: {what}", file=sys.stderr)
            return False
        time.sleep(0.02)
    return True


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="registrar-demo-") as tmp:
        say("starting a three-member etcd cluster on 127.0.0.1")
        with EtcdCluster(3, Path(tmp)) as cluster:
            print("endpoints:", ", ".join(cluster.endpoints))
            port, control = free_port(), f"127.0.0.1:{free_port()}"
            env = {**os.environ, "ETCD_ENDPOINTS": ",".join(cluster.endpoints),
                   "POD_NAME": "web-7d9f-x2x", "POD_IP": "127.0.0.1",
                   "SERVICE_NAME": "web", "SERVICE_PORT": str(port),
                   # no app hook calls /prestop here: no reason to linger
                   "REGISTRAR_CONTROL_LISTEN": control, "REGISTRAR_LINGER": "0s"}
            key = f"services/web/127.0.0.1:{port}"
            config = str(ROOT / "config" / "agent-etcd.yaml")
            registrar = [sys.executable, "-m", "registrar"]

            say(f"registrar agent --config {config}  (the sidecar; the app is not up yet)")
            agent = subprocess.Popen([*registrar, "agent", "--config", config], env=env)
            app = None
            try:
                if not wait_for("the control server", lambda: readyz(control)[0] in "25", agent):
                    return 1
                time.sleep(0.5)
                print(f"after 0.5 s: /readyz {readyz(control)}")
                print(f"members listing the pod: {sum(views(cluster, key))} of 3")

                say(f"the app starts listening on 127.0.0.1:{port}")
                app = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "demo_app.py"),
                                        str(port)])
                if not wait_for("registered", lambda: all(views(cluster, key)), agent):
                    return 1
                print(f"/readyz {readyz(control)}")

                say("registrar status  (what each member's own view holds)")
                subprocess.run([*registrar, "status", "--config", config], env=env, check=True)

                say("a 300 ms request is in flight when the kubelet sends SIGTERM")
                answer: list[str] = []
                request = threading.Thread(target=lambda: answer.append(
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/?ms=300", timeout=5)
                    .read().decode().strip()))
                request.start()
                time.sleep(0.05)
                began = time.monotonic()
                agent.send_signal(signal.SIGTERM)
                code = agent.wait(timeout=35)
                took = time.monotonic() - began
                seen = views(cluster, key)
                app.send_signal(signal.SIGTERM)  # the kubelet stops the app too
                request.join(5)
            finally:
                for proc in (agent, app):
                    if proc is not None and proc.poll() is None:
                        proc.kill()

            say("result")
            print(f"agent exit status {code}, {took * 1000:.0f} ms after SIGTERM")
            print(f"members still listing the pod when it exited: {sum(seen)} of {len(seen)}")
            print(f"the request in flight: {answer[0] if answer else 'LOST'}")
            ok = code == 0 and not any(seen) and answer == ["done"]
            print("OK: not registered before the app listened; removed everywhere and the "
                  "request in flight done before the agent exited" if ok else "FAILED")
            return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
