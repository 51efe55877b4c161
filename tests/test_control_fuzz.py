"""The control server under hostile clients, over real sockets: random bytes,
request smuggling through an unread body, HTTP/0.9 and unknown versions, a
slowloris, a thousand connections at once, more connections than the cap.

Throughout, a probe in a process of its own asks /healthz on a fresh
connection every 10 ms (as the kubelet does); the server runs in a process of
its own too, so its thread count and RSS are read from /proc. The issue's
acceptance figure is 100 ms for the probe; the assertion is looser (the
machine is shared by several test runs at once) and the measured figure is
printed (pytest -s).
"""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registrar import Instance, Registrar
from registrar.config import StopConfig
from registrar.control import WORKERS, ControlServer
from registrar.lifecycle import Lifecycle
from registrar_testing import wait_until
from registrar_testing.memory import MemoryBackend

#: The looser bound asserted on the probe's worst latency (the issue's figure,
#: 100 ms, is asserted on its 95th percentile).
WORST_BOUND = 1.0
REQUEST_TIMEOUT = 3.0  # the server's, shortened so a slowloris is cut within the test

SERVER = """
import sys
from registrar import Instance, Registrar
from registrar.config import StopConfig
from registrar.control import ControlServer
from registrar.lifecycle import Lifecycle
from registrar_testing.memory import MemoryBackend

inst = Instance("web", "web-0", "10.0.0.5", 8080)
registrar = Registrar(inst, [MemoryBackend(inst)],
                      stop=StopConfig(grace_period=10, safety_margin=1))
registrar.start(wait=True, timeout=5)
life = Lifecycle(registrar)
server = ControlServer(registrar, "127.0.0.1:0", lambda: life.stop("preStop (/prestop)"),
                       request_timeout=float(sys.argv[1])).start()
print(server.address, flush=True)
sys.stdin.read()
server.close()
"""

PROBE = """
import json, select, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
latencies, failures = [], []
while not select.select([sys.stdin], [], [], 0.01)[0]:
    began = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\\r\\nHost: probe\\r\\nConnection: close\\r\\n\\r\\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        if not data.startswith(b"HTTP/1.1 200 "):
            failures.append(data[:80].decode("latin-1"))
    except OSError as exc:
        failures.append(repr(exc))
    latencies.append(time.monotonic() - began)
print(json.dumps({"latencies": latencies, "failures": failures}), flush=True)
"""


