"""The wait for consumers (registrar/traffic.py), on real sockets: the
kernel's view of real connections from real senders, then end to end, a
consumer that caches what it discovered against `registrar run` on the
real three-member etcd cluster.

A sender here is a thread sending requests at a steady rate to an HTTP
server on 127.0.0.1 (or from another loopback address, 127.0.0.2, for a
peer of its own) and stopping when told: a consumer whose cache still lists
the pod, until it refreshes."""
from __future__ import annotations

import logging
import math
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from registrar.clock import Clock
from registrar.traffic import Traffic, networks
from registrar_testing.senders import Sender



class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.0 closes after each answer (the server closes first, as with
    ``Connection: close``); HTTP/1.1 keeps the connection open."""

    def setup(self):
        super().setup()  # an answer's head and body in one segment, as real servers send
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self):
        ms = float(self.path.partition("ms=")[2] or 0)
        if ms:
            time.sleep(ms / 1000)
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Http11(_Handler):
    protocol_version = "HTTP/1.1"


@pytest.fixture
def app():
    """An HTTP server on a free port; .port."""
    server = ThreadingHTTPServer(("0.0.0.0", 0), _Http11)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def traffic(port: int, **kw) -> Traffic:
    kw.setdefault("ignore", [])
    return Traffic([port], clock=Clock(), **kw).start()


def stale_for(senders, seconds: float) -> threading.Thread:
    """Stop the senders ``seconds`` from now (their caches refresh then)."""
    def later():
        time.sleep(seconds)
        for s in senders:
            s.stop()
    thread = threading.Thread(target=later, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("how", ["close", "keepalive", "client-close"])
def test_a_stale_consumer_at_100_per_second_holds_until_it_stops(app, how):
    """client-close: the app's side of a connection the client closed lives
    as long as the request (5 ms here), and no trace of it stays: the looks
    see about one in two."""
    sender = Sender(app, 100, how, ms=5 if how == "client-close" else 0)
    sender.start()
    watch = traffic(app)
    time.sleep(1.5)  # the traffic before the stop
    began = since = time.monotonic()
    stale_for([sender], 1.0)
    report = watch.quiesce(began, since, since + 10)
    ended = time.monotonic()
    last = sender.sent[-1]
    assert last < ended, "the stage ended while the consumer was still sending"
    # Its window: ln(1e4) over the rate seen (up to 100/s: 0.1 s), then the looks.
    rate = sum(since - 1.0 < t <= since for t in sender.sent)
    # client-close: a look sees one connection in three to six (5 ms each,
    # a look every 10 ms, more or less under load).
    seen = 0.1 if how == "client-close" else 0.9
    assert 0.1 <= report.window_seconds <= math.log(1e4) / (seen * rate), (report, rate)
    assert ended - last < report.window_seconds + 0.2, report
    assert sender.failed == 0
    (late,) = report.late
    assert late.peer == "127.0.0.1" and 0.8 < late.last_seconds < 1.2, report
    sent_late = sum(t > since for t in sender.sent)
    # What arrived before the stage's first look (a few ms after `since`; it
    # reads the host's sockets) counts as before: a few requests.
    if how == "keepalive":  # every request, counted on its connection
        assert sent_late - 8 <= late.requests <= sent_late + 2, (late, sent_late)
    elif how == "close":  # TIME_WAIT keeps every connection the app closed first
        assert sent_late - 8 <= late.requests <= sent_late + 2, (late, sent_late)
    else:  # closed by the client within a millisecond or two: one look in a few sees one
        assert 0 < late.requests <= sent_late + 1, (late, sent_late)
    assert "late traffic: 127.0.0.1 sent" in report.summary()


def test_short_requests_closed_between_two_looks_are_counted_from_time_wait(app):
    """1 ms requests on connections the app closes: most open and close
    between two looks; TIME_WAIT still has every one of them."""
    sender = Sender(app, 200, "close")
    sender.start()
    watch = traffic(app)
    time.sleep(1.0)
    since = time.monotonic()
    stale_for([sender], 0.6)
    report = watch.quiesce(since, since, since + 10)
    sent_late = sum(t > since for t in sender.sent)
    (late,) = report.late
    assert abs(late.requests - sent_late) <= 2, (late, sent_late)
    assert late.connections == late.requests
    assert report.quiet_after_seconds >= 0.6


def test_a_slow_consumer_gets_the_window_its_rate_justifies(app):
    """2 requests/s: a consumer still sending at that rate is silent for
    4.6 s with probability 1e-4; the stage waits that long after its last
    request, and says why."""
    sender = Sender(app, 2, "close")
    sender.start()
    watch = traffic(app)
    time.sleep(3.0)  # short connections before the stop are also read from TIME_WAIT
    since = time.monotonic()
    stale_for([sender], 1.2)
    report = watch.quiesce(since, since, since + 20)
    ended = time.monotonic()
    assert sender.failed == 0
    window = report.window_seconds
    assert 3.8 < window <= 6.0, report  # ln(1e4) / ~2 per second
    assert window - 0.05 <= ended - sender.sent[-1] < window + 0.5, report
    # The text rounds the window before the report does (4.5954 says 4.60, 4.595 4.59).
    said = re.match(r"window (\d+\.\d\d)s: 127\.0\.0\.1 sent ", report.why)
    assert said and abs(float(said[1]) - window) <= 0.0051, report


def test_a_consumer_that_never_refreshes_is_cut_at_the_deadline_and_named(app, caplog):
    sender = Sender(app, 50, "close", source="127.0.0.2")
    sender.start()
    watch = traffic(app)
    time.sleep(1.0)
    since = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="registrar.traffic"):
        report = watch.quiesce(since, since, since + 1.5)
    ended = time.monotonic()
    sender.stop()
    assert 1.5 <= ended - since < 1.8
    assert report.cut == ["127.0.0.2"], report
    assert "traffic cut at the deadline, still sending: 127.0.0.2" in report.summary()
    assert "consumers still sending at the deadline: 127.0.0.2 sent" in caplog.text


def test_an_ignored_prober_and_our_own_probes_hold_nothing(app):
    """A kubelet-like prober (its own address, ignored) that never stops,
    and registrar's own health probe: neither is a consumer."""
    from registrar.health import probe_http, probe_tcp

    prober = Sender(app, 20, "close", source="127.0.0.2")
    prober.start()
    watch = traffic(app, ignore=networks(["127.0.0.2/32"]))
    ours = threading.Event()

    def own_probes():
        while not ours.is_set():
            assert probe_tcp(f"127.0.0.1:{app}", 1)[0]
            assert probe_http(f"http://127.0.0.1:{app}/", 1)[0]
            ours.wait(0.02)
    threading.Thread(target=own_probes, daemon=True).start()
    time.sleep(1.0)
    since = time.monotonic()
    report = watch.quiesce(since, since, since + 5)
    ours.set()
    prober.stop()
    assert report.seconds < 0.3, report  # nothing to wait for but quiet_min
    assert all(p.peer == "127.0.0.2" and p.ignored for p in report.late), report
    assert "late traffic" not in report.summary()
    assert report.why.startswith("no consumer sent"), report


