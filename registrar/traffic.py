"""Consumer quiescence (docs/design.md, "The stop sequence", step 4): the
registries are not the consumers. Consumers cache what they discovered
(client-side load balancers, DNS answers, rendered proxy configs), and a
Kubernetes Service's data path learns of a deletion late; what they do is
visible in the pod itself, as connections and request bytes arriving on
the app's port. The stop holds until that traffic has stopped for a window
the observed rate justifies.

**What is counted, and why this way.** The kernel is asked through
NETLINK ``sock_diag`` (connections.py) about every socket whose local port
is the app's:
  * a live connection (SYN_RECV to LAST_ACK) not seen before is a new
    connection; on a known one, ``tcpi_data_segs_in`` growing means request
    bytes arrived: exact per-connection counters, one round trip of well
    under a millisecond however busy the app is;
  * a connection that opened and closed between two looks is still there
    in TIME_WAIT when the app closed it first (what HTTP servers do with
    ``Connection: close``): the kernel keeps its 4-tuple and its socket
    cookie for 60 s, and its timer says when it closed. The same list read
    once when the stop begins is the last minute's history of short
    connections, per peer, without any sampling before it.
Reading TIME_WAIT costs ~4 us per socket (a minute of a busy app's short
connections can be ten thousand), so the stage looks at live connections
every LOOK_EVERY and reads TIME_WAIT only when the window seems to have
passed: nothing the fast looks missed can then end the stage. A connection
the *peer* closed first and that lived less than one look leaves no trace
(the kernel counts it only in the namespace's PassiveOpens, with no port or
peer); a consumer still sending sends many, and one seen is enough. Keep-
alive traffic before the stop is sampled every SAMPLE_EVERY by a thread
that reads live connections only.

**The window.** Requests from one peer address are taken as arrivals at the
rate the peer sent before the stop (over the last HORIZON seconds). A peer
still sending at rate r stays silent for w seconds with probability
exp(-r w): waiting w = ln(1/CONFIDENCE) / r after its last arrival makes it
almost sure (1 - 1e-4) that a silent peer has stopped. Each peer's window is
clamped to [quiet_min, quiet_max]; a peer that sent too rarely for quiet_max
to tell (fewer than ln(1e4)/quiet_max, 0.92 per second at 10 s: a scrape,
a probe) holds nothing, and what it sends late is still reported. Not
consumers: peers in ``ignore`` (the kubelet's probes come from the node)
and registrar's own probes.
"""
from __future__ import annotations

import ipaddress
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .clock import Clock
from .connections import (LIVE, PROGRESS_EVERY, TCP_TIME_WAIT, TIME_WAIT, TIME_WAIT_SECONDS,
                          connections, paced, plain_ip)

log = logging.getLogger(__name__)

#: A peer still sending would have shown itself with probability 1 - CONFIDENCE.
CONFIDENCE = 1e-4
_LN = math.log(1 / CONFIDENCE)
#: Seconds of traffic before the stop that a peer's rate is taken over.
HORIZON = TIME_WAIT_SECONDS
#: Seconds between two looks at live connections before the stop, and the
#: share of a core they may take at most (a look costs ~0.2 us per TCP
#: socket of the whole host: connections.paced()).
SAMPLE_EVERY = 0.25
SAMPLE_SHARE = 0.005
#: The same during the stage, which lasts seconds.
LOOK_EVERY = 0.01
LOOK_SHARE = 0.2
#: Peers tracked at most (a scan of the whole internet would otherwise grow it).
MAX_PEERS = 4096
#: With no registry, a peer whose connections each carried this many requests
#: (data segments) on average and lived this many seconds (live connections
#: over its rate of new ones: Little's law) keeps its connections: it opens
#: one when its pool lost one (in a rolling update, when a pod died), not per
#: request, so its rate of new connections tells nothing about when the data
#: path dropped the pod; it holds nothing.
KEEPS_REQUESTS = 8
KEEPS_SECONDS = 1.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_own_lock = threading.Lock()
_own: dict[tuple[str, int], float] = {}  # (ip, port) of our own probes' sockets -> when


def note_own_connection(sock) -> None:
    """Registrar's own probe of the app (the health gate) is not a consumer:
    remember the local address of its socket, which the app's side of the
    connection has as its peer."""
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return
    with _own_lock:
        _own[(plain_ip(host), port)] = time.monotonic()
        if len(_own) > 1024:  # probes run every few seconds: drop the oldest
            for key in sorted(_own, key=_own.get)[:512]:
                del _own[key]


