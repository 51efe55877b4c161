"""No registry at all (issue 28): a config without ``backends`` is a pod
behind a Kubernetes Service only. The stop then begins at the trigger and
holds the pod until its consumers stop opening connections to it (the
Service's data path dropped it), lets a keep-alive connection that conntrack
keeps on the pod hold nothing, and reports without pretending a registry
took part. Real processes (the kubelet simulator, tests/apps/httpapp.py,
`registrar run` / `agent`), real connections; no registry server needed."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from registrar import Registrar
from registrar_testing import free_ports
from registrar_testing import http_get as _get
from registrar_testing.kubelet import Container, HttpGet, Pod, app_event
from registrar_testing.senders import Sender

PY = sys.executable
APPS = Path(__file__).parent / "apps"
REGISTRAR = [PY, "-m", "registrar"]


def _config(tmp_path: Path, port: int, control_port: int | None, **top) -> Path:
    doc = {"service": {"name": "web", "port": port},
           "stop": {"grace_period": "10s", "safety_margin": "1s"},
           "control": {"listen": f"127.0.0.1:{control_port}" if control_port else None}, **top}
    path = tmp_path / f"registrar-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*REGISTRAR, *args], capture_output=True, text=True, timeout=30,
                          env={"POD_IP": "127.0.0.1", "PATH": "/usr/bin:/bin"})


# -- the configuration and the one-shot commands ------------------------------------------

@pytest.mark.parametrize("backends", ["absent", "empty"])
def test_a_config_without_backends_is_valid_and_check_says_so(tmp_path, backends):
    top = {} if backends == "absent" else {"backends": []}
    cfg = _config(tmp_path, 8080, None, **top)
    done = _cli("check", "--effective", "-c", str(cfg))
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().endswith(
        "valid: web/" + yaml.safe_load(done.stdout)["service"]["id"]
        + " at 127.0.0.1:8080 with no registry (the stop waits for consumers only)")
    assert yaml.safe_load(done.stdout)["backends"] == []


@pytest.mark.parametrize("verb", ["register", "deregister"])
def test_register_and_deregister_refuse_a_config_without_backends(tmp_path, verb):
    done = _cli(verb, "-c", str(_config(tmp_path, 8080, None)))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"config error: backends: none given: nothing to {verb} (a config without backends "
        f"is for `run`, `agent` and the library)"]


def test_status_without_backends_says_there_is_no_registry(tmp_path):
    done = _cli("status", "-c", str(_config(tmp_path, 8080, None)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1] == "  no registry: nothing to look up"


# -- the library ------------------------------------------------------------------------

@pytest.fixture
def app_port():
    """An HTTP/1.1 app (keep-alive) on a free port, in this process."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    (port,) = free_ports(1)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield port
    server.shutdown()
    server.server_close()


def test_library_without_backends_gates_on_the_app_and_holds_until_new_connections_stop(
        app_port, caplog):
    """start(wait=True) returns once the app answers its probe; stop() holds
    while a consumer still opens connections (the data path has not dropped
    the pod yet), not for a keep-alive connection conntrack keeps on it."""
    r = Registrar.from_config({"service": {"name": "web", "port": app_port},
                               "stop": {"grace_period": "10s", "safety_margin": "1s"}},
                              environ={"POD_IP": "127.0.0.1"})
    r.start(wait=True, timeout=5)
    assert r.readiness() == (True, "serving (no registry)")
    assert r.status(observe=True)["state"] == "serving"
    opener = Sender(app_port, 100, "close", source="127.0.0.2")
    pinned = Sender(app_port, 30, "keepalive", source="127.0.0.3")
    opener.start()
    pinned.start()
    time.sleep(1.0)  # the rates before the stop
    stopping = threading.Thread(target=lambda: r.stop("test"))
    began = time.monotonic()
    stopping.start()
    time.sleep(1.0)  # the endpoints' removal reaches the data path 1 s after the trigger
    last = opener.stop()
    stopping.join(10)
    ended = time.monotonic()
    pinned_last = pinned.stop()
    report = r.report
    assert report is not None and report.ok and report.backends == []
    q = report.quiescence
    assert q.after == "the stop began" and not q.cut, q
    # Held past the last new connection, and not by the pinned keep-alive one,
    # which sent until after the stop had ended.
    assert last < ended < pinned_last, (last - began, ended - began, q)
    assert q.quiet_after_seconds >= last - began
    assert opener.failed == 0 and pinned.failed == 0
    late = {p.peer: p for p in q.late}
    assert late["127.0.0.2"].connections > 0
    assert late["127.0.0.3"].connections == 0 and late["127.0.0.3"].requests > 0
    line = report.summary()
    assert line.startswith("stopped after test in ") and ": no registry; consumers: quiet " in line
    assert "since the trigger: 127.0.0.2 sent " in line and "deregister" not in line


def test_library_without_backends_not_ready_until_the_app_answers(caplog):
    (port,) = free_ports(1)
    r = Registrar.from_config({"service": {"name": "web", "port": port}},
                              environ={"POD_IP": "127.0.0.1"})
    with pytest.raises(Exception, match=r"not ready after 0.3s: waiting for the app: "
                                        r"127.0.0.1:\d+: Connection refused"):
        r.start(wait=True, timeout=0.3)
    ready, why = r.readiness()
    assert not ready and why.startswith("waiting for the app")
    r.stop("test")