def test_a_sparse_peer_is_reported_but_does_not_hold_the_stop(app):
    """A scrape every 2 s is too rare to be told apart from a gone consumer
    within quiet_max: it holds nothing, and its late request is named."""
    scraper = Sender(app, 0.5, "close")
    scraper.start()
    watch = traffic(app, quiet_max=1.0)  # 1.8/s needed to judge within 1 s
    time.sleep(4.2)
    since = time.monotonic()
    report = watch.quiesce(since, since, since + 5)
    scraper.stop()
    assert report.seconds < 0.3, report
    assert report.window_seconds == 0 and "too sparse" in report.why, report


def test_no_traffic_at_all_costs_quiet_min(app):
    watch = traffic(app)
    since = time.monotonic()
    report = watch.quiesce(since, since, since + 5)
    assert 0.1 <= report.seconds < 0.2 and report.late == [], report
    assert report.why.startswith("no consumer sent"), report



def test_status_and_metrics_name_the_late_consumers(app):
    """A library Registrar (an in-memory registry): the stop waits for the
    consumer, then /status's document and /metrics name it."""
    from registrar.config import StopConfig
    from registrar.core import Registrar
    from registrar.instance import Instance
    from registrar.metrics import Metrics
    from registrar_testing.memory import MemoryBackend

    instance = Instance.create("web", app, id="web-1", address="127.0.0.1")
    registrar = Registrar(instance, [MemoryBackend(instance)],
                          stop=StopConfig(grace_period=10, ignore_peers=[]))
    registrar.start(wait=True, timeout=5)
    sender = Sender(app, 50, "close")
    sender.start()
    time.sleep(1.0)
    assert "127.0.0.1" in registrar.status(observe=False)["consumers"]
    stale_for([sender], 0.5)
    report = registrar.stop("test")
    assert report.quiescence.late[0].peer == "127.0.0.1" and sender.failed == 0
    status = registrar.status(observe=False)
    assert status["stop"]["late"][0]["peer"] == "127.0.0.1", status
    assert "late traffic: 127.0.0.1 sent" in status["stop"]["summary"]
    text = Metrics(registrar).render()[0].decode()
    assert 'registrar_late_requests{peer="127.0.0.1"}' in text, text
    assert "registrar_quiescence_seconds " in text


def test_the_wait_ends_when_the_app_exits(app):
    """`run`: an app that exits while consumers still send has nothing to
    serve them with; the wait ends at once."""
    sender = Sender(app, 50, "close")
    sender.start()
    watch = traffic(app)
    time.sleep(0.5)
    since = time.monotonic()
    exited_at = since + 0.4
    report = watch.quiesce(since, since, since + 5, serving=lambda: time.monotonic() < exited_at)
    sender.stop()
    assert 0.4 <= time.monotonic() - since < 0.6 and report.why == "the app exited", report
