#!/usr/bin/env python3
"""The demo behind `./dev demo`: a pod's life and graceful death, for real.

Starts a three-member etcd cluster on 127.0.0.1, runs `registrar agent`
with config/agent-etcd.yaml as a sidecar would, shows what each member
sees, then plays the kubelet: SIGTERM, and checks that every member had
dropped the pod by the time the agent exited.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from registrar_testing import free_port
from registrar_testing.etcd import EtcdCluster, kv_get_serializable

ROOT = Path(__file__).resolve().parent.parent


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def views(cluster: EtcdCluster, key: str) -> list[bool]:
    return [kv_get_serializable(ep, key)[1] for ep in cluster.endpoints]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="registrar-demo-") as tmp:
        say("starting a three-member etcd cluster on 127.0.0.1")
        with EtcdCluster(3, Path(tmp)) as cluster:
            print("endpoints:", ", ".join(cluster.endpoints))
            env = {**os.environ, "ETCD_ENDPOINTS": ",".join(cluster.endpoints),
                   "POD_NAME": "web-7d9f-x2x", "POD_IP": "10.244.1.17",
                   "SERVICE_NAME": "web", "SERVICE_PORT": "8080",
                   # no app hook calls /prestop here: no reason to linger
                   "REGISTRAR_CONTROL_LISTEN": f"127.0.0.1:{free_port()}", "REGISTRAR_LINGER": "0s"}
            key = "/services/web/10.244.1.17:8080"
            config = str(ROOT / "config" / "agent-etcd.yaml")
            registrar = [sys.executable, "-m", "registrar"]

            say(f"registrar agent --config {config}  (the sidecar)")
            agent = subprocess.Popen([*registrar, "agent", "--config", config], env=env)
            deadline = time.monotonic() + 15
            while not all(views(cluster, key)):
                if time.monotonic() > deadline or agent.poll() is not None:
                    print("the agent did not register", file=sys.stderr)
                    agent.kill()
                    return 1
                time.sleep(0.02)

            say("registrar status  (what each member's own view holds)")
            subprocess.run([*registrar, "status", "--config", config], env=env, check=True)

            say("the kubelet deletes the pod: SIGTERM to the agent")
            began = time.monotonic()
            agent.send_signal(signal.SIGTERM)
            code = agent.wait(timeout=35)
            took = time.monotonic() - began
            seen = views(cluster, key)

            say("result")
            print(f"agent exit status {code}, {took * 1000:.0f} ms after SIGTERM")
            print(f"members still listing the pod when it exited: {sum(seen)} of {len(seen)}")
            ok = code == 0 and not any(seen)
            print("OK: removed everywhere before the process stopped" if ok else "FAILED")
            return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
