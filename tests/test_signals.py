"""A stop signal reaches the agent whichever of its threads the kernel
delivers it to. Python runs handlers in the main thread only, when it next
runs Python code; an agent asleep in select() while the signal went to
kazoo's or the scheduler's thread used to sleep through its SIGTERM (seen
under load: "the agent did not exit 15 s after SIGTERM")."""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import uuid

import pytest
import yaml

from registrar_testing import wait_until
from registrar_testing.etcd import kv_get_serializable

_libc = ctypes.CDLL(None, use_errno=True)


def tgkill(pid: int, tid: int, signum: int) -> None:
    """Send a signal to one thread of another process."""
    if _libc.tgkill(pid, tid, signum) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill({pid}, {tid}, {signum})")


def test_sigterm_delivered_to_another_thread_stops_the_agent(tmp_path, etcd_cluster):
    service = f"sig-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "service": {"name": service, "port": 8080},
        "backends": [{"type": "etcd", "endpoints": etcd_cluster.endpoints, "ttl": "3s",
                      "timeout": "1s", "prefix": "/signals"}],
        "control": {"listen": None},
        "health": False}))
    env = {**os.environ, "POD_NAME": "sig-pod", "POD_IP": "10.20.30.40"}
    agent = subprocess.Popen([sys.executable, "-m", "registrar", "agent", "--config", str(config)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        key = f"/signals/{service}/10.20.30.40:8080"
        wait_until(lambda: all(kv_get_serializable(e, key, timeout=1)[1]
                               for e in etcd_cluster.endpoints), 20, "registered")
        threads = sorted(int(t) for t in os.listdir(f"/proc/{agent.pid}/task"))
        others = [t for t in threads if t != agent.pid]
        assert others, "the agent runs background threads"
        # To a thread other than the main one; one may end meanwhile (the
        # registration's thread ends once registered): then the next.
        for tid in reversed(others):
            try:
                tgkill(agent.pid, tid, signal.SIGTERM)
                break
            except ProcessLookupError:
                continue
        else:
            pytest.fail(f"no thread of the agent was left to signal: {others}")
        code = agent.wait(timeout=15)
    finally:
        agent.kill()
        out = agent.communicate(timeout=5)[0]
    assert code == 0, out
    assert "deregistered after SIGTERM" in out, out
