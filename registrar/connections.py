"""What the app's port is doing, asked of the kernel: the stop waits until
no connection on ``service.port`` is busy before the app is signalled
(``run``) or ``/prestop`` returns (``agent``). All containers of a pod
share one network namespace, so a sidecar sees the app's sockets too.

The kernel answers through NETLINK ``sock_diag`` (INET_DIAG with the
``tcp_info`` extension, filtered to the port by the kernel's own bytecode):
one round trip of well under a millisecond however many sockets the host
has, where parsing /proc/net/tcp grows with every socket (measured 0.9 ms
against 18 ms at ~10k sockets).

A connection is **busy** while any of these holds:
  1. bytes wait in its receive queue (a request the app has not read yet)
     or in its send queue (a response not yet acknowledged by the peer);
  2. the peer sent data more recently than the app did, or sent some while
     the app never sent any (a request the app has read and not answered);
  3. data moved either way within the last ``quiet`` seconds (a response
     being streamed, a connection just opened, a request just answered).
Otherwise it is **idle**: a keep-alive connection whose last response was
acknowledged and that has been silent for ``quiet``. Idle connections do
not hold the stop; the app's shutdown closes them.
"""
from __future__ import annotations

import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

#: Seconds between two "still waiting" lines of a long wait (the stop's
#: wait on a backend, the wait for the app's connections).
PROGRESS_EVERY = 1.0

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_INET_DIAG_REQ_BYTECODE = 1
_INET_DIAG_INFO = 2
_BC_S_GE, _BC_S_LE = 2, 3
_TCP_ESTABLISHED, TCP_TIME_WAIT, _TCP_CLOSE_WAIT, _TCP_LISTEN = 1, 6, 8, 10
#: What the busy drain reads: connections the app still has open.
OPEN = (1 << _TCP_ESTABLISHED) | (1 << _TCP_CLOSE_WAIT)
#: Every state of an accepted connection but TIME_WAIT (SYN_RECV to LAST_ACK).
LIVE = sum(1 << s for s in range(1, 13) if s not in (TCP_TIME_WAIT, _TCP_LISTEN))
#: The connections the app closed first, kept by the kernel for 60 s.
TIME_WAIT = 1 << TCP_TIME_WAIT
#: How long the kernel keeps a closed connection in TIME_WAIT (TCP_TIMEWAIT_LEN).
TIME_WAIT_SECONDS = 60.0

_NLMSGHDR = struct.Struct("=IHHII")
_REQ = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states; then the socket id
_SOCKID = struct.Struct("!HH16s16s")  # ports and addresses are in network order
_MSG = struct.Struct("=BBBB")  # family, state, timer, retrans
_QUEUES = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
_RTATTR = struct.Struct("=HH")
_COOKIE = struct.Struct("=II")
_COOKIE_AT = _MSG.size + _SOCKID.size + 4  # after the interface index
_MSG_HEAD = _COOKIE_AT + _COOKIE.size + _QUEUES.size


@dataclass(frozen=True)
class Connection:
    """One TCP connection to the port, as the kernel sees it."""
    peer: str
    state: int
    rqueue: int  # bytes received, not yet read by the app
    wqueue: int  # bytes sent or queued, not yet acknowledged by the peer
    last_sent_ms: int  # since the app last sent data (or since the connection opened)
    last_received_ms: int  # since the peer last sent data
    answered: bool  # the peer has acknowledged data from the app
    asked: bool  # the peer has sent data
    #: The kernel's id of the socket: unique while the host runs, kept in TIME_WAIT.
    cookie: int = 0
    #: Segments with data the peer sent (tcpi_data_segs_in); a request is one
    #: or a few. 0 in TIME_WAIT, which has no tcp_info.
    data_segs_in: int = 0
    #: Milliseconds until the kernel's timer for the socket fires: in
    #: TIME_WAIT, what is left of its 60 s.
    expires_ms: int = 0

    @property
    def peer_ip(self) -> str:
        """The peer's address alone; an IPv4-mapped IPv6 address as IPv4."""
        return plain_ip(self.peer.rsplit(":", 1)[0])

    @property
    def peer_port(self) -> int:
        return int(self.peer.rsplit(":", 1)[1])

    def busy(self, quiet: float | None) -> str | None:
        """Why the connection is busy (see the module's docstring), or None.
        ``quiet`` None: only while a request is in it (unread, or read and
        not answered); an answer not yet acknowledged is not, since the
        kernel still delivers it once the app has exited."""
        if self.rqueue:
            return "request waiting to be read"
        # The times are in jiffies: a request that follows the connect within
        # one tick looks as old as the connection, hence the byte counts.
        processing = self.last_received_ms < self.last_sent_ms or \
            (self.asked and not self.answered)
        if quiet is None:
            # Within a tick (up to 10 ms) a request answered and the next one
            # arrived look alike: busy then too.
            return "request being processed" if processing or \
                min(self.last_sent_ms, self.last_received_ms) < _TICK_MS else None
        if self.wqueue:
            return "response not yet acknowledged"
        if processing:
            return "request being processed"
        if min(self.last_sent_ms, self.last_received_ms) < quiet * 1000:
            return "active within the last %gms" % (quiet * 1000)
        return None


