"""What counts as a busy connection, asked of the real kernel (sock_diag)
about real sockets on loopback."""
from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from registrar.connections import Drain, connections

QUIET = 0.1


@pytest.fixture
def pair():
    """A listening socket, one client connection and the server's side of it."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    yield port, client, accepted
    for s in (client, accepted, server):
        s.close()


def busy(port):
    (conn,) = connections(port)
    return conn.busy(QUIET)


def test_only_the_ports_own_connections_are_seen(pair):
    port, client, _ = pair
    (conn,) = connections(port)
    assert conn.peer == f"127.0.0.1:{client.getsockname()[1]}"
    other = socket.create_server(("127.0.0.1", 0))
    try:
        assert connections(other.getsockname()[1]) == []
    finally:
        other.close()


def test_a_request_is_busy_until_answered_then_idle_after_the_quiet_period(pair):
    port, client, accepted = pair
    client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    time.sleep(0.01)
    assert busy(port) == "request waiting to be read"
    accepted.recv(100)
    time.sleep(QUIET + 0.05)  # a slow request: read long ago, not answered yet
    assert busy(port) == "request being processed"
    accepted.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    client.recv(100)
    time.sleep(0.01)
    assert busy(port).startswith("active within")  # just answered
    time.sleep(QUIET + 0.05)
    assert busy(port) is None  # an idle keep-alive connection
    assert Drain(port, "busy", QUIET).holding() == []
    assert len(Drain(port, "all", QUIET).holding()) == 1


def test_a_second_request_on_a_keepalive_connection_is_busy_again(pair):
    port, client, accepted = pair
    client.sendall(b"one")
    accepted.recv(10)
    accepted.sendall(b"answer")
    client.recv(10)
    time.sleep(QUIET + 0.05)
    assert busy(port) is None
    client.sendall(b"two")
    accepted.recv(10)
    time.sleep(QUIET + 0.05)
    assert busy(port) == "request being processed"


def test_a_streaming_response_stays_busy(pair):
    port, client, accepted = pair
    client.sendall(b"GET /stream")
    accepted.recv(100)
    stop = threading.Event()

    def stream():
        while not stop.is_set():
            accepted.sendall(b"chunk")
            time.sleep(0.03)

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        for _ in range(10):
            time.sleep(0.02)
            assert busy(port) is not None
    finally:
        stop.set()
        thread.join()


def test_an_unread_response_is_busy(pair):
    port, client, accepted = pair
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    accepted.setblocking(False)
    try:
        while True:
            accepted.send(b"x" * 65536)  # until the client's window is full
    except BlockingIOError:
        pass
    time.sleep(QUIET + 0.05)
    assert busy(port) == "response not yet acknowledged"


def test_the_drain_returns_once_the_request_is_answered_and_reports_a_cut_otherwise(pair):
    port, client, accepted = pair
    client.sendall(b"GET /")
    accepted.recv(10)
    threading.Timer(0.3, lambda: accepted.sendall(b"done")).start()
    began = time.monotonic()
    report = Drain(port, "busy", QUIET).wait(until=began + 5)
    assert report.waited_for == 1 and not report.cut
    assert 0.3 <= time.monotonic() - began < 0.3 + QUIET + 0.3
    client.recv(10)
    client.sendall(b"again")  # and never answered
    report = Drain(port, "busy", QUIET).wait(until=time.monotonic() + 0.3)
    assert report.cut and "busy" in report.summary()


def test_a_long_drain_says_every_second_which_connections_it_waits_for(pair, caplog):
    port, client, accepted = pair
    client.sendall(b"GET /")  # a request never answered
    accepted.recv(10)
    with caplog.at_level(logging.INFO, logger="registrar.connections"):
        report = Drain(port, "busy", QUIET).wait(until=time.monotonic() + 2.3)
    assert report.cut
    notes = [r for r in caplog.records if r.getMessage().startswith("still waiting for 1 busy")]
    assert 1 <= len(notes) <= 2, [r.getMessage() for r in caplog.records]  # at 1 s and 2 s
    assert notes[0].connections and notes[0].connections[0].startswith("127.0.0.1:")