class ServerProcess:
    """The control server in a process of its own, and what /proc says of it."""

    def __init__(self, request_timeout: float):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(request_timeout)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        assert line, "the server process did not start"
        host, port = line.rsplit(":", 1)
        self.host, self.port = host, int(port)

    def status(self, field: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def threads(self) -> int:
        return self.status("Threads")

    def rss_kib(self) -> int:
        return self.status("VmRSS")

    def stop(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class Probe:
    """/healthz every 10 ms from another process, on a fresh connection each time."""

    def __init__(self, server: ServerProcess):
        self.proc = subprocess.Popen([sys.executable, "-c", PROBE, server.host, str(server.port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def finish(self) -> tuple[list[float], list[str]]:
        """(latencies sorted, failures)."""
        out, _ = self.proc.communicate("stop\n", timeout=15)
        result = json.loads(out)
        return sorted(result["latencies"]), result["failures"]


class Watch:
    """The server's highest thread count and RSS while a load runs."""

    def __init__(self, server: ServerProcess):
        self.server = server
        self.threads = self.rss_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.threads = max(self.threads, self.server.threads())
            self.rss_kib = max(self.rss_kib, self.server.rss_kib())
            self._stop.wait(0.01)

    def finish(self) -> Watch:
        self._stop.set()
        self._thread.join(5)
        return self


@pytest.fixture(scope="module")
def server():
    server = ServerProcess(REQUEST_TIMEOUT)
    wait_until(lambda: exchange(server, b"GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n",
                                close=True)[0][0] == 200, 10, "the server is ready")
    yield server
    server.stop()


@pytest.fixture
def load(server, request):
    """A probe and a watch around one test's load; their figures checked
    after it (the probe's latency only while ``checks["latency"]``)."""
    checks = {"latency": True}
    base_threads, base_rss = server.threads(), server.rss_kib()
    probe, watch = Probe(server), Watch(server)
    time.sleep(0.1)  # a few probes before the load
    yield checks
    latencies, failures = probe.finish()
    watch.finish()
    count, worst = len(latencies), latencies[-1]
    p95 = latencies[int(0.95 * (count - 1))]
    print(f"\nFIGURES {request.node.name}: /healthz p50 {latencies[count // 2] * 1000:.1f} ms, "
          f"p95 {p95 * 1000:.1f} ms, worst {worst * 1000:.1f} ms over {count} probes; "
          f"threads {base_threads} -> max {watch.threads}; "
          f"RSS {base_rss / 1024:.1f} -> max {watch.rss_kib / 1024:.1f} MiB")
    assert not failures, failures[:5]
    assert count >= 20
    if checks["latency"]:
        # The figure, 100 ms, for nearly every probe; the worst one
        # loosely (other runs share these two cores: a process may simply
        # not be scheduled for a while).
        assert p95 < 0.1, f"/healthz p95 {p95 * 1000:.0f} ms"
        assert worst < WORST_BOUND, f"/healthz took {worst * 1000:.0f} ms"
    # Connections cost no thread: only the bounded workers may come and go.
    assert watch.threads <= base_threads + sum(WORKERS.values())
    assert watch.rss_kib - base_rss < 64 * 1024


# -- helpers ------------------------------------------------------------------------------

_STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n")


def parse_responses(data: bytes, head_first: bool = False
                    ) -> list[tuple[int, dict[str, str], bytes]]:
    """Every response in ``data`` (strictly framed by Content-Length);
    AssertionError when the bytes are not a sequence of whole responses.
    ``head_first``: the first request was a HEAD, so its answer has no body
    (its Content-Length is the GET's)."""
    out = []
    while data:
        match = _STATUS.match(data)
        assert match, f"not a status line: {data[:80]!r}"
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"headers never end: {data[:200]!r}"
        if match[1] == b"100":  # an interim answer to Expect: 100-continue
            data = rest
            continue
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, colon, value = line.partition(b":")
            assert colon, line
            headers[name.decode().lower()] = value.strip().decode("latin-1")
        length = int(headers["content-length"])
        if head_first and not out and (not rest or _STATUS.match(rest)):
            length = 0  # an answer to the HEAD itself (a refusal before it was parsed has one)
        assert len(rest) >= length, "a body cut short"
        out.append((int(match[1]), headers, rest[:length]))
        data = rest[length:]
    return out


def exchange(server, payload: bytes, close: bool = True, timeout: float = 5.0):
    """Send ``payload`` on a fresh connection (half-closing it with
    ``close``), read until the server closes or goes quiet; the responses
    and whether the server closed the connection."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as s:
        s.sendall(payload)
        if close:
            s.shutdown(socket.SHUT_WR)
        data, closed = b"", False
        s.settimeout(0.5 if not close else timeout)
        try:
            while chunk := s.recv(65536):
                data += chunk
            closed = True
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
    return [r[0] for r in parse_responses(data, payload.startswith(b"HEAD "))], closed


def healthz_ok(server) -> bool:
    return exchange(server, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")[0] == [200]


# -- framing ------------------------------------------------------------------------------

SMUGGLED = b"GET /status HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.mark.parametrize("method", [b"POST", b"GET", b"PUT"])
@pytest.mark.parametrize("path", [b"/healthz", b"/nope", b"/status"])
def test_a_body_is_read_never_taken_for_the_next_request(server, method, path):
    """The issue's case (POST /healthz: 405) and its neighbours (404, 401
    needs no token here, 200): one request, one response, whatever the body."""
    request = (method + b" " + path + b" HTTP/1.1\r\nHost: t\r\nContent-Length: "
               + str(len(SMUGGLED)).encode() + b"\r\n\r\n" + SMUGGLED)
    last = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    with socket.create_connection((server.host, server.port), timeout=5) as s:
        s.sendall(request + last)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    answers = parse_responses(data)
    expected = 404 if path == b"/nope" else 200 if method == b"GET" else 405
    # One answer for the request with the body, one for the next real request.
    assert [a[0] for a in answers] == [expected, 200]
    assert json.loads(answers[1][2]) == {"status": "alive"}  # not /status's answer


@pytest.mark.parametrize("request_bytes,status", [
    (b"POST /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"22\r\nGET /status HTTP/1.1\r\nHost: t\r\n\r\n\r\n0\r\n\r\n", 501),
    (b"POST /healthz HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 34\r\n\r\n" + SMUGGLED,
     400),
    (b"POST /healthz HTTP/1.1\r\nContent-Length: 5, 34\r\n\r\n" + SMUGGLED, 400),
    (b"POST /healthz HTTP/1.1\r\nContent-Length: -34\r\n\r\n" + SMUGGLED, 400),
    (b"POST /healthz HTTP/1.1\r\nContent-Length : 34\r\n\r\n" + SMUGGLED, 400),
    (b"POST /healthz HTTP/1.1\r\nHost: t\r\n folded: line\r\n\r\n" + SMUGGLED, 400),
    (b"POST /healthz HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n" + SMUGGLED, 413),
    (b"GET /healthz\r\n", 400),  # HTTP/0.9: no version
    (b"GET /healthz HTTP/0.9\r\n\r\n", 505),
    (b"GET /healthz HTTP/3.0\r\n\r\n", 505),
    (b"GET /healthz HTTP/2.0\r\n\r\n", 505),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),  # HTTP/2 with prior knowledge
    (b"GET /healthz HTTP/1.1x\r\n\r\n", 400),
    (b"GET /healthz http/1.1\r\n\r\n", 400),
    (b"GET  /healthz HTTP/1.1\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", 431),
    (b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431),
])
def test_what_cannot_be_framed_is_refused_and_closed(server, request_bytes, status):
    statuses, closed = exchange(server, request_bytes, close=False, timeout=3)
    assert statuses == [status]
    assert closed, "the connection must be closed after a request it cannot frame"


def test_http_1_0_is_answered_and_closed(server):
    statuses, closed = exchange(server, b"GET /healthz HTTP/1.0\r\n\r\n", close=False)
    assert statuses == [200] and closed


def test_pipelined_requests_each_get_their_answer(server):
    three = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" * 2 + \
        b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    assert exchange(server, three, close=False) == ([200, 200, 200], True)


def test_a_long_pipeline_is_answered_in_order(server):
    """3,000 requests in one go (answered in a loop, not a recursion)."""
    requests = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" * 2999 + \
        b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        sender = threading.Thread(target=s.sendall, args=(requests,))
        sender.start()
        data = b""
        while chunk := s.recv(1 << 20):
            data += chunk
        sender.join(10)
    answers = parse_responses(data)
    assert [a[0] for a in answers] == [200] * 3000
    assert json.loads(answers[-1][2])["reason"] == "registered"  # the last was /readyz


def test_a_client_that_never_reads_its_answers_is_cut_off(server):
    """Its answers pile up to the transport's high-water mark, then the
    server stops reading from it, and closes it after the request timeout."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        s.connect((server.host, server.port))
        began = time.monotonic()
        s.settimeout(0.2)
        request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" * 1000
        with pytest.raises(OSError):  # reset by the server (or its buffers stay full)
            while time.monotonic() - began < 20:
                try:
                    s.sendall(request)
                except TimeoutError:
                    pass
        cut_after = time.monotonic() - began
    print(f"\nFIGURES a client that never reads: cut off after {cut_after:.2f}s")
    assert REQUEST_TIMEOUT - 0.5 < cut_after < REQUEST_TIMEOUT + 3
    assert healthz_ok(server)


def test_expect_100_continue(server):
    with socket.create_connection((server.host, server.port), timeout=5) as s:
        s.sendall(b"POST /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"abc")
        assert s.recv(100).startswith(b"HTTP/1.1 405 ")


# -- random input -------------------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
ANSWERS = {200, 400, 404, 405, 413, 431, 501, 505}

tokens = st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"BREW", b"", b"G\x00T", b"get"])
targets = st.sampled_from([b"/healthz", b"/readyz", b"/status", b"/metrics", b"/nope", b"*",
                           b"http://pod/healthz", b"/healthz?x=1#y", b"", b"/\xff", b"/a b"])
versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0", b"HTTP/3.0",
                            b"HTTP/1.12", b"HTTP/11", b"", b"HTTP/1.1 "])
header_lines = st.lists(st.one_of(
    st.sampled_from([b"Host: x", b"Content-Length: 0", b"Content-Length: 3", b"Content-Length: x",
                     b"Transfer-Encoding: chunked", b"Connection: close",
                     b"Connection: keep-alive", b"Expect: 100-continue", b" folded", b"NoColon",
                     b"Authorization: Bearer x"]),
    # An empty line (or a lone CR before LF) ends the head: what follows is
    # another request, and the one-answer-per-request check would not hold.
    st.binary(max_size=40).filter(lambda b: b"\n" not in b and b.rstrip(b"\r"))), max_size=6)
endings = st.sampled_from([b"\r\n", b"\n"])


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes_get_well_formed_answers_or_none(server, data):
    statuses, closed = exchange(server, data)
    assert closed  # nothing keeps the connection once the client is done
    assert set(statuses) <= ANSWERS, statuses


@FUZZ
@given(method=tokens, target=targets, version=versions, headers=header_lines, end=endings,
       body=st.binary(max_size=8), pipelined=st.booleans())
def test_random_requests_get_well_formed_answers(server, method, target, version, headers,
                                                 end, body, pipelined):
    request = method + b" " + target + (b" " + version if version else b"") + end
    request += b"".join(h + end for h in headers) + end + body
    if pipelined:
        request += b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    statuses, closed = exchange(server, request)
    assert closed
    assert set(statuses) <= ANSWERS, statuses
    # Never more answers than requests: a body is never a request of its own.
    assert len(statuses) <= 1 + pipelined, statuses


def test_the_server_still_answers_after_the_fuzzing(server):
    assert healthz_ok(server)


# -- load: a thousand connections, a slowloris --------------------------------------------

MIX = ["/healthz"] * 7 + ["/readyz", "/metrics", "/status"]


async def _keep_alive_client(host: str, port: int, i: int, until: float) -> list[int]:
    """One connection sending a request about every second until ``until``;
    the statuses it got (a close by the server ends the list with 0)."""
    reader, writer = await asyncio.open_connection(host, port)
    statuses = []
    try:
        await asyncio.sleep((i % 10) / 10)  # spread over the second
        while time.monotonic() < until:
            path = MIX[i % len(MIX)]
            writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
            length = int(re.search(rb"Content-Length: (\d+)", head)[1])
            await reader.readexactly(length)
            statuses.append(int(head.split()[1]))
            i += 1
            await asyncio.sleep(1.0)
    except (asyncio.IncompleteReadError, ConnectionError):
        statuses.append(0)
    finally:
        writer.close()
    return statuses


async def _thousand_clients(host: str, port: int, seconds: float) -> list[list[int]]:
    until = time.monotonic() + seconds
    return await asyncio.gather(*(_keep_alive_client(host, port, i, until) for i in range(1000)))


def test_a_thousand_concurrent_connections(server, load):
    """1,000 keep-alive connections open at once, each asking about once a
    second (/healthz, /readyz, /metrics, /status) for 3 s."""
    results = asyncio.run(_thousand_clients(server.host, server.port, 3.0))
    answered = sum(len(r) for r in results)
    print(f"\nFIGURES 1000 connections: {answered} requests answered")
    bad = [(i, r) for i, r in enumerate(results) if not r or set(r) != {200}]
    assert not bad, f"{len(bad)} connections failed: {bad[:5]}"


async def _burst(host: str, port: int, paths: list[str]) -> list[int]:
    """Open one connection per path, all at once, then send every request
    at once and read every answer."""
    conns = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in paths))
    try:
        async def one(conn, path):
            reader, writer = conn
            writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
            data = await asyncio.wait_for(reader.read(), 20)
            return parse_responses(data)[0][0]
        return await asyncio.gather(*(one(c, p) for c, p in zip(conns, paths, strict=True)))
    finally:
        for _, writer in conns:
            writer.close()