#: The longest jiffy (HZ=100): tcp_info's times are counted in them.
_TICK_MS = 10


def plain_ip(ip: str) -> str:
    """An IPv4-mapped IPv6 address (a dual-stack listener's IPv4 peer) as IPv4."""
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def connections(port: int, states: int = OPEN) -> list[Connection]:
    """The TCP connections whose local port is ``port`` in ``states`` (a
    mask; by default ESTABLISHED and CLOSE_WAIT), IPv4 and IPv6, in this
    network namespace."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2.0)
        found: list[Connection] = []
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
            nl.send(_request(family, port, seq, states))
            found += _replies(nl, seq)
        return found


def _request(family: int, port: int, seq: int, states: int = OPEN) -> bytes:
    # The kernel's filter: sport >= port, then sport <= port. Each op is
    # (code, yes, no) with the port in the following op's "no"; a jump to
    # exactly the end accepts, one past it rejects.
    bytecode = struct.pack("=BBHBBH", _BC_S_GE, 8, 20, 0, 0, port) + \
        struct.pack("=BBHBBH", _BC_S_LE, 8, 12, 0, 0, port)
    attr = _RTATTR.pack(_RTATTR.size + len(bytecode), _INET_DIAG_REQ_BYTECODE) + bytecode
    body = _REQ.pack(family, socket.IPPROTO_TCP, 1 << (_INET_DIAG_INFO - 1), 0, states) + \
        bytes(_SOCKID.size + 12) + attr
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), _SOCK_DIAG_BY_FAMILY,
                          _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0) + body


def _replies(nl: socket.socket, seq: int) -> list[Connection]:
    found = []
    while True:
        data = nl.recv(65536)
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size:
                return found
            if msg_seq == seq:
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    errno = -struct.unpack_from("=i", data, offset + _NLMSGHDR.size)[0]
                    raise OSError(errno, f"sock_diag: {os.strerror(errno)}")
                if kind == _SOCK_DIAG_BY_FAMILY:
                    found.append(_connection(data[offset + _NLMSGHDR.size:offset + length]))
            offset += (length + 3) & ~3


def _connection(msg: bytes) -> Connection:
    family, state, _timer, _retrans = _MSG.unpack_from(msg, 0)
    _sport, dport, _src, dst = _SOCKID.unpack_from(msg, _MSG.size)
    low, high = _COOKIE.unpack_from(msg, _COOKIE_AT)
    expires, rqueue, wqueue, _uid, _inode = _QUEUES.unpack_from(msg, _MSG_HEAD - _QUEUES.size)
    size = 4 if family == socket.AF_INET else 16
    peer = socket.inet_ntop(family, dst[:size])
    last_sent = last_received = acked = received = data_segs_in = 0
    offset = _MSG_HEAD
    while offset + _RTATTR.size <= len(msg):
        length, kind = _RTATTR.unpack_from(msg, offset)
        if length < _RTATTR.size:
            break
        if kind == _INET_DIAG_INFO and length >= _RTATTR.size + 136:
            # struct tcp_info: tcpi_last_data_sent at 44, tcpi_last_data_recv
            # at 52 (ms); tcpi_bytes_acked at 120, tcpi_bytes_received at 128.
            info = offset + _RTATTR.size
            last_sent, = struct.unpack_from("=I", msg, info + 44)
            last_received, = struct.unpack_from("=I", msg, info + 52)
            acked, received = struct.unpack_from("=QQ", msg, info + 120)
            if length >= _RTATTR.size + 156:  # tcpi_data_segs_in at 152 (Linux 4.6+)
                data_segs_in, = struct.unpack_from("=I", msg, info + 152)
        offset += (length + 3) & ~3
    return Connection(f"{peer}:{dport}", state, rqueue, wqueue, last_sent, last_received,
                      answered=acked > 0, asked=received > 0, cookie=low | high << 32,
                      data_segs_in=data_segs_in, expires_ms=expires)


def paced(interval: float, cost: float, share: float) -> float:
    """The pause after a look that took ``cost`` seconds, at least
    ``interval``, so that looking takes at most ``share`` of a core. The
    kernel walks every TCP socket of the host (its hash is shared by every
    network namespace) to answer for one port: ~0.2 us a socket, 6 ms at
    30,000 sockets in TIME_WAIT on a busy node."""
    return max(interval, cost / share - cost)


def established_connections(port: int) -> int:
    """How many connections to ``port`` are open (ESTABLISHED or CLOSE_WAIT)."""
    return len(connections(port))


@dataclass
class DrainReport:
    """What waiting for the app's connections achieved."""
    mode: str
    seconds: float = 0.0
    waited_for: int = 0  # busy connections when the wait began
    cut: list[str] = field(default_factory=list)  # still busy at the deadline, and why
    #: Kept connections not waited for, left to the app's shutdown: peer -> how many.
    left: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        if self.cut:
            text = f"{len(self.cut)} busy connection(s) cut at the deadline ({'; '.join(self.cut)})"
        elif not self.waited_for:
            text = "no busy connection"
        else:
            text = f"{self.waited_for} busy connection(s) done in {self.seconds * 1000:.0f}ms"
        if self.left:
            text += "; left to the app's shutdown: " + ", ".join(
                f"{n} kept connection(s) of {ip}" for ip, n in sorted(self.left.items())[:5])
        return text


