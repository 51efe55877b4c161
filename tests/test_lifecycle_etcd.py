"""End to end: pod deletions played by registrar_testing.kubelet against real
`registrar` processes, sample apps (tests/apps/) and the real three-member
etcd cluster.

The claim under test, in every scenario: every etcd member has stopped
listing the pod BEFORE the app is told to stop, and every process exits
BEFORE the kubelet's SIGKILL would come. The first half is proven twice:
the app itself reads every member's own view the moment it gets SIGTERM
(``sigterm_check``), and the watcher never saw a member list the key in a
read sent after that moment.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from registrar.connections import connections as _conns
from registrar.connections import established_connections
from registrar_testing import free_ports, wait_until
from registrar_testing import http_get as _get
from registrar_testing.senders import Sender
from registrar_testing.faults import Blackhole
from registrar_testing.kubelet import (Container, EtcdWatch, Exec, HttpGet, Pod, app_event,
                                       children, pid_namespaces_available, process_state,
                                       read_events)

PY = sys.executable
APPS = Path(__file__).parent / "apps"
REGISTRAR = [PY, "-m", "registrar"]
NAMESPACES = pid_namespaces_available()


class Setup:
    """One pod's worth of names, ports and files, unique per test."""

    def __init__(self, tmp_path: Path, etcd, name: str = "pod"):
        tag = uuid.uuid4().hex[:8]
        self.tmp = tmp_path
        self.etcd = etcd
        self.pod_name = f"{name}-{tag}"
        self.service = f"kube-{tag}"
        self.port, self.control_port = free_ports(2)
        self.control = f"127.0.0.1:{self.control_port}"
        self.key = f"services/{self.service}/127.0.0.1:{self.port}"
        self.events = tmp_path / "events.jsonl"
        self.env = {"POD_IP": "127.0.0.1", "CHECK_ETCD_ENDPOINTS": ",".join(etcd.endpoints),
                    "CHECK_ETCD_KEY": self.key}

    def config(self, grace: float = 5, ttl: str = "2s", endpoints=None, timeout: str = "1s",
               health=None, control: bool = True, **stop) -> Path:
        doc = {
            "service": {"name": self.service, "port": self.port},
            "backends": [{"type": "etcd", "endpoints": endpoints or self.etcd.endpoints,
                          "ttl": ttl, "timeout": timeout}],
            "stop": {"grace_period": f"{grace}s", "safety_margin": "1s", **stop},
            "control": {"listen": self.control if control else None},
        }
        if health is not None:
            doc["health"] = health
        path = self.tmp / f"registrar-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    def app(self, *extra: str) -> list[str]:
        return [PY, str(APPS / "httpapp.py"), "--port", str(self.port),
                "--events", str(self.events), *extra]

    def watch(self) -> EtcdWatch:
        return EtcdWatch(self.etcd.endpoints, self.key)

    def pod(self, containers, grace: float = 5) -> Pod:
        return Pod(self.pod_name, containers, self.tmp / "pod", grace_period=grace,
                   env=self.env)

    def ready(self) -> bool:
        """/readyz answers 200 and the app has installed its signal handlers
        (a SIGTERM before that would kill it by the default action)."""
        return (_get(f"http://{self.control}/readyz")[0] == 200
                and app_event(self.events, "ready") is not None)

    def app_ready(self) -> bool:
        return app_event(self.events, "ready") is not None


@pytest.fixture
def pods():
    """Every Pod made through it is SIGKILLed and reaped at the end."""
    made: list[Pod] = []
    yield made
    for pod in made:
        pod.kill()


@pytest.fixture
def setup(tmp_path, etcd_cluster):
    return Setup(tmp_path, etcd_cluster)


def start(pods, pod: Pod, watch: EtcdWatch | None, ready) -> Pod:
    pods.append(pod)
    if watch is not None:
        pod.watch(watch)
    pod.start()
    pod.wait_ready(ready, 15, "ready")
    return pod


# -- the shared claims ------------------------------------------------------------

def assert_removed_before_sigterm(pod: Pod, watch: EtcdWatch, setup: Setup) -> float:
    """Every member had dropped the key when the app got SIGTERM; returns the
    app's SIGTERM time."""
    sigterm = app_event(setup.events, "sigterm")
    assert sigterm, f"the app never got SIGTERM\n{pod.report()}"
    check = app_event(setup.events, "sigterm_check")
    assert check and [v.get("present") for v in check["views"]] == [False] * len(watch.members), \
        f"a member still listed the pod when the app got SIGTERM: {check}\n{pod.report()}"
    assert watch.gone_everywhere(), pod.report()
    assert watch.last_listed_sent < sigterm["mono"], \
        f"a member still listed the pod after the app's SIGTERM\n{pod.report()}"
    return sigterm["mono"]


def assert_no_sigkill(pod: Pod) -> None:
    assert not pod.timeline.find("SIGKILL"), f"the kubelet had to SIGKILL\n{pod.report()}"
    for name in pod.containers:
        exit_ = pod.exited(name)
        assert name not in pod.kill_at or exit_.t < pod.kill_at[name], pod.report()


