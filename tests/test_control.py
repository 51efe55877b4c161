"""The control server and the `registrar prestop` hook command."""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from registrar import Instance, Registrar
from registrar import prestop as prestop_cmd
from registrar.config import StopConfig
from registrar.connections import established_connections
from registrar.control import ControlServer
from registrar.lifecycle import Lifecycle, app_listening
from registrar_testing import wait_until
from registrar_testing.memory import FakeClock, MemoryBackend, MemoryRegistry

INSTANCE = Instance("web", "web-0", "10.0.0.5", 8080)


@pytest.fixture
def registry():
    return MemoryRegistry(members=2, lag=0.05)


@pytest.fixture
def registrar(registry):
    registrar = Registrar(INSTANCE, [MemoryBackend(INSTANCE, registry=registry)],
                          stop=StopConfig(grace_period=10, safety_margin=1))
    registrar.start(wait=True, timeout=5)
    yield registrar
    registrar.stop()


def serve(registrar, listen="127.0.0.1:0", token=None, **kwargs):
    life = Lifecycle(registrar)
    return ControlServer(registrar, listen, lambda: life.stop("preStop (/prestop)"), token=token,
                         **kwargs).start()


@pytest.fixture
def server(registrar):
    server = serve(registrar)
    yield server
    server.close()


def request(server_or_addr, method, path, headers=None, timeout=10):
    addr = server_or_addr if isinstance(server_or_addr, str) else server_or_addr.address
    conn = prestop_cmd._connection(addr, timeout)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, (json.loads(body) if resp.getheader("Content-Type", "").startswith(
            "application/json") else body.decode())
    finally:
        conn.close()


def test_health_and_readiness(server, registrar):
    time.sleep(0.06)  # the lagging members have seen the registration
    assert request(server, "GET", "/healthz") == (200, {"status": "alive"})
    assert request(server, "GET", "/readyz") == (200, {"ready": True, "reason": "registered"})
    status, body = request(server, "GET", "/status")
    assert status == 200 and body["state"] == "registered"
    assert [o["sees"] for o in body["backends"][0]["observers"]] == [True, True]


def test_prestop_blocks_until_confirmed_and_readiness_drops(server, registry):
    time.sleep(0.06)  # the lagging members have seen the registration
    began = time.monotonic()
    status, body = request(server, "POST", "/prestop")
    assert status == 200 and body["ok"]
    assert time.monotonic() - began >= 0.05  # waited for the lagging members
    assert body["summary"].startswith("deregistered after preStop (/prestop)")
    assert body["backends"][0]["observers_confirmed"] == ["memory member 0", "memory member 1"]
    assert request(server, "GET", "/readyz") == (503, {"ready": False, "reason": "stopping"})
    assert request(server, "GET", "/healthz")[0] == 200  # still alive until SIGTERM
    assert registry.count("deregister") == 1