class Drain:
    """Waits, within a deadline, until no connection to ``port`` is busy
    (``mode="busy"``) or until there is none at all (``mode="all"``)."""

    #: Seconds between two looks at the port (more on a host with many
    #: sockets: looking takes at most SHARE of a core).
    INTERVAL = 0.005
    SHARE = 0.2

    def __init__(self, port: int, mode: str = "busy", quiet: float = 0.05,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.port = port
        self.mode = mode
        self.quiet = quiet
        self.clock = clock
        self.sleep = sleep

    def holding(self, in_flight_only: bool = False,
                skip: frozenset[str] = frozenset()) -> list[str]:
        """What holds the stop now: one line per connection (see wait())."""
        try:
            conns = connections(self.port)
        except OSError as exc:
            log.warning("cannot read the connections of port %d: %s", self.port, exc)
            return []
        if self.mode == "all":
            return [f"{c.peer} open" for c in conns]
        quiet = None if in_flight_only else self.quiet
        return [f"{c.peer} {why}" for c in conns
                if plain_ip(c.peer_ip) not in skip and (why := c.busy(quiet))]

    def wait(self, until: float, in_flight_only: bool = False,
             skip: frozenset[str] = frozenset()) -> DrainReport:
        """Wait until nothing holds the stop, or until the clock reads ``until``.
        With ``in_flight_only`` a connection is busy only while a request is
        in it, not for ``quiet`` after. The connections of peers in ``skip``
        do not hold it: with no registry, the clients that keep their
        connections, which a Service's data path never moves off the pod
        (conntrack) and whose next request comes whenever: a busy pool has
        one in flight at every moment, and only the app's own shutdown ends
        them (a graceful one finishes what is in flight)."""
        began = self.clock()
        report = DrainReport(self.mode)
        holding = self.holding(in_flight_only, skip)
        report.waited_for = len(holding)
        busy = self.mode == "busy"
        if holding:
            log.info("waiting for %d %sconnection(s) to port %d%s: %s", len(holding),
                     "busy " if busy else "", self.port, "" if busy else " to close",
                     "; ".join(holding[:5]))
        noted = began
        cost = 0.0
        while holding and self.clock() < until:
            pause = paced(self.INTERVAL, cost, self.SHARE)
            self.sleep(max(0.0, min(pause, until - self.clock())))
            looked = time.monotonic()
            holding = self.holding(in_flight_only, skip)
            cost = time.monotonic() - looked
            if holding and self.clock() - noted >= PROGRESS_EVERY:
                noted = self.clock()  # a long wait is not silent: once a second, who
                log.info("still waiting for %d %sconnection(s) to port %d (%.1fs left): %s",
                         len(holding), "busy " if busy else "", self.port,
                         until - self.clock(), "; ".join(holding[:5]),
                         extra={"connections": holding[:20],
                                "seconds": round(until - self.clock(), 3)})
        report.seconds = self.clock() - began
        if skip:
            try:
                for c in connections(self.port):
                    if (ip := plain_ip(c.peer_ip)) in skip:
                        report.left[ip] = report.left.get(ip, 0) + 1
            except OSError:
                pass  # warned about above
        if holding:
            report.cut = holding
            log.warning("%d connection(s) to port %d still %s at the deadline: %s", len(holding),
                        self.port, "busy" if busy else "open", "; ".join(holding[:5]))
        return report