def figures(scenario: str, pod: Pod, watch: EtcdWatch | None, setup: Setup | None, **extra):
    """Print the scenario's timings (run pytest with -s to see them)."""
    t0 = pod.deleted_at
    parts = []
    if watch is not None and watch.gone_at is not None and t0 is not None:
        parts.append(f"delete->gone everywhere {1000 * (watch.gone_at - t0):.1f}ms")
    sigterm = app_event(setup.events, "sigterm") if setup else None
    if sigterm and t0 is not None:
        parts.append(f"delete->app SIGTERM {1000 * (sigterm['mono'] - t0):.1f}ms")
        if watch is not None and watch.gone_at is not None:
            parts.append(f"gone->app SIGTERM {1000 * (sigterm['mono'] - watch.gone_at):+.1f}ms")
    for name in pod.containers:
        exits = pod.timeline.find("exit", name)
        if exits and t0 is not None:
            parts.append(f"delete->{name} exit {1000 * (exits[0].t - t0):.1f}ms")
        term = pod.timeline.first("SIGTERM", name)
        if exits and term is not None:
            parts.append(f"{name} SIGTERM->exit {1000 * (exits[0].t - term.t):.1f}ms")
    # The registrar's own figure: deregister() to the last member's confirmation.
    for found in re.finditer(r"confirmed (\d+/\d+) observers in ([\d.]+ms)", pod.logs()):
        parts.append(f"registrar: deregister->last of {found[1]} members {found[2]}")
    parts += [f"{k} {v}" for k, v in extra.items()]
    print(f"\nFIGURES {scenario}: " + ", ".join(parts))


# -- the simulator itself ---------------------------------------------------------------

def test_kubelet_extends_an_overrun_hook_and_sigkills_at_the_end(pods, tmp_path, etcd_cluster):
    """Grace 2 s. "slow": its hook overruns, so SIGTERM comes at 2 s anyway,
    with a 2 s extension (it exits at once). "stubborn": no hook, ignores
    SIGTERM, so SIGKILL comes at 2 s."""
    slow, stubborn = (Setup(tmp_path / n, etcd_cluster) for n in ("slow", "stubborn"))
    for s in (slow, stubborn):
        s.tmp.mkdir()
    pod = Pod(slow.pod_name, [
        Container("slow", slow.app(), pre_stop=Exec(["sleep", "30"])),
        Container("stubborn", stubborn.app("--on-term", "ignore")),
    ], tmp_path / "pod", grace_period=2, env={"POD_IP": "127.0.0.1"})
    start(pods, pod, None, lambda: slow.app_ready() and stubborn.app_ready())
    timeline = pod.delete()
    t0 = pod.deleted_at
    assert timeline.one("hook_timeout", "slow").t - t0 == pytest.approx(2, abs=0.2), timeline
    assert timeline.one("grace_extended", "slow").t - t0 == pytest.approx(2, abs=0.2)
    assert timeline.one("SIGTERM", "slow").t - t0 == pytest.approx(2, abs=0.2)
    assert pod.kill_at["slow"] - t0 == pytest.approx(4, abs=0.2)
    assert not timeline.find("SIGKILL", "slow") and pod.exited("slow").detail["status"] == 0
    assert timeline.one("SIGTERM", "stubborn").t - t0 < 0.1
    assert timeline.one("SIGKILL", "stubborn").t - t0 == pytest.approx(2, abs=0.2), timeline
    assert pod.exited("stubborn").detail["status"] == 128 + 9
    assert app_event(stubborn.events, "sigterm")


# -- 1. sidecar agent + app with a preStop exec hook -------------------------------

def test_sidecar_agent_and_app_with_prestop_exec(pods, setup):
    """The agent container has no hook: it gets SIGTERM at once and runs the
    sequence; the app's hook (`registrar prestop`) holds the app's SIGTERM
    back until the removal is confirmed."""
    cfg = setup.config(grace=5)
    watch = setup.watch()
    pod = start(pods, setup.pod([
        Container("registrar", [*REGISTRAR, "agent", "--config", str(cfg)],
                  pid_namespace=NAMESPACES),
        Container("app", setup.app(),
                  pre_stop=Exec([*REGISTRAR, "prestop", "--control", setup.control])),
    ]), watch, lambda: setup.ready() and watch.listed_everywhere())
    pod.delete()
    figures("1 sidecar+prestop exec", pod, watch, setup)
    sigterm = assert_removed_before_sigterm(pod, watch, setup)
    assert pod.timeline.one("SIGTERM", "registrar").t < pod.timeline.one("hook_end", "app").t
    assert pod.timeline.one("hook_end", "app").t <= pod.timeline.one("SIGTERM", "app").t < sigterm
    assert_no_sigkill(pod)
    assert pod.exited("registrar").detail["status"] == 0, pod.report()
    assert pod.exited("app").detail["status"] == 0, pod.report()
    assert "deregistered after SIGTERM" in pod["registrar"].log()
    hook = pod.timeline.one("hook_end", "app")
    assert hook.detail["exit_code"] == 0, pod.report()
    assert hook.detail["output"].startswith("deregistered after SIGTERM"), pod.report()