def test_concurrent_prestops_join_one_sequence(server, registry):
    results = []
    threads = [threading.Thread(target=lambda: results.append(request(server, "GET", "/prestop")))
               for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 5 and len({json.dumps(r[1], sort_keys=True) for r in results}) == 1
    assert registry.count("deregister") == 1


def test_incomplete_stop_answers_500(registrar, registry):
    registry.unavailable = True
    registrar.stop_config = StopConfig(grace_period=1.5, safety_margin=1)
    server = serve(registrar)
    try:
        status, body = request(server, "POST", "/prestop")
    finally:
        server.close()
    assert status == 500 and not body["ok"] and "NOT removed" in body["summary"]


@pytest.mark.parametrize("method,path,code", [
    ("GET", "/nope", 404), ("DELETE", "/prestop", 405), ("POST", "/status", 405),
    ("PUT", "/healthz", 405), ("GET", "/healthz?x=1", 200)])
def test_routing_errors(server, method, path, code):
    assert request(server, method, path)[0] == code


def test_malformed_requests_get_400_and_the_server_survives(server):
    host, port = server.address.rsplit(":", 1)
    for garbage in (b"GARBAGE\r\n\r\n", b"GET /healthz HTTP/9.9\r\n\r\n", b"\x00\xff\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(garbage)
            assert s.recv(100).split(b" ")[1] in (b"400", b"505")
    assert request(server, "GET", "/healthz")[0] == 200


def test_a_slow_client_blocks_nobody(server):
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as slow:
        slow.sendall(b"GET /healthz HTTP/1.1\r\n")  # ...and never finishes
        began = time.monotonic()
        assert request(server, "GET", "/healthz")[0] == 200
        assert time.monotonic() - began < 1


def test_metrics(server, registrar):
    status, text = request(server, "GET", "/metrics")
    assert status == 200
    assert 'registrar_registered{backend="memory"} 1.0' in text
    assert 'registrar_heartbeat_failures_total{backend="memory"} 0.0' in text
    assert 'registrar_build_info{version="' in text and "process_resident_memory_bytes" in text
    assert "registrar_ready 1.0" in text
    landed = re.search(r'registrar_last_heartbeat_timestamp_seconds\{backend="memory"\} (\S+)',
                       text)
    assert landed and abs(float(landed.group(1)) - time.time()) < 60, text
    assert 'registrar_last_heartbeat_duration_seconds{backend="memory"}' in text
    from prometheus_client.parser import text_string_to_metric_families

    calls = {f.name: f for f in text_string_to_metric_families(text)}[
        "registrar_heartbeat_duration_seconds"].samples
    count = next(s.value for s in calls if s.name.endswith("_count"))
    buckets = [s.value for s in calls if s.name.endswith("_bucket")]
    assert count >= 1 and buckets[-1] == count and buckets == sorted(buckets), calls
    assert "registrar_stop_duration_seconds" not in text  # no NaN before the stop
    request(server, "POST", "/prestop")
    _, text = request(server, "GET", "/metrics")
    assert 'registrar_registered{backend="memory"} 0.0' in text
    assert "registrar_stopping 1.0" in text and "registrar_ready 0.0" in text
    assert 'registrar_propagation_seconds_count{backend="memory"} 1.0' in text
    assert 'registrar_stop_duration_seconds{ok="true",trigger="call"}' in text
    assert "NaN" not in text


def test_refused_tokens_are_logged_once_a_minute_with_the_count_left_out(registrar, caplog):
    # Issue 25: a 401 was logged nowhere; a scanner must not flood the log either.
    server = serve(registrar, token="s3cret")
    try:
        for _ in range(3):
            assert request(server, "GET", "/status")[0] == 401
        assert request(server, "GET", "/status", {"Authorization": "Bearer nope"})[0] == 401
    finally:
        server.close()
    said = [r.getMessage() for r in caplog.records if "(401)" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("control: GET /status from "), said
    assert said[0].endswith(" refused: no bearer token (401)") and "s3cret" not in said[0]


def test_quiet_says_how_many_it_left_out(caplog):
    from registrar.logs import Quiet

    quiet = Quiet(logging.getLogger("test.quiet"), interval=0.2)
    for i in range(3):
        quiet.warn("a", f"a {i}")
    quiet.warn("b", "b 0")  # another kind has its own turn
    time.sleep(0.25)
    quiet.warn("a", "a 3")
    assert [r.getMessage() for r in caplog.records if r.name == "test.quiet"] == [
        "a 0", "b 0", "a 3 (2 more since the last such line)"]


def test_token_protects_all_but_the_probes(registrar):
    server = serve(registrar, token="s3cret")
    try:
        assert request(server, "GET", "/healthz")[0] == 200
        assert request(server, "GET", "/readyz")[0] == 200
        assert request(server, "GET", "/status")[0] == 401
        assert request(server, "GET", "/metrics", {"Authorization": "Bearer nope"})[0] == 401
        assert request(server, "POST", "/prestop", {"Authorization": "s3cret"})[0] == 401
        assert registrar.registered  # a refused /prestop did nothing
        assert request(server, "GET", "/status", {"Authorization": "Bearer s3cret"})[0] == 200
    finally:
        server.close()


def test_readyz_gives_its_reason_only_to_this_host_or_the_token(registrar):
    """Issue 24 (9): /readyz's reason names the registry's endpoints and its
    errors. A peer off this host without the token (anyone who can reach the
    pod IP) gets the verdict alone, which is all the kubelet's probe reads."""
    from registrar.instance import first_non_loopback_address

    ip = first_non_loopback_address()
    if ipaddress.ip_address(ip).is_loopback:
        pytest.skip("this host has no address off loopback")
    server = serve(registrar, listen=f"{ip}:0", token="s3cret")
    try:
        status, body = request(server, "GET", "/readyz")  # from ip: not loopback
        assert (status, body) == (200, {"ready": True})
        status, body = request(server, "GET", "/readyz", {"Authorization": "Bearer s3cret"})
        assert (status, body) == (200, {"ready": True, "reason": "registered"})
    finally:
        server.close()
    local = serve(registrar, token="s3cret")  # 127.0.0.1
    try:
        assert request(local, "GET", "/readyz")[1] == {"ready": True, "reason": "registered"}
    finally:
        local.close()


def test_metrics_listen_serves_metrics_alone_without_the_token(registrar):
    server = serve(registrar, token="s3cret", metrics_listen="127.0.0.1:0")
    try:
        assert server.metrics_address != server.address
        status, text = request(server.metrics_address, "GET", "/metrics")  # no credentials
        assert status == 200 and 'registrar_registered{backend="memory"} 1.0' in text
        for method, path in [("GET", "/status"), ("POST", "/prestop"), ("GET", "/healthz")]:
            assert request(server.metrics_address, method, path)[0] == 404, path
        assert registrar.registered  # the /prestop there did nothing
        assert request(server, "GET", "/metrics")[0] == 401  # the control address still asks
    finally:
        server.close()
    with pytest.raises(OSError):  # both addresses are closed
        request(server.metrics_address, "GET", "/metrics", timeout=2)


def test_unix_socket(registrar, tmp_path):
    sock = tmp_path / "control.sock"
    sock.write_text("stale")  # left by a previous container run
    server = serve(registrar, f"unix:{sock}")
    try:
        assert server.address == f"unix:{sock}"
        assert (request(f"unix:{sock}", "GET", "/readyz")
                == (200, {"ready": True, "reason": "registered"}))
    finally:
        server.close()
    assert not sock.exists()


# -- `registrar prestop` ---------------------------------------------------------

def prestop_args(**kw):
    return argparse.Namespace(**{"control": None, "config": None, "token_file": None,
                                 "timeout": 10.0, **kw})


def test_prestop_command_prints_the_summary_and_exits_0(server, capsys):
    assert prestop_cmd.main(prestop_args(control=server.address)) == 0
    out = capsys.readouterr().out
    assert out.startswith("deregistered after preStop (/prestop)") and out.count("\n") == 1
    assert prestop_cmd.main(prestop_args(control=server.address)) == 0  # joins: same report


def test_prestop_command_reads_the_control_address_from_the_environment(server, capsys,
                                                                        monkeypatch):
    monkeypatch.setenv("REGISTRAR_CONTROL", server.address)
    assert prestop_cmd.main(prestop_args()) == 0


def test_prestop_command_with_a_token(registrar, tmp_path, capsys):
    server = serve(registrar, token="tok")
    try:
        assert prestop_cmd.main(prestop_args(control=server.address)) == 1
        assert "refused the token (401)" in capsys.readouterr().out
        (tmp_path / "token").write_text("tok\n")
        assert prestop_cmd.main(prestop_args(control=server.address,
                                             token_file=str(tmp_path / "token"))) == 0
    finally:
        server.close()


def test_prestop_command_without_an_agent(capsys):
    assert prestop_cmd.main(prestop_args(control="127.0.0.1:1")) == 1
    assert capsys.readouterr().out == ("registrar prestop: no agent answered at 127.0.0.1:1: "
                                       "Connection refused\n")


def test_prestop_command_that_times_out(capsys):
    with socket.socket() as listener:  # accepts, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        addr = f"127.0.0.1:{listener.getsockname()[1]}"
        assert prestop_cmd.main(prestop_args(control=addr, timeout=0.3)) == 1
    assert "did not answer within 0.3s" in capsys.readouterr().out


def test_established_connections_counts_only_that_port():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert established_connections(port) == 0
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        try:
            assert established_connections(port) == 1  # the server side's local port
        finally:
            client.close()
            accepted.close()


def test_the_deadline_counts_from_the_first_trigger():
    """A SIGTERM that follows a long preStop gets no fresh budget."""
    clock = FakeClock()
    registrar = Registrar(INSTANCE, [MemoryBackend(INSTANCE)], clock=clock,
                          stop=StopConfig(grace_period=30, safety_margin=2))
    life = Lifecycle(registrar, reserve=5)
    life.note("preStop (/prestop)")
    clock.sleep(20)  # the hook ran long
    report = life.stop("SIGTERM")
    assert report.trigger == "preStop (/prestop)"
    assert life.deadline.at == 1000 + 28  # from the first trigger, not from SIGTERM
    assert registrar.stop_deadline.at == 1000 + 28  # one deadline for the whole stop
    assert registrar.pod_stop.registry_reserve == 5  # the registry steps keep the app's share


def test_prestop_command_takes_an_http_url(server, capsys):
    assert prestop_cmd.main(prestop_args(control=f"http://{server.address}/")) == 0
    assert capsys.readouterr().out.startswith("deregistered after preStop (/prestop)")


@pytest.mark.parametrize("control", ["garbage", "https://127.0.0.1:9901", "http://host",
                                     "127.0.0.1:99999", "unix:relative.sock", "a/b:1"])
def test_prestop_command_refuses_an_address_it_cannot_use(control, capsys):
    assert prestop_cmd.main(prestop_args(control=control)) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == (
        f"registrar prestop: --control: expected host:port, http://host:port or unix:/path, "
        f"got {control!r}\n")


# -- no hook loses the race (issue 14) ---------------------------------------------

def test_close_answers_a_prestop_in_flight_first(registrar):
    """The agent exits right after its own stop: a /prestop that joined the
    same stop must get its answer before the server closes."""
    life = Lifecycle(registrar)
    release = threading.Event()

    def prestop():
        release.wait(10)
        return life.stop("preStop (/prestop)")

    server = ControlServer(registrar, "127.0.0.1:0", prestop).start()
    answers = []
    caller = threading.Thread(target=lambda: answers.append(request(server, "POST", "/prestop")))
    caller.start()
    wait_until(lambda: server.prestops_in_flight() == 1, 5, "the /prestop is in flight")
    closer = threading.Thread(target=server.close, kwargs={"grace": 5})
    closer.start()
    time.sleep(0.05)  # close() has begun: no new connection is accepted
    with pytest.raises(ConnectionRefusedError):
        request(server, "GET", "/healthz")
    release.set()
    caller.join(10)
    closer.join(10)
    assert answers and answers[0][0] == 200 and answers[0][1]["ok"]
    assert server.prestops_in_flight() == 0 and server.responses_sent.is_set()


def test_the_report_is_left_next_to_the_unix_socket(registrar, tmp_path, capsys):
    sock = tmp_path / "control.sock"
    server = serve(registrar, f"unix:{sock}")
    report = registrar.stop("preStop (/prestop)")
    server.hand_over(report)
    server.close()
    left_path = Path(prestop_cmd.report_file(str(sock)))
    left = json.loads(left_path.read_text())
    assert left["ok"] is True and left["summary"] == report.summary()
    assert left_path.stat().st_mode & 0o777 == 0o600, "readable by its owner only (issue 24)"
    assert prestop_cmd.main(prestop_args(control=f"unix:{sock}")) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"registrar prestop: the agent at unix:{sock} had already stopped (")
    assert out.endswith(f"s ago): {report.summary()}\n")


def test_a_tcp_server_leaves_no_report(registrar, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    server = serve(registrar)
    server.hand_over(registrar.stop("preStop (/prestop)"))
    server.close()
    assert list(tmp_path.iterdir()) == []
    assert prestop_cmd.handed_over(server.address) is None


@pytest.mark.parametrize("text", ["", "{", "[]", '{"ok": true}',
                                  '{"ok": true, "summary": "x", "finished_at": "now"}'])
def test_a_damaged_report_counts_as_none(tmp_path, text, capsys):
    sock = tmp_path / "control.sock"
    Path(prestop_cmd.report_file(str(sock))).write_text(text)
    assert prestop_cmd.main(prestop_args(control=f"unix:{sock}")) == 1
    assert capsys.readouterr().out == (f"registrar prestop: no agent answered at unix:{sock}: "
                                       f"No such file or directory\n")


def test_app_listening_reads_the_kernels_listeners():
    with socket.socket() as app:
        app.bind(("127.0.0.1", 0))
        port = app.getsockname()[1]
        assert not app_listening(port)  # bound, not listening
        app.listen()
        assert app_listening(port)
    assert not app_listening(port)