def test_a_burst_of_a_thousand_requests(server, load):
    """1,000 requests sent at the same instant: all answered, threads and
    memory bounded. The probe's worst latency is printed, not asserted: the
    probe queues behind the burst (~0.25 ms of the server's CPU per request,
    most of it the kernel's loopback send)."""
    load["latency"] = False
    paths = MIX * 100
    began = time.monotonic()
    statuses = asyncio.run(_burst(server.host, server.port, paths))
    print(f"\nFIGURES burst: 1000 requests answered in {time.monotonic() - began:.2f}s")
    assert statuses == [200] * len(paths)


async def _slowloris(host: str, port: int, n: int, every: float, until: float):
    """n connections each sending one byte of a request every ``every``
    seconds; for each: (seconds until the server closed it, what it answered)."""
    request = b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Padding: " + b"p" * 200 + b"\r\n\r\n"

    async def one(i):
        reader, writer = await asyncio.open_connection(host, port)
        opened = time.monotonic()
        pace = every * (1 + i % 3) / 2  # some slower, some faster

        async def trickle():
            for byte in request:
                if time.monotonic() > until:
                    return
                writer.write(bytes([byte]))
                await asyncio.sleep(pace)
        sender = asyncio.create_task(trickle())
        try:
            data = await asyncio.wait_for(reader.read(), max(until - time.monotonic(), 0.1))
            return time.monotonic() - opened, data
        except ConnectionResetError:  # closed by the server with unread input: a reset
            return time.monotonic() - opened, b""
        except TimeoutError:
            return None, b""
        finally:
            sender.cancel()
            writer.close()

    return await asyncio.gather(*(one(i) for i in range(n)))