def test_sidecar_prestop_hook_gets_the_agents_report(pods, setup):
    """A regular sidecar gets SIGTERM the moment the app's hook starts; the
    hook (a real `runc exec` takes ~0.1-0.3 s to start) must still get the
    one report: the agent keeps answering /prestop for a moment (LINGER)."""
    cfg = setup.config(grace=5)
    pod = start(pods, setup.pod([
        Container("registrar", [*REGISTRAR, "agent", "--config", str(cfg)],
                  pid_namespace=NAMESPACES),
        Container("app", setup.app(),
                  pre_stop=Exec([*REGISTRAR, "prestop", "--control", setup.control],
                                delay=0.3)),
    ]), None, setup.ready)
    pod.delete()
    hook = pod.timeline.one("hook_end", "app")
    assert hook.detail["exit_code"] == 0, pod.report()
    assert hook.detail["output"].startswith("deregistered after SIGTERM"), pod.report()


def test_sidecar_prestop_hook_with_config_falls_back_to_deregistering_itself(pods, setup):
    """A hook that comes after the agent has gone (here 2.5 s late, past the agent's 1 s
    linger; ``health: false``, so the agent does not wait while the app listens): with
    --config it deregisters directly, and confirms."""
    cfg = setup.config(grace=10, health=False)  # the fallback imports a backend: slow under load
    watch = setup.watch()
    pod = start(pods, setup.pod([
        Container("registrar", [*REGISTRAR, "agent", "--config", str(cfg)],
                  pid_namespace=NAMESPACES),
        Container("app", setup.app(),
                  pre_stop=Exec([*REGISTRAR, "prestop", "--control", setup.control,
                                 "--config", str(cfg)], delay=2.5)),
    ]), watch, lambda: setup.ready() and watch.listed_everywhere())
    pod.delete()
    figures("1b sidecar+prestop --config", pod, watch, setup)
    assert_removed_before_sigterm(pod, watch, setup)
    assert_no_sigkill(pod)
    hook = pod.timeline.one("hook_end", "app")
    assert hook.detail["exit_code"] == 0, pod.report()
    assert "no agent at" in hook.detail["output"], pod.report()
    assert "deregistered after preStop (direct)" in hook.detail["output"], pod.report()
    assert "confirmed 3/3 observers" in hook.detail["output"], pod.report()


# -- 2. and 3. the wrapper: preStop httpGet, or SIGTERM alone ------------------------

def test_wrapper_with_prestop_http_get(pods, setup):
    cfg = setup.config(grace=5)
    watch = setup.watch()
    pod = start(pods, setup.pod([
        Container("app", [*REGISTRAR, "run", "--config", str(cfg), "--", *setup.app()],
                  pre_stop=HttpGet(setup.control_port, "/prestop"), pid_namespace=NAMESPACES),
    ]), watch, lambda: setup.ready() and watch.listed_everywhere())
    pod.delete()
    figures("2 wrapper+prestop httpGet", pod, watch, setup)
    assert_removed_before_sigterm(pod, watch, setup)
    hook = pod.timeline.one("hook_end", "app")
    assert hook.detail["status"] == 200, pod.report()
    answer = json.loads(hook.detail["output"])
    assert answer["ok"] and answer["summary"].startswith("deregistered after preStop"), answer
    # The wrapper signals its app itself once the removal is confirmed: the
    # kubelet's SIGTERM after the hook reaches a wrapper already stopping.
    assert "sending SIGTERM to the app" in pod["app"].log()
    assert_no_sigkill(pod)
    assert pod.exited("app").detail["status"] == 0, pod.report()
    assert app_event(setup.events, "exit"), "the app did not shut down by itself"


def test_wrapper_with_sigterm_only(pods, setup):
    """No hook: the wrapper deregisters first, then forwards SIGTERM."""
    cfg = setup.config(grace=5)
    watch = setup.watch()
    pod = start(pods, setup.pod([
        Container("app", [*REGISTRAR, "run", "--config", str(cfg), "--", *setup.app()],
                  pid_namespace=NAMESPACES),
    ]), watch, lambda: setup.ready() and watch.listed_everywhere())
    pod.delete()
    figures("3 wrapper SIGTERM only", pod, watch, setup)
    assert_removed_before_sigterm(pod, watch, setup)
    assert pod.timeline.one("SIGTERM", "app").t < watch.gone_at
    assert_no_sigkill(pod)
    assert pod.exited("app").detail["status"] == 0, pod.report()
    log = pod["app"].log()
    order = [log.index("stopping after SIGTERM"), log.index("deregistered after SIGTERM"),
             log.index("sending SIGTERM to the app")]
    assert order == sorted(order), log


# -- 4. library mode -------------------------------------------------------------------

