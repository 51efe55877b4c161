"""End to end: `registrar agent` as a real process registering at a Consul
client agent, observed on three servers, stopped by SIGTERM as the kubelet
would."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest
import yaml

from registrar import cli
from registrar_testing import wait_until
from registrar_testing.consul import passing_ids


def agent_config(tmp_path, cluster, **stop):
    service = f"e2e-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({
        "service": {"name": service, "port": 8080, "tags": ["e2e"]},
        "backends": [{"type": "consul", "address": cluster.client_addr,
                      "observers": cluster.server_addrs, "ttl": "3s", "timeout": "1s"}],
        "control": {"listen": None},
        "stop": {"grace_period": "10s", "safety_margin": "1s", **stop},
        "health": False,  # no app listens here: register at once
    }))
    return path, service


def spawn(*args):
    env = {**os.environ, "POD_NAME": "e2e-pod", "POD_IP": "10.20.30.40"}
    env.pop("CONSUL_HTTP_ADDR", None)
    env.pop("CONSUL_HTTP_TOKEN", None)
    return subprocess.Popen([sys.executable, "-m", "registrar", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def views(cluster, service):
    """Each server's own replica (?passing&stale), as consumers read it."""
    return ["e2e-pod" in passing_ids(addr, service) for addr in cluster.server_addrs]


def test_sigterm_takes_it_out_of_every_server_before_exit(tmp_path, consul_cluster):
    path, service = agent_config(tmp_path, consul_cluster)
    agent = spawn("agent", "--config", str(path))
    try:
        wait_until(lambda: all(views(consul_cluster, service)), 15, "every server lists the agent")
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=15)
        # Read every server's own view the moment the process is gone: the
        # removal must already be applied everywhere, not merely committed.
        assert views(consul_cluster, service) == [False, False, False]
    finally:
        agent.kill()
        _, err = agent.communicate(timeout=5)
    assert agent.returncode == 0, err
    line = next((ln for ln in err.splitlines() if "deregistered after SIGTERM" in ln), "")
    assert "consul: confirmed 3/3 observers" in line, err


def test_register_status_deregister_commands(tmp_path, consul_cluster, capsys):
    path, service = agent_config(tmp_path, consul_cluster)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"POD_NAME": "cli-pod", "POD_IP": "10.20.30.40"}.items():
            mp.setenv(k, v)
        mp.delenv("CONSUL_HTTP_TOKEN", raising=False)
        assert cli.main(["register", "--config", str(path)]) == 0
        assert "listed by 3/3 observers" in capsys.readouterr().out
        assert cli.main(["status", "--config", str(path)]) == 0
        out = capsys.readouterr().out
        assert "listed by 3/3 observers" in out
        assert ": as the registries list it (no agent at " in out  # no agent runs here
        # A fresh process that never registered removes it: the agent knows it by id.
        assert cli.main(["deregister", "--config", str(path)]) == 0
        out = capsys.readouterr().out
        assert out.startswith("deregistered after deregister command") and "confirmed 3/3" in out
        assert not any("cli-pod" in passing_ids(a, service) for a in consul_cluster.server_addrs)
        assert cli.main(["status", "--config", str(path), "--json"]) == 1
        assert '"sees": false' in capsys.readouterr().out