def test_a_slowloris_holds_nothing(server, load):
    results = asyncio.run(_slowloris(server.host, server.port, 300, 0.1,
                                     time.monotonic() + REQUEST_TIMEOUT + 1.5))
    held = [r for r in results if r[0] is None]
    assert not held, f"{len(held)} slow connections were never closed by the server"
    worst = max(r[0] for r in results)
    print(f"\nFIGURES slowloris: 300 slow connections, all closed by the server within "
          f"{worst:.2f}s (request timeout {REQUEST_TIMEOUT}s)")
    assert worst < REQUEST_TIMEOUT + 1.0
    assert {parse_responses(data)[0][0] if data else None for _, data in results} <= {408, None}


def test_the_listen_backlog_is_sized_for_bursts(server):
    if shutil.which("ss") is None:
        pytest.skip("no ss(8) to read the backlog with")
    out = subprocess.run(["ss", "-ltnH", f"sport = :{server.port}"], capture_output=True,
                         text=True, check=True).stdout.split()
    with open("/proc/sys/net/core/somaxconn") as f:
        somaxconn = int(f.read())
    assert int(out[2]) == min(1024, somaxconn)  # Send-Q of a listener: its backlog


# -- the connection cap (in process: a small cap and a /prestop that blocks) ---------------

INSTANCE = Instance("web", "web-0", "10.0.0.5", 8080)