def test_library_mode_app_handler_runs_after_removal(pods, setup):
    cfg = setup.config(grace=5, control=False)
    watch = setup.watch()
    pod = start(pods, setup.pod([
        Container("app", [PY, str(APPS / "libapp.py"), "--config", str(cfg),
                          "--port", str(setup.port), "--events", str(setup.events)],
                  pid_namespace=NAMESPACES),
    ]), watch, lambda: setup.app_ready() and watch.listed_everywhere())
    pod.delete()
    delivered = [e for e in read_events(setup.events) if e["event"] == "delivered"]
    handled = app_event(setup.events, "sigterm")
    figures("4 library mode", pod, watch, setup, **{
        "SIGTERM->own handler": f"{1000 * (handled['mono'] - delivered[0]['mono']):.1f}ms"})
    sigterm = assert_removed_before_sigterm(pod, watch, setup)
    # The kubelet's SIGTERM, then the registrar's re-delivery once done.
    assert len(delivered) == 2 and delivered[0]["mono"] < watch.gone_at, pod.report()
    assert app_event(setup.events, "sigterm")["registrar_report"] is True
    assert delivered[1]["mono"] <= sigterm
    assert_no_sigkill(pod)
    assert pod.exited("app").detail["status"] == 0, pod.report()
    assert "deregistered after SIGTERM" in pod["app"].log()


# -- 5. the registry unreachable at stop time ----------------------------------------

def test_registry_unreachable_at_stop_time(pods, setup):
    """Every member's client port drops packets: the wrapper gives up when
    the registry's part of the budget ends (stop.app_shutdown is kept for
    the app), says what it could not do, lets the app stop by itself and
    exits before SIGKILL; the entry then expires by itself within its TTL."""
    if not Blackhole.available():
        pytest.skip("nftables is not usable here")
    ttl = 2.0
    cfg = setup.config(grace=3, ttl=f"{ttl}s", timeout="0.5s")
    watch = setup.watch()
    pod = start(pods, setup.pod([
        Container("app", [*REGISTRAR, "run", "--config", str(cfg), "--", *setup.app()],
                  env={"CHECK_ETCD_ENDPOINTS": ""},  # the app could not ask either
                  pid_namespace=NAMESPACES),
    ], grace=3), watch, lambda: setup.ready() and watch.listed_everywhere())
    ports = [urlsplit(ep).port for ep in setup.etcd.endpoints]
    with Blackhole(ports, mode="drop"):
        cut_at = time.monotonic()
        pod.delete()
    watch.wait(watch.gone_everywhere, max(cut_at + ttl + 1.5 - time.monotonic(), 0.1),
               "the entry expired by itself")
    figures("5 registry blackholed", pod, watch, setup,
            **{"cut->gone (TTL expiry, first seen after the cut)":
               f"{1000 * (watch.gone_at - cut_at):.0f}ms"})
    assert_no_sigkill(pod)
    log = pod["app"].log()
    incomplete = [line for line in log.splitlines() if "stop incomplete" in line]
    assert len(incomplete) == 1 and " ERROR " in incomplete[0], pod.report()
    assert "stop incomplete after SIGTERM" in incomplete[0] and "NOT removed" in incomplete[0]
    # The app still had time of its own: it stopped by itself, not by SIGKILL.
    assert app_event(setup.events, "sigterm") and app_event(setup.events, "exit"), pod.report()
    assert pod.exited("app").detail["status"] == 0, pod.report()
    assert not any(m.relisted for m in watch.members)


# -- 6. SIGTERM during start-up, before the first registration -------------------------

def test_sigterm_while_the_health_gate_holds_registration_back(pods, setup):
    cfg = setup.config(grace=5, health={"http": f"http://127.0.0.1:{setup.port}/health",
                                        "interval": "100ms", "timeout": "200ms"})
    watch = setup.watch()
    pod = start(pods, setup.pod([
        Container("app", [*REGISTRAR, "run", "--config", str(cfg), "--",
                          *setup.app("--health", "never")], pid_namespace=NAMESPACES),
    ]), watch, lambda: setup.app_ready()
        and _get(f"http://{setup.control}/healthz")[0] == 200)
    time.sleep(0.3)  # a few probes fail
    assert _get(f"http://{setup.control}/readyz")[0] == 503
    pod.delete()
    figures("6a SIGTERM before registering (health gate)", pod, None, setup)
    assert all(m.first_listed is None and m.polls for m in watch.members), watch.describe()
    assert_no_sigkill(pod)
    assert pod.exited("app").t - pod.deleted_at < 1.0, pod.report()
    assert pod.exited("app").detail["status"] == 0, pod.report()
    assert app_event(setup.events, "exit"), pod.report()
    assert "deregistered after SIGTERM" in pod["app"].log()