# -- end to end: `run` and `agent` under the kubelet simulator -------------------------------

@pytest.fixture
def pods():
    made: list[Pod] = []
    yield made
    for pod in made:
        pod.kill()


@pytest.mark.parametrize("mode", ["run", "agent"])
def test_service_only_pod_serves_until_the_data_path_stops_opening_connections(
        pods, tmp_path, mode):
    """Default config without backends. A consumer opens a connection per
    request (100/s) and goes on for 1.5 s after the pod's deletion (kube-
    proxy's lag); a keep-alive consumer's connection stays on the pod. The
    app dies on SIGTERM: it gets it only after the last new connection, the
    first consumer loses nothing, and the report says what held the pod."""
    port, control_port = free_ports(2)
    events = tmp_path / "events.jsonl"
    cfg = _config(tmp_path, port, control_port)
    app = [PY, str(APPS / "httpapp.py"), "--port", str(port), "--events", str(events),
           "--on-term", "die"]
    hook = HttpGet(control_port, "/prestop")
    if mode == "run":
        containers = [Container("app", [*REGISTRAR, "run", "--config", str(cfg), "--", *app],
                                pre_stop=hook)]
    else:
        containers = [Container("registrar", [*REGISTRAR, "agent", "--config", str(cfg)]),
                      Container("app", app, pre_stop=hook)]
    pod = Pod(f"svc-{uuid.uuid4().hex[:6]}", containers, tmp_path / "pod", grace_period=10,
              env={"POD_IP": "127.0.0.1"})
    pods.append(pod)
    pod.start()
    pod.wait_ready(lambda: _get(f"http://127.0.0.1:{control_port}/readyz")[0] == 200
                   and app_event(events, "ready") is not None, 15, "ready")
    assert json.loads(_get(f"http://127.0.0.1:{control_port}/readyz")[1])["reason"] == \
        "serving (no registry)"
    opener = Sender(port, 100, "close", source="127.0.0.2")
    pinned = Sender(port, 20, "keepalive", source="127.0.0.3")
    opener.start()
    pinned.start()
    time.sleep(2.0)
    deleting = threading.Thread(target=pod.delete)
    deleting.start()
    time.sleep(1.5)  # the endpoints' removal reaches the data path
    last = opener.stop()
    deleting.join(15)
    pinned.stop()
    sigterm = app_event(events, "sigterm")
    assert sigterm, pod.report()
    assert opener.failed == 0, pod.report()
    # After the last new connection; not held to the deadline by the pinned one.
    assert last < sigterm["mono"] < pod.deleted_at + 9 - 5, pod.report()
    output = json.loads(pod.timeline.first("hook_end").detail["output"])
    assert output["backends"] == [] and output["ok"], output
    assert not output["quiescence"]["cut"] and not output["drain"]["cut"], output
    (line,) = [ln for ln in pod.logs().splitlines() if "registrar.podstop: stopped" in ln]
    assert ": no registry; consumers: quiet " in line and "since the trigger: 127.0.0.2" in line
    # The keep-alive client's connection was not waited for: the app's shutdown ends it.
    assert output["drain"]["left"] == {"127.0.0.3": 1}, output
    assert "left to the app's shutdown: 1 kept connection(s) of 127.0.0.3" in line
    print(f"\nLOG {line}")
    assert not pod.timeline.find("SIGKILL"), pod.report()


def test_a_keep_alive_pool_that_recycles_its_connections_holds_nothing(app_port):
    """A pool of 4 connections, each replaced every 2 s: 2 new connections/s,
    which alone would hold the stop 4.6 s after each, and keep holding it while
    the pool recycles. Its connections carry ~40 requests each and live 2 s:
    it keeps its connections, and conntrack keeps them on the pod whatever
    the endpoints say, so it holds nothing."""
    r = Registrar.from_config({"service": {"name": "web", "port": app_port},
                               "stop": {"grace_period": "10s", "safety_margin": "1s"}},
                              environ={"POD_IP": "127.0.0.1"})
    r.start(wait=True, timeout=5)
    pool = [Sender(app_port, 20, "keepalive", source="127.0.0.3", recycle=2.0)
            for _ in range(4)]
    for sender in pool:
        sender.start()
        time.sleep(0.5)  # staggered: the pool replaces one connection every 0.5 s
    time.sleep(2.0)
    report = r.stop("test")
    for sender in pool:
        sender.stop()
    q = report.quiescence
    assert q.why.startswith("keep-alive only: 127.0.0.3 "), q
    assert not q.cut and report.drain is None
    assert all(sender.failed == 0 for sender in pool)


def test_the_readmes_service_only_config_is_valid(tmp_path):
    """The README's quickstart for a Services user, as written."""
    import re

    from registrar import config

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (block,) = re.findall(r"```yaml\n(# agent.yaml: no backends\n.*?)```", readme, re.DOTALL)
    (tmp_path / "token").write_text("a-token")
    path = tmp_path / "agent.yaml"
    path.write_text(block.replace("/var/run/registrar/token", str(tmp_path / "token")))
    cfg = config.load(path, environ={"POD_IP": "10.244.0.9"})
    assert cfg.backends == () and cfg.stop.quiesce and cfg.service.port == 8080
    assert cfg.control.listen == "10.244.0.9:9901"
