"""End to end: real `registrar agent` processes against a real ZooKeeper
ensemble, stopped the way the kubelet stops them (SIGTERM), or frozen."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from registrar_testing import wait_until
from registrar_testing.zookeeper import ServerViews, four_letter

SESSION_TIMEOUT = 2.0


@pytest.fixture
def views(zk_ensemble):
    views = ServerViews(zk_ensemble.hosts)
    yield views
    views.close()


class Agent:
    """`registrar agent --config FILE` as a child process, its log in a file."""

    def __init__(self, tmp: Path, name: str, config: dict):
        self.config_path = tmp / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "registrar", "agent", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def agents(tmp_path):
    started: list[Agent] = []

    def start(name: str, config: dict) -> Agent:
        agent = Agent(tmp_path, name, config)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def agent_config(ensemble, pod: str) -> dict:
    return {"service": {"name": "e2e", "id": pod, "address": "10.4.4.4", "port": 8080},
            "backends": [{"type": "zookeeper", "hosts": ensemble.hosts,
                          "session_timeout": f"{SESSION_TIMEOUT}s", "timeout": "1s"}],
            "stop": {"grace_period": "10s", "propagation_timeout": "5s"},
            "control": {"listen": None},  # two agents at once: no port to share
            "health": False}  # no app listens here: register at once


def owners(views: ServerViews, path: str) -> list[int | None]:
    return [getattr(views.stat(i, path), "ephemeralOwner", None) for i in range(3)]


def test_sigterm_deregisters_and_every_server_has_dropped_it_before_exit(zk_ensemble, views,
                                                                         agents):
    pod = f"pod-{uuid.uuid4().hex[:8]}"
    path = f"/services/e2e/{pod}"
    agent = agents("agent", agent_config(zk_ensemble, pod))
    wait_until(lambda: views.exists(path) == [True] * 3 or agent.proc.poll() is not None, 15,
             "every server to list the pod")
    assert agent.proc.poll() is None, agent.log
    agent.signal(signal.SIGTERM)
    try:
        code = agent.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the agent did not exit 15 s after SIGTERM\n{agent.log}") from None
    # At once, each server on its own (no sync): what its consumers read.
    assert views.exists(path) == [False] * 3
    assert code == 0, agent.log
    assert re.search(r"deregistered after SIGTERM .*zookeeper: confirmed 3/3 observers",
                     agent.log), agent.log


def _global_sessions(ensemble) -> int:
    leader = ensemble.servers[ensemble.wait_leader(timeout=10)]
    text = four_letter("127.0.0.1", leader.client_port, "mntr")
    return int(re.search(r"^zk_global_sessions\s+(\d+)", text, re.M).group(1))


def test_a_new_incarnation_takes_over_from_a_frozen_one(zk_ensemble, views, agents):
    pod = f"pod-{uuid.uuid4().hex[:8]}"
    path = f"/services/e2e/{pod}"
    config = agent_config(zk_ensemble, pod)
    old = agents("old", config)
    wait_until(lambda: all(owners(views, path)), 15, "the old agent's node on every server")
    old_session = owners(views, path)[0]
    old.signal(signal.SIGSTOP)  # its session outlives it, for now
    frozen_at = time.monotonic()
    new = agents("new", config)
    wait_until(lambda: set(owners(views, path)) - {old_session, None}, 15,
             "the new agent to own the node")
    new_session = owners(views, path)[0]
    assert owners(views, path) == [new_session] * 3, new.log
    assert "replaced /services/e2e/" in new.log
    # Wait for the old session to expire: the leader counts one session
    # less, and no earlier than the session timeout (plus a tick) allows.
    sessions = _global_sessions(zk_ensemble)
    wait_until(lambda: time.monotonic() - frozen_at > SESSION_TIMEOUT + 0.5
             and _global_sessions(zk_ensemble) < sessions, SESSION_TIMEOUT + 5,
             "the frozen agent's session to expire")
    assert owners(views, path) == [new_session] * 3, "the node vanished with the old session"
    old.stop()
    assert new.proc.poll() is None, new.log
    new.signal(signal.SIGTERM)
    assert new.proc.wait(timeout=15) == 0, new.log
    assert views.exists(path) == [False] * 3