def test_sigterm_while_the_registry_cannot_be_reached_yet(pods, setup):
    (dead,) = free_ports(1)
    cfg = setup.config(grace=5, endpoints=[f"http://127.0.0.1:{dead}"],
                       health=False)  # no app in this pod
    pod = setup.pod([Container("registrar", [*REGISTRAR, "agent", "--config", str(cfg)],
                               pid_namespace=NAMESPACES)])
    start(pods, pod, None, lambda: "register failed, retrying" in pod["registrar"].log())
    pod.delete()
    took = pod.exited("registrar").t - pod.deleted_at
    figures("6b SIGTERM before registering (registry down)", pod, None, None)
    assert_no_sigkill(pod)
    # Nothing was registered: one removal attempt (of an entry whose answer
    # was lost), refused at once, and the stop is done -- not retried for the
    # TTL, not a failure; then the agent answers late /prestop calls for
    # 0.5 s and closes. (An earlier incarnation's entry ends with its TTL.)
    assert took < 0.5 + 1.0, pod.report()
    assert pod.exited("registrar").detail["status"] == 0, pod.report()
    assert "never registered" in pod["registrar"].log()


# -- 7. the app crashes ----------------------------------------------------------------

@pytest.mark.parametrize("how,status", [("crash?code=3", 3), ("kill?sig=KILL", 128 + 9)])
def test_app_crash_deregisters_at_once_and_exits_with_its_status(pods, setup, how, status):
    cfg = setup.config(grace=5)
    watch = setup.watch()
    pod = start(pods, setup.pod([
        Container("app", [*REGISTRAR, "run", "--config", str(cfg), "--", *setup.app()],
                  pid_namespace=NAMESPACES),
    ]), watch, lambda: setup.ready() and watch.listed_everywhere())
    watch.fast()
    crash_at = time.monotonic()
    try:
        _get(f"http://127.0.0.1:{setup.port}/{how}")
    except OSError:
        pass  # it may die before the answer is out
    assert pod["app"].exited.wait(5), pod.report()
    watch.wait(watch.gone_everywhere, 1, "every member dropped the crashed app")
    print(f"\nFIGURES 7 app {how}: crash->gone everywhere "
          f"{1000 * (watch.gone_at - crash_at):.1f}ms, crash->wrapper exit "
          f"{1000 * (pod.exited('app').t - crash_at):.1f}ms")
    assert pod.exited("app").detail["status"] == status, pod.report()
    assert watch.gone_at - crash_at < 0.5, pod.report()
    log = pod["app"].log()
    assert f"the app exited with status {status}: deregistering" in log
    assert f"deregistered after app exited ({status})" in log


# -- 8. preStop, SIGTERM and a second /prestop at once -----------------------------------

