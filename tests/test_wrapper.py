"""`registrar run`'s health gate on a real process and a real etcd: the app is
registered only while its probe passes, taken out of rotation when it fails,
and put back when it passes again."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import yaml

from registrar_testing import free_ports, wait_until
from registrar_testing.etcd import kv_get_serializable

APP = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
       "time.sleep(60)")


def readyz(control):
    try:
        with urllib.request.urlopen(f"http://{control}/readyz", timeout=1) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def test_health_gate_registers_only_while_the_probe_passes(tmp_path, etcd_cluster):
    service = f"gate-{uuid.uuid4().hex[:8]}"
    port, control_port = free_ports(2)
    control = f"127.0.0.1:{control_port}"
    healthy = tmp_path / "healthy"
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "service": {"name": service, "port": port},
        "backends": [{"type": "etcd", "endpoints": etcd_cluster.endpoints, "ttl": "2s"}],
        "health": {"exec": ["test", "-e", str(healthy)], "interval": "100ms",
                   "failure_threshold": 2},
        "stop": {"grace_period": "5s", "safety_margin": "1s"},
        "control": {"listen": control},
    }))
    key = f"services/{service}/10.3.3.3:{port}"

    def listed():
        return [kv_get_serializable(ep, key)[1] for ep in etcd_cluster.endpoints]

    env = {**os.environ, "POD_NAME": "gate-0", "POD_IP": "10.3.3.3"}
    wrapper = subprocess.Popen([sys.executable, "-m", "registrar", "run", "--config", str(config),
                                "--", sys.executable, "-c", APP],
                               env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: readyz(control) == 503, 15, "the control server, not ready")
        time.sleep(0.5)  # five failing probes: proving a negative takes a while
        assert listed() == [False] * 3  # unhealthy app: never registered

        healthy.touch()
        wait_until(lambda: all(listed()), 5, "registration once healthy")
        wait_until(lambda: readyz(control) == 200, 5, "ready")

        healthy.unlink()
        wait_until(lambda: not any(listed()), 5, "out of rotation after 2 failed probes")
        assert readyz(control) == 503 and wrapper.poll() is None
        assert json.loads(_status(control))["backends"][0]["state"] == "out of rotation"

        healthy.touch()
        wait_until(lambda: all(listed()), 5, "back into rotation")
        wait_until(lambda: readyz(control) == 200, 5, "ready again")

        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(timeout=10) == 0  # the app's own exit status
        assert not any(listed())
    finally:
        wrapper.kill()
        _, err = wrapper.communicate(timeout=5)
    assert "taking gate-0 out of rotation: health probe failed 2 times" in err
    assert "putting gate-0 back into rotation" in err
    assert "deregistered after SIGTERM" in err


def _status(control):
    try:
        with urllib.request.urlopen(f"http://{control}/status", timeout=2) as resp:
            return resp.read().decode()
    except OSError:
        return ""


LEAVER = """
import os, signal, sys, time
pid = os.fork()
if pid == 0:  # a daemon: its own session, deaf to SIGTERM
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(sys.argv[1], "w").write(str(os.getpid()))
    time.sleep(120)
    os._exit(0)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
time.sleep(120)
"""


def test_what_the_app_leaves_behind_does_not_outlive_the_wrapper(tmp_path):
    """Issue 24 (10): a child that called setsid() and ignores SIGTERM outlived
    `registrar run` (outside a container's PID namespace nothing killed it).
    The wrapper is its subreaper and ends it: SIGTERM, then SIGKILL."""
    (port,) = free_ports(1)
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({"service": {"name": "leaver", "port": port},
                                      "health": False, "control": {"listen": None},
                                      "stop": {"grace_period": "10s", "quiesce": False}}))
    pidfile, log = tmp_path / "daemon.pid", tmp_path / "wrapper.log"
    with open(log, "w") as err:  # a file: a pipe would stay open in the daemon
        wrapper = subprocess.Popen([sys.executable, "-m", "registrar", "run", "-c", str(config),
                                    "--", sys.executable, "-c", LEAVER, str(pidfile)],
                                   env={**os.environ, "POD_IP": "127.0.0.1"}, stderr=err)
    try:
        wait_until(lambda: pidfile.exists() and pidfile.read_text(), 10, "the daemon started")
        daemon = int(pidfile.read_text())
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(timeout=20) == 0
        assert "the app left 1 process(es) behind" in log.read_text(), log.read_text()
        assert not os.path.exists(f"/proc/{daemon}"), "the daemon outlived the wrapper"
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
        if pidfile.exists() and pidfile.read_text() and os.path.exists(
                f"/proc/{pidfile.read_text()}"):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