@pytest.fixture
def capped():
    registrar = Registrar(INSTANCE, [MemoryBackend(INSTANCE)],
                          stop=StopConfig(grace_period=10, safety_margin=1))
    registrar.start(wait=True, timeout=5)
    life = Lifecycle(registrar)
    release = threading.Event()

    def prestop():
        release.wait(10)
        return life.stop("preStop (/prestop)")

    server = ControlServer(registrar, "127.0.0.1:0", prestop, max_connections=20).start()
    server.release = release
    yield server
    release.set()
    server.close()
    registrar.stop()


def _connect(server) -> socket.socket:
    host, port = server.address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5)


def _closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.01)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_past_the_cap_the_longest_idle_connections_make_room(capped):
    idle = []
    try:
        for _ in range(30):
            idle.append(_connect(capped))
            wait_until(lambda: capped.connections >= min(len(idle), 20), 2, "accepted")
        assert capped.connections == 20
        wait_until(lambda: all(_closed_by_server(s) for s in idle[:10]), 2,
                   "the ten oldest idle connections are closed")
        assert not any(_closed_by_server(s) for s in idle[10:])
        idle[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        assert idle[-1].recv(100).startswith(b"HTTP/1.1 200 ")
    finally:
        for s in idle:
            s.close()


def test_past_the_cap_with_every_connection_being_answered_503(capped):
    waiting = []
    try:
        for _ in range(20):
            s = _connect(capped)
            s.sendall(b"POST /prestop HTTP/1.1\r\nHost: t\r\n\r\n")
            waiting.append(s)
        wait_until(lambda: capped.prestops_in_flight() == 20, 5, "20 /prestop calls waiting")
        workers = [t for t in threading.enumerate() if t.name == "control-prestop"]
        assert len(workers) <= WORKERS["prestop"]  # the rest wait without a thread
        with _connect(capped) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert extra.recv(200).startswith(b"HTTP/1.1 503 ")
        capped.release.set()
        for s in waiting:
            data = b""
            while b"\r\n\r\n" not in data:
                data += s.recv(65536)
            assert data.startswith(b"HTTP/1.1 200 "), data[:100]
    finally:
        for s in waiting:
            s.close()