@pytest.mark.parametrize("mode", ["agent", "run"])
def test_prestop_sigterm_and_prestop_again_make_one_deregistration(pods, setup, mode):
    # min_wait keeps the sequence open long enough for all three to overlap
    # (the hook command needs ~50 ms to start).
    cfg = setup.config(grace=5, min_wait="500ms",
                       health=False if mode == "agent" else None)  # agent: no app in the pod
    argv = [*REGISTRAR, mode, "--config", str(cfg), "--log-level", "debug"]
    if mode == "run":
        argv += ["--", *setup.app()]
    watch = setup.watch()
    pod = start(pods, setup.pod([Container("c", argv, pid_namespace=NAMESPACES)]), watch,
                lambda: (setup.ready() if mode == "run" else
                         _get(f"http://{setup.control}/readyz")[0] == 200)
                and watch.listed_everywhere())
    watch.fast()
    results: dict[str, object] = {}
    barrier = threading.Barrier(3)

    def hook():
        barrier.wait()
        results["exec"] = subprocess.run([*REGISTRAR, "prestop", "--control", setup.control],
                                         capture_output=True, text=True, timeout=10)

    def http():
        barrier.wait()
        results["http"] = _get(f"http://{setup.control}/prestop", timeout=10)

    def sigterm():
        barrier.wait()
        pod.signal("c", signal.SIGTERM)

    threads = [threading.Thread(target=f) for f in (hook, http, sigterm)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert pod["c"].exited.wait(5), pod.report()
    log = pod["c"].log()
    assert log.count("stopping after") == 1, log
    assert log.count("/kv/lease/revoke") == 1, log
    final = [line.split("registrar.podstop: ", 1)[1] for line in log.splitlines()
             if "registrar.podstop: deregistered after" in line]
    assert len(final) == 1, log
    status, body = results["http"]
    assert status == 200, (body, log)
    assert results["exec"].returncode == 0, (results["exec"], log)
    assert results["exec"].stdout.strip() == json.loads(body)["summary"] == final[0], log
    assert pod.exited("c").detail["status"] == 0, pod.report()
    assert watch.gone_everywhere()


# -- the wrapper as PID 1 ----------------------------------------------------------------

@pytest.mark.parametrize("app_args,status", [(["--exit-code", "7"], 7),
                                             (["--on-term", "die"], 128 + 15)])
def test_wrapper_exits_with_the_apps_status(pods, setup, app_args, status):
    cfg = setup.config(grace=5)
    pod = start(pods, setup.pod([
        Container("app", [*REGISTRAR, "run", "--config", str(cfg), "--", *setup.app(*app_args)],
                  pid_namespace=NAMESPACES),
    ]), None, setup.ready)
    pod.delete()
    assert_no_sigkill(pod)
    assert pod.exited("app").detail["status"] == status, pod.report()


@pytest.mark.skipif(not NAMESPACES,
                    reason="needs `unshare --pid` (root) to run the wrapper as PID 1")
def test_wrapper_as_pid1_reaps_orphans_and_forwards_sighup(pods, setup):
    cfg = setup.config(grace=5)
    pod = start(pods, setup.pod([
        Container("app", [*REGISTRAR, "run", "--config", str(cfg), "--", *setup.app()],
                  pid_namespace=True),
    ]), None, setup.ready)
    wrapper = pod["app"].pid1
    (app,) = children(wrapper)

    pod.signal("app", signal.SIGHUP)
    wait_until(lambda: app_event(setup.events, "sighup"), 2, "the app got the SIGHUP")

    assert _get(f"http://127.0.0.1:{setup.port}/orphan")[0] == 200
    # The grandchild's parent has exited: it is re-parented to PID 1, the wrapper...
    wait_until(lambda: len(children(wrapper)) == 2, 2, "the orphan was re-parented to the wrapper")
    wait_until(lambda: app_event(setup.events, "orphan_exit"), 2, "the orphan exited")
    # ...which must reap it: no zombie stays behind.
    wait_until(lambda: children(wrapper) == [app], 2, "the wrapper reaped the orphan")
    assert process_state(app) != "Z"
    pod.delete()
    assert_no_sigkill(pod)
    assert pod.exited("app").detail["status"] == 0, pod.report()


@pytest.mark.skipif(not NAMESPACES, reason="needs `unshare --pid`: a wrapper that dies here "
                    "must take its app with it")
def test_wrapper_survives_a_burst_of_signals(pods, setup):
    """SIGHUPs as fast as they come for 0.5 s (a reload storm; SIGCHLDs of a
    forking app hit the same path): the wrapper must still forward them,
    then stop cleanly. (A Python handler that sets a threading.Event
    deadlocks, or nests until RecursionError, under this.)"""
    cfg = setup.config(grace=5)
    pod = start(pods, setup.pod([
        Container("app", [*REGISTRAR, "run", "--config", str(cfg), "--", *setup.app()],
                  pid_namespace=NAMESPACES),
    ]), None, setup.ready)
    end = time.monotonic() + 0.5
    try:
        while time.monotonic() < end:
            os.kill(pod["app"].pid1, signal.SIGHUP)
    except ProcessLookupError:
        pass  # it died under the burst
    time.sleep(0.2)
    assert not pod["app"].exited.is_set(), f"the wrapper died\n{pod.report()}"
    wait_until(lambda: app_event(setup.events, "sighup"), 2, "the app got SIGHUPs")
    pod.delete()
    assert_no_sigkill(pod)
    assert pod.exited("app").detail["status"] == 0, pod.report()


# -- stop.drain_connections -----------------------------------------------------------------

def test_drain_connections_holds_the_apps_sigterm_until_the_connection_closes(pods, setup):
    cfg = setup.config(grace=5, drain_connections=True)
    watch = setup.watch()
    pod = start(pods, setup.pod([
        Container("app", [*REGISTRAR, "run", "--config", str(cfg), "--", *setup.app()],
                  pid_namespace=NAMESPACES),
    ]), watch, lambda: setup.ready() and watch.listed_everywhere())
    client = socket.create_connection(("127.0.0.1", setup.port))
    try:
        wait_until(lambda: established_connections(setup.port) == 1, 2, "the connection is counted")
        deleting = threading.Thread(target=pod.delete)
        deleting.start()
        watch.wait(watch.gone_everywhere, 3, "the removal reached every member")
        time.sleep(0.3)
        assert app_event(setup.events, "sigterm") is None, "SIGTERM came with a connection open"
        closed_at = time.monotonic()
    finally:
        client.close()
    deleting.join(10)
    sigterm = assert_removed_before_sigterm(pod, watch, setup)
    figures("drain connections", pod, watch, setup,
            **{"close->app SIGTERM": f"{1000 * (sigterm - closed_at):.1f}ms"})
    assert closed_at < sigterm < closed_at + 0.3, pod.report()
    assert f"waiting for 1 connection(s) to port {setup.port} to close" in pod["app"].log()
    assert_no_sigkill(pod)
    assert pod.exited("app").detail["status"] == 0, pod.report()


def test_drain_connections_is_bounded_by_the_deadline(pods, setup):
    """A connection that never closes: the app's SIGTERM is held back, but
    only until the registry's part of the budget ends (grace 4 s - safety
    margin 1 s - stop.app_shutdown, at most half: 1.5 s), so that the app
    still stops by itself before the deadline."""
    cfg = setup.config(grace=4, drain_connections=True)
    pod = start(pods, setup.pod([
        Container("app", [*REGISTRAR, "run", "--config", str(cfg), "--", *setup.app()],
                  pid_namespace=NAMESPACES),
    ], grace=4), None, setup.ready)
    with socket.create_connection(("127.0.0.1", setup.port)):
        wait_until(lambda: established_connections(setup.port) == 1, 2, "the connection is counted")
        pod.delete()
    figures("drain connections, never closed", pod, None, setup)
    assert_no_sigkill(pod)
    assert f"1 connection(s) to port {setup.port} still open" in pod["app"].log()
    sigterm = app_event(setup.events, "sigterm")
    assert sigterm and 1.4 < sigterm["mono"] - pod.deleted_at < 4 - 1, pod.report()
    assert app_event(setup.events, "exit"), pod.report()
    assert pod.exited("app").detail["status"] == 0, pod.report()


# -- 9. the defaults: registered once the app listens, busy connections drained ---------

def _not_listed_before_listening(watch: EtcdWatch, setup: Setup) -> None:
    listening = app_event(setup.events, "listening")
    assert listening, "the app never listened"
    first = [m.first_listed for m in watch.members]
    assert all(t is not None and t > listening["mono"] for t in first), \
        f"a member listed the pod before the app listened: {first} vs {listening['mono']}"


@pytest.mark.parametrize("mode", ["run", "agent"])
def test_a_new_pod_is_registered_only_once_its_app_listens(pods, setup, mode):
    """The default gate (no health section): service.port accepts a TCP connection."""
    cfg = setup.config(grace=5)
    app = setup.app("--listen-after", "2.5")
    if mode == "run":
        containers = [Container("app", [*REGISTRAR, "run", "--config", str(cfg), "--", *app],
                                pid_namespace=NAMESPACES)]
    else:
        containers = [Container("registrar", [*REGISTRAR, "agent", "--config", str(cfg)],
                                pid_namespace=NAMESPACES), Container("app", app)]
    watch = setup.watch()
    pod = start(pods, setup.pod(containers), watch, watch.listed_everywhere)
    _not_listed_before_listening(watch, setup)
    assert _get(f"http://{setup.control}/readyz")[0] == 200
    log = pod["app" if mode == "run" else "registrar"].log()
    assert f"waiting for the app before registering: 127.0.0.1:{setup.port}" in log, log


def test_an_app_that_never_listens_is_never_registered_and_readyz_says_why(pods, setup):
    cfg = setup.config(grace=5)
    watch = setup.watch()
    pod = start(pods, setup.pod([
        Container("app", [*REGISTRAR, "run", "--config", str(cfg), "--",
                          *setup.app("--listen-after", "never")], pid_namespace=NAMESPACES),
    ]), watch, lambda: _get(f"http://{setup.control}/readyz")[0] == 503)
    time.sleep(1.0)  # proving a negative: a dozen probes fail meanwhile
    status, body = _get(f"http://{setup.control}/readyz")
    assert status == 503, body
    reason = json.loads(body)["reason"]
    assert reason.startswith(f"waiting for the app: 127.0.0.1:{setup.port}: ") \
        and "refused" in reason, reason
    assert all(m.first_listed is None for m in watch.members), watch.describe()
    pod.delete()
    assert_no_sigkill(pod)


class _KeepAlive:
    """An HTTP/1.1 client connection that stays open between requests."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.file = self.sock.makefile("rb")

    def get(self, path: str) -> int:
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: app\r\n\r\n".encode())
        status = int(self.file.readline().split()[1])
        length = 0
        while (line := self.file.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        self.file.read(length)
        return status

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _slow_request(port: int, ms: int, out: dict) -> threading.Thread:
    def run():
        client = _KeepAlive(port)
        try:
            out["status"] = client.get(f"/slow?ms={ms}")
        except OSError as exc:
            out["error"] = repr(exc)
        finally:
            out["done"] = time.monotonic()
            client.close()
    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("mode", ["run", "agent"])
def test_the_stop_waits_for_a_request_in_progress_but_not_for_an_idle_keepalive(pods, setup,
                                                                                mode):
    """Default config but the wait for consumers (test_quiescence.py has the
    two together). An idle keep-alive connection and a request in progress
    when the pod is deleted: the app gets SIGTERM (run: from the wrapper;
    agent: from the kubelet, once /prestop returned) right after the request
    completes, not at the deadline."""
    cfg = setup.config(grace=10, quiesce=False)
    app = setup.app()
    if mode == "run":
        containers = [Container("app", [*REGISTRAR, "run", "--config", str(cfg), "--", *app],
                                pre_stop=HttpGet(setup.control_port, "/prestop"),
                                pid_namespace=NAMESPACES)]
    else:
        containers = [Container("registrar", [*REGISTRAR, "agent", "--config", str(cfg)],
                                pid_namespace=NAMESPACES),
                      Container("app", app, pre_stop=HttpGet(setup.control_port, "/prestop"))]
    watch = setup.watch()
    pod = start(pods, setup.pod(containers, grace=10), watch,
                lambda: setup.ready() and watch.listed_everywhere())
    idle = _KeepAlive(setup.port)
    try:
        assert idle.get("/") == 200
        time.sleep(0.2)  # idle: silent for longer than drain_quiet (50 ms)
        slow: dict = {}
        request = _slow_request(setup.port, 700, slow)
        wait_until(lambda: len([c for c in _conns(setup.port) if c.busy(0.1)]) >= 1, 2,
                   "the slow request is busy")
        pod.delete()
        request.join(10)
    finally:
        idle.close()
    figures(f"drain busy ({mode})", pod, watch, setup)
    assert slow.get("status") == 200, slow
    sigterm = assert_removed_before_sigterm(pod, watch, setup)
    assert slow["done"] - 0.05 < sigterm < slow["done"] + 0.5, (slow["done"], sigterm, pod.report())
    assert sigterm - pod.deleted_at < 2.0, pod.report()  # nowhere near the 10 s deadline
    log = pod.logs()
    assert f"waiting for 1 busy connection(s) to port {setup.port}: " in log, log
    assert "request being processed" in log, log
    assert_no_sigkill(pod)


def test_a_streaming_response_holds_the_stop_until_its_share_of_the_deadline(pods, setup):
    """A response still streaming is busy: the app's SIGTERM waits, but only
    until the registry's part of the budget ends (grace 4 s - safety margin
    1 s - app_shutdown, at most half: 1.5 s), and the report says what was cut."""
    cfg = setup.config(grace=4)
    pod = start(pods, setup.pod([
        Container("app", [*REGISTRAR, "run", "--config", str(cfg), "--", *setup.app()],
                  pre_stop=HttpGet(setup.control_port, "/prestop"), pid_namespace=NAMESPACES),
    ], grace=4), None, setup.ready)
    def read_stream():
        try:
            _get(f"http://127.0.0.1:{setup.port}/stream?chunks=500&every=10", timeout=10)
        except Exception:  # noqa: BLE001 - the app's end cuts the stream, as it should
            pass

    streaming = threading.Thread(target=read_stream)
    streaming.start()
    wait_until(lambda: any(c.busy(0.1) for c in _conns(setup.port)), 2, "the stream is busy")
    pod.delete()
    streaming.join(10)
    figures("drain, a stream never ends", pod, None, setup)
    assert_no_sigkill(pod)
    sigterm = app_event(setup.events, "sigterm")
    assert sigterm and 1.4 < sigterm["mono"] - pod.deleted_at < 4 - 1, pod.report()
    assert f"1 connection(s) to port {setup.port} still busy at the deadline" in pod.logs()
    hook = pod.timeline.one("hook_end", "app")
    drain = json.loads(hook.detail["output"])["drain"]
    assert drain["mode"] == "busy" and len(drain["cut"]) == 1, drain


# -- stop.quiesce: a consumer that caches ------------------------------------------------

@pytest.mark.parametrize("mode", ["run", "agent"])
def test_a_consumer_that_caches_loses_nothing_and_is_named(pods, setup, mode):
    """Default config. A consumer sends 100 requests/s and keeps sending to
    the pod for 1.5 s after every member dropped it (its cache refreshes
    then). The app dies on SIGTERM: it gets SIGTERM only once the consumer
    has stopped, no request fails, and the report names the consumer."""
    cfg = setup.config(grace=10)
    app = setup.app("--on-term", "die")
    if mode == "run":
        containers = [Container("app", [*REGISTRAR, "run", "--config", str(cfg), "--", *app],
                                pre_stop=HttpGet(setup.control_port, "/prestop"))]
    else:
        containers = [Container("registrar", [*REGISTRAR, "agent", "--config", str(cfg)]),
                      Container("app", app, pre_stop=HttpGet(setup.control_port, "/prestop"))]
    watch = setup.watch()
    pod = start(pods, setup.pod(containers, grace=10), watch,
                lambda: setup.ready() and watch.listed_everywhere())
    consumer = Sender(setup.port, 100, "close")
    consumer.start()
    time.sleep(2.0)  # its traffic before the stop
    deleting = threading.Thread(target=pod.delete)
    deleting.start()
    watch.wait(watch.gone_everywhere, 3, "the removal reached every member")
    time.sleep(1.5)  # the consumer's cache still lists the pod
    last = consumer.stop()
    deleting.join(15)
    sigterm = assert_removed_before_sigterm(pod, watch, setup)
    figures(f"cached consumer ({mode})", pod, watch, setup,
            **{"last request->app SIGTERM": f"{1000 * (sigterm - last):.0f}ms"})
    assert consumer.failed == 0, pod.report()
    assert last < sigterm < last + 1.0, pod.report()  # a window of 0.1 s, then the drain
    hook = pod.timeline.first("hook_end")
    assert "late traffic: 127.0.0.1 sent" in hook.detail["output"], pod.report()
    (line,) = [ln for ln in pod.logs().splitlines() if "registrar.podstop: " in ln]
    assert "late traffic: 127.0.0.1 sent" in line
    print(f"\nLOG {line}")  # the README's excerpt comes from here (pytest -s)
    assert_no_sigkill(pod)
