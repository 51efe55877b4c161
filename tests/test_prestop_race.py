"""No preStop hook loses the race (issue 14): real `registrar agent` processes
on the real three-member etcd cluster, and real `registrar prestop` processes
started at the moments that used to lose: together, together with the
SIGTERM, after another /prestop was answered, after the stop was over, after
the agent had gone; and with no agent at all.

`registrar prestop` exits 0 with the stop's one-line summary when the stop
was confirmed (now, or before it came), 1 with one line when the stop was not
confirmed or when no agent ever answered.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from registrar import prestop as prestop_cmd
from registrar_testing import free_port, wait_until
from registrar_testing.etcd import kv_get_serializable

ENV = {**os.environ, "POD_NAME": "race-pod", "POD_IP": "10.20.30.41"}


class Agent:
    """One `registrar agent` process, its stderr collected line by line."""

    def __init__(self, tmp_path: Path, etcd, control: str | None = None, health=False,
                 port: int = 8080, endpoints=None, **control_extra):
        self.etcd = etcd
        self.service = f"race-{uuid.uuid4().hex[:8]}"
        self.control = control or f"127.0.0.1:{free_port()}"
        self.key = f"services/{self.service}/10.20.30.41:{port}"
        doc = {
            "service": {"name": self.service, "port": port},
            "backends": [{"type": "etcd", "endpoints": endpoints or etcd.endpoints,
                          "ttl": "2s", "timeout": "1s"}],
            "stop": {"grace_period": "6s", "safety_margin": "1s"},
            "control": {"listen": self.control, **control_extra},
            "health": health,
        }
        self.config = tmp_path / f"agent-{self.service}.yaml"
        self.config.write_text(yaml.safe_dump(doc))
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "registrar", "agent", "--config",
                                      str(self.config)], env=ENV, stderr=subprocess.PIPE,
                                     text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines)

    def listed(self) -> bool:
        return all(kv_get_serializable(ep, self.key)[1] for ep in self.etcd.endpoints)

    def wait_registered(self) -> None:
        wait_until(lambda: self.listed() and readyz(self.control) == 200, 20,
                   f"the agent is registered and ready\n{self.log()}")

    def wait_log(self, text: str, timeout: float = 10) -> None:
        wait_until(lambda: text in self.log(), timeout, f"the agent logs {text!r}\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        self._reader.join(5)


def readyz(control: str) -> int | None:
    try:
        conn = prestop_cmd._connection(control, 1.0)
        try:
            conn.request("GET", "/readyz")
            return conn.getresponse().status
        finally:
            conn.close()
    except OSError:
        return None


def hook(control: str, *extra: str) -> subprocess.Popen:
    """`registrar prestop`, started now."""
    return subprocess.Popen([sys.executable, "-m", "registrar", "prestop", "--control", control,
                             *extra], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finished(proc: subprocess.Popen, timeout: float = 15) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def summary_of(agent: Agent) -> str:
    """The one report summary the agent logged."""
    lines = [line.split("registrar.podstop: ", 1)[1].strip() for line in agent.lines
             if "registrar.podstop: deregistered after" in line]
    assert len(lines) == 1, agent.log()
    return lines[0]


@pytest.fixture
def agents(tmp_path, etcd_cluster):
    made: list[Agent] = []

    def make(**kw) -> Agent:
        agent = Agent(tmp_path, etcd_cluster, **kw)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.stop()


# -- (a) two hooks at once ----------------------------------------------------------------

def test_two_hooks_at_once_both_get_the_report(agents):
    agent = agents()
    agent.wait_registered()
    hooks = [hook(agent.control), hook(agent.control)]
    results = [finished(h) for h in hooks]
    for code, out, err in results:
        assert code == 0 and err == "", (code, out, err, agent.log())
    assert results[0][1] == results[1][1]
    assert results[0][1].startswith("deregistered after preStop (/prestop)")
    assert agent.log().count("stopping after") == 1
    # The kubelet's SIGTERM follows the hooks: the agent exits at once, 0.
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(10) == 0, agent.log()
    assert results[0][1].strip() == summary_of(agent)


# -- (b) the hook and the SIGTERM at the same moment -----------------------------------------

@pytest.mark.parametrize("before", ["nothing", "an answered /prestop"])
def test_a_hook_started_with_the_sigterm_gets_the_report(agents, before):
    """The issue's case: a /prestop (say the app's httpGet hook) was answered,
    then the SIGTERM and a `registrar prestop` (another container's hook)
    come together; the agent used to exit at once and refuse the hook."""
    agent = agents()
    agent.wait_registered()
    if before != "nothing":
        code, body = prestop_cmd.call(agent.control, "/prestop", None, 10)
        assert code == 200 and body["ok"], body
    late = hook(agent.control)
    agent.proc.send_signal(signal.SIGTERM)
    code, out, err = finished(late)
    assert code == 0 and err == "", (code, out, err, agent.log())
    assert out.strip() == summary_of(agent), agent.log()
    assert agent.proc.wait(10) == 0, agent.log()
    assert not any(kv_get_serializable(ep, agent.key)[1] for ep in agent.etcd.endpoints)


# -- (c) a hook after the stop is over -------------------------------------------------------

def test_a_hook_after_the_stop_within_the_linger_gets_the_report(agents):
    agent = agents(linger="3s")
    agent.wait_registered()
    agent.proc.send_signal(signal.SIGTERM)
    agent.wait_log("deregistered after SIGTERM")  # the stop is over
    code, out, err = finished(hook(agent.control))
    assert code == 0 and err == "", (code, out, err, agent.log())
    assert out.strip() == summary_of(agent)
    assert agent.proc.poll() is None  # it was still lingering when the hook came
    assert agent.proc.wait(10) == 0, agent.log()


def test_a_hook_after_the_agent_has_gone_reads_its_report_next_to_the_socket(agents, tmp_path):
    sock = tmp_path / "run" / "control.sock"
    sock.parent.mkdir()
    agent = agents(control=f"unix:{sock}", linger="0s")
    agent.wait_registered()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(10) == 0, agent.log()
    assert not sock.exists()  # nothing listens any more
    code, out, err = finished(hook(agent.control))
    assert code == 0 and err == "", (code, out, err)
    prefix = f"registrar prestop: the agent at unix:{sock} had already stopped ("
    assert out.startswith(prefix) and out.count("\n") == 1, out
    assert out.rstrip().endswith("s ago): " + summary_of(agent)), out


def test_a_new_agent_on_the_socket_forgets_the_last_report(agents, tmp_path):
    """A report is the last word of the agent that left it: the next agent
    on the same socket removes it before it registers."""
    sock = tmp_path / "control.sock"
    report = Path(prestop_cmd.report_file(str(sock)))
    report.write_text(json.dumps({"ok": True, "summary": "stale", "finished_at": time.time()}))
    agent = agents(control=f"unix:{sock}")
    agent.wait_registered()
    assert not report.exists()


def test_a_pod_that_never_registered_is_no_failed_hook_after_the_agent_has_gone(agents,
                                                                               tmp_path):
    """The registry could never be reached: nothing of ours is there, and the
    late hook says so with exit 0 (a FailedPreStopHook event would be noise)."""
    sock = tmp_path / "control.sock"
    agent = agents(control=f"unix:{sock}", linger="0s",
                   endpoints=[f"http://127.0.0.1:{free_port()}"])
    wait_until(lambda: readyz(agent.control) == 503, 20,
               f"the agent's control server\n{agent.log()}")
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(10) == 0, agent.log()
    code, out, err = finished(hook(agent.control))
    assert code == 0 and err == "", (code, out, err)
    assert "had already stopped" in out and "never registered" in out, out


# -- a hook that comes late, while the app still listens --------------------------------------

def listening_app() -> tuple[socket.socket, int]:
    """A socket listening where the agent's app would (close it to stop)."""
    app = socket.socket()
    app.bind(("127.0.0.1", 0))
    app.listen()
    return app, app.getsockname()[1]


def sigterm_gated_agent(agents, port: int, linger: str):
    """An agent whose health gate watches the app on ``port``, registered,
    then sent SIGTERM."""
    agent = agents(health={"tcp": f"127.0.0.1:{port}", "interval": "100ms"}, port=port,
                   linger=linger)
    wait_until(lambda: readyz(agent.control) == 200, 20, f"registered\n{agent.log()}")
    agent.proc.send_signal(signal.SIGTERM)
    return agent


def test_the_agent_answers_while_the_app_it_registers_still_listens(agents):
    """A regular sidecar: the kubelet signals the app only after the app's
    preStop hook returned, so while the app listens its hook may still come,
    however slowly the exec starts: the agent answers until the app stops
    listening (here long past the 0.2 s linger) or its hook has come, then
    exits."""
    app, port = listening_app()
    try:
        agent = sigterm_gated_agent(agents, port, linger="200ms")
        agent.wait_log("while the app listens")
        time.sleep(0.5)  # well past the linger: a hook this late used to be refused
        code, out, err = finished(hook(agent.control))
        assert code == 0 and out.startswith("deregistered after SIGTERM"), (code, out, err)
        # That was the app's hook: nothing more can come, the agent goes
        # although the app still listens.
        assert agent.proc.wait(10) == 0, agent.log()
    finally:
        app.close()


def test_linger_0_means_no_hook_comes_and_the_agent_does_not_wait_for_the_app(agents):
    """``control.linger: 0s`` says no hook calls /prestop: after SIGTERM the
    agent exits once its stop is done, while the app (stopped by its own
    SIGTERM, or not) still listens."""
    app, port = listening_app()
    try:
        agent = sigterm_gated_agent(agents, port, linger="0s")
        assert agent.proc.wait(5) == 0, agent.log()  # well before the 5 s deadline
        assert "while the app listens" not in agent.log()
    finally:
        app.close()


# -- (d) no agent at all ------------------------------------------------------------------

@pytest.mark.parametrize("where", ["tcp", "unix"])
def test_no_agent_at_all_is_one_line_and_exit_1(tmp_path, where):
    control = (f"127.0.0.1:{free_port()}" if where == "tcp"
               else f"unix:{tmp_path / 'nothing.sock'}")
    code, out, err = finished(hook(control))
    assert code == 1 and err == "", (code, out, err)
    reason = "Connection refused" if where == "tcp" else "No such file or directory"
    assert out == f"registrar prestop: no agent answered at {control}: {reason}\n"