#: A connection is our probe's when it came from the probe's address and
#: port within this many seconds of the probe: the kernel hands out a
#: port again to another connection to the app only much later, after
#: every other port of its range.
_OWN_WITHIN = 2.0


def _is_own(ip: str, port: int, at: float) -> bool:
    with _own_lock:
        when = _own.get((ip, port))
    return when is not None and abs(at - when) < _OWN_WITHIN


def networks(specs: Iterable[str]) -> list[Network]:
    """CIDRs or addresses (ValueError naming the bad one)."""
    return [ipaddress.ip_network(s.strip(), strict=False) for s in specs if s.strip()]


def default_gateways(route_file: str = "/proc/net/route") -> list[str]:
    """This network namespace's IPv4 default gateways. In a pod that is the
    node's end of the pod's link (flannel's cni0, Cilium's cilium_host), the
    address the kubelet's probes come from on those networks."""
    import socket
    import struct

    found = []
    try:
        with open(route_file) as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[1] == "00000000" and fields[2] != "00000000":
                    found.append(socket.inet_ntoa(struct.pack("<I", int(fields[2], 16))))
    except (OSError, ValueError):
        pass
    return found


def default_ignored(environ=os.environ) -> list[str]:
    """What is not a consumer when ``stop.ignore_peers`` is not given: the
    node ($HOST_IP, from the Downward API's status.hostIP, where the kubelet's
    probes come from) and this namespace's default gateway (where they come
    from on bridge and Cilium networks)."""
    found = [ip for ip in [environ.get("HOST_IP", "").strip()] if ip]
    for ip in default_gateways():
        if ip not in found:
            found.append(ip)
    out = []
    for ip in found:
        try:
            ipaddress.ip_address(ip)
            out.append(ip)
        except ValueError:
            log.warning("$HOST_IP is %r: not an IP address; not ignored", ip)
    return out


#: Buckets per second of a peer's history.
_SLICES = 10


class _Peer:
    """One peer address: its arrivals in buckets of 1/_SLICES s over
    HORIZON, and what it sent from a given moment on (the late traffic)."""
    __slots__ = ("ip", "ignored", "buckets", "opens", "first", "last", "last_open",
                 "late_requests", "late_connections", "late_last")

    def __init__(self, ip: str, ignored: bool):
        self.ip = ip
        self.ignored = ignored
        self.buckets: dict[int, int] = {}
        self.opens: dict[int, int] = {}  # the same, of new connections only
        self.first: float | None = None
        self.last: float | None = None
        self.last_open: float | None = None
        self.late_requests = 0
        self.late_connections = 0
        self.late_last: float | None = None

    def add(self, t: float, n: int, connection: bool, since: float | None) -> None:
        slot = int(t * _SLICES)
        self.buckets[slot] = self.buckets.get(slot, 0) + n
        self.first = t if self.first is None else min(self.first, t)
        self.last = t if self.last is None else max(self.last, t)
        if connection:
            self.opens[slot] = self.opens.get(slot, 0) + 1
            self.last_open = t if self.last_open is None else max(self.last_open, t)
        if since is not None and t > since:
            self.late_requests += n
            self.late_connections += connection
            self.late_last = t if self.late_last is None else max(self.late_last, t)

    def count(self, begin: float, end: float, opens: bool = False) -> int:
        first, last = begin * _SLICES, end * _SLICES
        return sum(n for s, n in (self.opens if opens else self.buckets).items()
                   if first <= s + 0.5 < last)

    def prune(self, before: float) -> None:
        limit = before * _SLICES
        for buckets in (self.buckets, self.opens):
            for s in [s for s in buckets if s < limit]:
                del buckets[s]


#: What late traffic came after: with registries, and with none.
AFTER_REMOVAL = "every member had dropped the pod"
AFTER_TRIGGER = "the stop began"


@dataclass
class LatePeer:
    """A peer that sent after the registries had dropped the pod (with no
    registry: after the stop began)."""
    peer: str
    requests: int  # data segments that arrived, and connections seen without one
    connections: int
    last_seconds: float  # its last arrival, seconds after ``since``
    rate: float  # requests per second before the stop
    ignored: bool = False

    def words(self, after: str = AFTER_REMOVAL) -> str:
        return (f"{self.peer} sent {self.requests} request(s) on {self.connections} new "
                f"connection(s) until {self.last_seconds:.2f}s after {after}")


@dataclass
class QuiescenceReport:
    """What the wait for the consumers' traffic to stop achieved."""
    seconds: float = 0.0  # the stage itself
    #: Since the removal was confirmed (or the stop began, with no registry).
    quiet_after_seconds: float = 0.0
    window_seconds: float = 0.0  # the longest window that held the stage
    why: str = ""
    late: list[LatePeer] = field(default_factory=list)
    #: Peers still sending when the stage was cut at its deadline.
    cut: list[str] = field(default_factory=list)
    #: What ``quiet_after_seconds`` and the late traffic count from.
    after: str = AFTER_REMOVAL

    def summary(self) -> str:
        removal = self.after == AFTER_REMOVAL
        head = (f"traffic cut at the deadline, still sending: {', '.join(self.cut)}"
                if self.cut else f"quiet {self.quiet_after_seconds:.2f}s after "
                                 f"{'the removal' if removal else 'the stop began'}")
        late = [p for p in self.late if not p.ignored]
        text = f"{head} ({self.why})"
        if late:
            # With no registry, traffic after the trigger is the data path
            # catching up, not lateness: the words say what it was.
            text += ("; late traffic: " if removal else "; since the trigger: ") + \
                "; ".join(p.words(self.after) for p in late[:5])
        return text


class Traffic:
    """The inbound traffic on the app's ports: a rate per peer before the
    stop (start() samples it), and the wait for it to stop (quiesce())."""

    def __init__(self, ports: Sequence[int], *, ignore: Sequence[Network] = (),
                 quiet_min: float = 0.1, quiet_max: float = 10.0, clock: Clock | None = None):
        self.ports = list(dict.fromkeys(ports))
        self.ignore = list(ignore)
        self.quiet_min = quiet_min
        self.quiet_max = max(quiet_max, quiet_min)
        self.clock = clock or Clock()
        self._lock = threading.Lock()
        self._live: dict[int, tuple[str, int]] = {}  # cookie -> (peer ip, arrivals counted)
        self._gone: dict[int, float] = {}  # cookies no longer live or counted in TIME_WAIT -> when
        self._peers: dict[str, _Peer] = {}
        self._since: float | None = None  # arrivals after it are late
        self._started: float | None = None
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False
        self._pruned = self.clock.now()
        self._opens_only = False  # quiesce()'s: only new connections hold it
        self._keepers: dict[str, float] = {}  # and peers that keep theirs -> requests each

    # -- before the stop ---------------------------------------------------------

    def start(self) -> Traffic:
        """Sample live connections every SAMPLE_EVERY in a daemon thread."""
        with self._lock:
            if self._thread is not None or self._halt.is_set():
                return self
            self._started = self.clock.now()
            self._thread = threading.Thread(target=self._sample, name="traffic", daemon=True)
        self._look(time_wait=False)  # what is open now: history, never late
        self._thread.start()
        return self

    def _sample(self) -> None:
        cost = 0.0
        while not self._halt.wait(paced(SAMPLE_EVERY, cost, SAMPLE_SHARE)):
            began = time.monotonic()
            self._look(time_wait=False)
            cost = time.monotonic() - began

    def close(self) -> None:
        self._halt.set()

    def rates(self, at: float | None = None, look: bool = False,
              opens: bool = False) -> dict[str, float]:
        """Requests per second per consumer peer over the HORIZON before
        ``at`` (with ``opens``, new connections per second); with ``look``,
        after reading what closed since (TIME_WAIT: ~4 us a connection of
        the last minute)."""
        if look and self._since is None:
            self._look(time_wait=True)
        at = self.clock.now() if at is None else at
        horizon = self._horizon(at)
        with self._lock:
            counts = {ip: p.count(at - horizon, at, opens) for ip, p in self._peers.items()
                      if not p.ignored}
        # n arrivals are n - 1 gaps: one request alone tells no rate (and the
        # estimate errs low, which lengthens the window, never shortens it).
        return {ip: (n - 1) / horizon for ip, n in counts.items() if n > 1}

    def _horizon(self, at: float) -> float:
        # Short connections are known for the last minute whenever we began
        # (TIME_WAIT keeps them); keep-alive traffic only since the sampler
        # started. A short history undercounts, which lengthens windows.
        return HORIZON if self._started is None else \
            max(min(HORIZON, at - self._started), 1.0)

    # -- looking -----------------------------------------------------------------

    def _look(self, time_wait: bool) -> None:
        """Count what arrived since the last look (and, with ``time_wait``,
        the connections that closed unseen)."""
        now = self.clock.now()
        states = LIVE | (TIME_WAIT if time_wait else 0)
        try:
            found = [c for port in self.ports for c in connections(port, states)]
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot read the connections of port(s) %s: %s; the stop does "
                            "not wait for consumers", ", ".join(map(str, self.ports)), exc)
            return
        with self._lock:
            live = set()
            for c in found:
                if c.state == TCP_TIME_WAIT:  # closed by the app
                    if c.cookie in self._gone or c.cookie in self._live:
                        continue
                    closed = now - max(TIME_WAIT_SECONDS - c.expires_ms / 1000, 0.0)
                    self._gone[c.cookie] = closed
                    self._arrive(c, closed, 1, connection=True)
                    continue
                live.add(c.cookie)
                known = self._live.get(c.cookie)
                counted = known[1] if known else 0
                want = max(c.data_segs_in, 1)
                if known is None and c.cookie in self._gone:
                    continue  # seen already, and counted (a recycled cookie cannot be)
                if want > counted:
                    # The last data received, or with none yet, the handshake
                    # (the kernel stamps both in the same field).
                    at = now - c.last_received_ms / 1000
                    self._arrive(c, at, want - counted, connection=known is None)
                self._live[c.cookie] = (c.peer_ip, want)
            for cookie in [k for k in self._live if k not in live]:
                del self._live[cookie]
                self._gone[cookie] = now
            if now - self._pruned >= 10.0:
                self._pruned = now
                for cookie in [k for k, t in self._gone.items() if t < now - HORIZON - 5]:
                    del self._gone[cookie]
                for ip, peer in list(self._peers.items()):
                    peer.prune(now - HORIZON - 2)
                    if not peer.buckets and self._since is None:
                        del self._peers[ip]

    def _arrive(self, c, at: float, n: int, connection: bool) -> None:
        if _is_own(c.peer_ip, c.peer_port, at):
            return  # our own probe, maybe from an address a consumer also uses
        peer = self._peers.get(c.peer_ip)
        if peer is None:
            if len(self._peers) >= MAX_PEERS:
                return
            peer = self._peers[c.peer_ip] = _Peer(c.peer_ip, self._ignored(c.peer_ip))
        peer.add(at, n, connection, self._since)

    def _ignored(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr.version == n.version and addr in n for n in self.ignore)

    # -- the stage ---------------------------------------------------------------

    def quiesce(self, began: float, since: float, until: float,
                serving: Callable[[], bool] | None = None, *,
                opens_only: bool = False) -> QuiescenceReport:
        """Hold until no consumer has sent for its window: counted from
        ``since`` (when every registry had dropped the pod; the stop's start
        with no registry), until at the latest ``until``. ``began`` is when
        the stop began: the rates are those of the HORIZON before it. It
        ends early once ``serving()`` is False (the app exited).

        With ``opens_only`` (no registry: a Service's data path) only new
        connections hold it, and the windows follow each peer's rate of new
        connections: kube-proxy, IPVS and cloud load balancers choose a pod
        per connection and conntrack keeps an established one on its pod
        whatever the endpoints say, so a keep-alive connection's requests
        never stop by themselves; the app's own shutdown (after this stage
        and the busy drain) is what moves them."""
        start = self.clock.now()
        # The last minute's short connections, and what arrived since the
        # last sample: part of the rate, not late (a connection's arrivals
        # since the sampler's last look are stamped with the last one's time).
        self._look(time_wait=True)
        before = self.rates(max(began, self.clock.now()), opens=opens_only)
        with self._lock:
            self._since = since
            for peer in self._peers.values():
                peer.late_requests = peer.late_connections = 0
                peer.late_last = None
        report = QuiescenceReport(after=AFTER_TRIGGER if opens_only else AFTER_REMOVAL)
        self._opens_only = opens_only
        self._keepers = self._keeping(began, before) if opens_only else {}
        noted = start
        cost = 0.0
        while True:
            now = self.clock.now()
            holding = self._holding(now, since, before)
            # Every stop looks for quiet_min at least: a consumer whose
            # connections live a few milliseconds may not have been seen
            # before the stop, but is within that many looks.
            if not holding and now - since >= self.quiet_min:
                self._look(time_wait=True)  # what opened and closed between two looks
                now = self.clock.now()
                holding = self._holding(now, since, before)
                if not holding:
                    break
            if now >= until:
                report.cut = [ip for ip, _window, last in holding if last > since]
                break
            if serving is not None and not serving():
                report.why = "the app exited"
                break
            if now - noted >= PROGRESS_EVERY:
                noted = now
                log.info("waiting for consumers to stop sending (%.1fs left): %s", until - now,
                         "; ".join(f"{ip} {now - last:.2f}s ago" for ip, _window, last
                                   in holding[:5] if last > since) or "none sent since",
                         extra={"seconds": round(until - now, 3)})
            self.clock.sleep(max(0.0, min(paced(LOOK_EVERY, cost, LOOK_SHARE), until - now)))
            looked = time.monotonic()
            self._look(time_wait=False)
            cost = time.monotonic() - looked
        end = self.clock.now()
        report.seconds = end - start
        report.quiet_after_seconds = max(end - since, 0.0)
        held = {ip: (w, rate) for ip, (w, rate) in self._windows(before, since).items()
                if w is not None}
        if report.why:
            pass  # ended by the app's exit
        elif held:
            ip = max(held, key=lambda k: held[k][0])
            window, rate = held[ip]
            report.window_seconds = round(window, 3)
            report.why = f"window {window:.2f}s: {ip} sent {rate:.1f}/s"
        elif set(before) - set(self._keepers):
            report.why = "too sparse to wait for: " + ", ".join(
                f"{ip} {r:.2f}/s" for ip, r in sorted(before.items())[:3]
                if ip not in self._keepers)
        elif self._keepers:
            report.why = "keep-alive only: " + ", ".join(
                f"{ip} {n:.0f} requests per connection" if n < math.inf
                else f"{ip} opened no connection" for ip, n in sorted(self._keepers.items())[:3])
        else:
            report.why = f"no consumer sent in the last {self._horizon(began):.0f}s"
        with self._lock:
            report.late = sorted(
                (LatePeer(p.ip, p.late_requests, p.late_connections,
                          round(p.late_last - since, 3), round(before.get(p.ip, 0.0), 2),
                          p.ignored)
                 for p in self._peers.values() if p.late_last is not None and p.late_requests),
                key=lambda lp: (lp.ignored, -lp.requests))
            self._since = None
        if report.cut:
            log.warning("consumers still sending at the deadline: %s",
                        "; ".join(p.words(report.after)
                                  for p in report.late if p.peer in report.cut),
                        extra={"late": [p.__dict__ for p in report.late[:20]]})
        return report

    @property
    def keepers(self) -> list[str]:
        """The peers the last quiesce() found to keep their connections."""
        return list(self._keepers)

    def _keeping(self, began: float, opens: dict[str, float]) -> dict[str, float]:
        """The peers that keep their connections (KEEPS_REQUESTS), and the
        requests each of their connections carried."""
        requests = self.rates(max(began, self.clock.now()))
        with self._lock:
            live: dict[str, int] = {}
            for ip, _counted in self._live.values():
                live[ip] = live.get(ip, 0) + 1
        out = {}
        for ip, rate in requests.items():
            opened = opens.get(ip, 0.0)
            per_connection = rate / opened if opened else math.inf
            lifetime = live.get(ip, 0) / opened if opened else math.inf
            if live.get(ip) and per_connection >= KEEPS_REQUESTS and lifetime >= KEEPS_SECONDS:
                out[ip] = per_connection
        return out

    def _windows(self, before: dict[str, float],
                 since: float) -> dict[str, tuple[float | None, float]]:
        """Each consumer peer's window (None: too sparse to wait for) and the
        rate it follows from: the higher of the rate before the stop and
        the rate of what it sent after ``since`` (a short connection the
        peer closes is seen only by a look that falls in its lifetime, so
        either may undercount; what it sent late may also be all there is)."""
        out: dict[str, tuple[float | None, float]] = {}
        with self._lock:
            peers = [p for p in self._peers.values() if not p.ignored]
        for p in peers:
            if p.ip in self._keepers:
                continue
            rate = before.get(p.ip, 0.0)
            late = p.late_connections if self._opens_only else p.late_requests
            if p.late_last is not None and late:
                # One request alone reads as one per quiet_min.
                span = max(p.late_last - max(p.first or since, since), self.quiet_min)
                rate = max(rate, late / span)
            if rate <= 0:
                continue  # nothing before the stop, nothing since
            needed = _LN / rate
            out[p.ip] = (None if needed > self.quiet_max else max(needed, self.quiet_min), rate)
        return out

    def _holding(self, now: float, since: float,
                 before: dict[str, float]) -> list[tuple[str, float, float]]:
        """(peer, window, last arrival) of every peer whose window has not
        passed, the latest first."""
        out = []
        windows = self._windows(before, since)
        with self._lock:
            for ip, (window, _rate) in windows.items():
                if window is None:
                    continue
                peer = self._peers[ip]
                last = max(since, (peer.last_open if self._opens_only else peer.last) or since)
                if now - last < window:
                    out.append((ip, window, last))
        return sorted(out, key=lambda h: h[2], reverse=True)
