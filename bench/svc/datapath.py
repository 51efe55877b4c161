"""A Kubernetes Service's data path on loopback, the way kube-proxy's
nftables mode programs it (pkg/proxy/nftables/proxier.go): the kernel
load-balances each NEW connection to the virtual IP over the endpoints, and
conntrack keeps every established connection on the pod it was NATed to.

    table ip registrar-bench-<pid> {
        map service-ips {             # kube-proxy's ClusterIP map
            type ipv4_addr . inet_proto . inet_service : verdict
            elements = { 127.0.0.100 . tcp . 80 : goto service-web }
        }
        chain nat-output {            # locally generated traffic, dstnat
            type nat hook output priority -100; policy accept;
            jump services
        }
        chain services {
            ip daddr . meta l4proto . th dport vmap @service-ips
        }
        chain service-web {           # one rule, rewritten on every change
            numgen random mod 3 vmap { 0 : goto endpoint-P0, 1 : goto endpoint-P1,
                                       2 : goto endpoint-P2 }
        }
        chain endpoint-P0 {           # one chain per endpoint
            meta l4proto tcp dnat to 127.0.0.1:P0
        }
        ...
        chain filter-output {         # kube-proxy's filter chains match on ct state too
            type filter hook output priority -110; policy accept;
            ct state new counter
        }
    }

With no endpoint the service chain rejects (kube-proxy: its
``no-endpoint-services`` map and ``reject-chain``): a new connection is
refused. kube-proxy's masquerade marks are left out: every address here is
local, and the pods must see each consumer's own address.

The ``ct state`` rule matters: conntrack runs in a network namespace only
while some rule or table uses it. With the DNAT expressions as its only
users, the transaction that deletes the last endpoint chain that ever
NATed a connection turns conntrack off, and the established connections
it had NATed stop being translated (their packets go to the VIP itself and
are reset): seen on this machine's kernel 6.18. On a node, kube-proxy's own
``ct state`` rules (and the CNI's) keep it on; so does this one.

Every change of the endpoint set is ONE ``nft -f -`` transaction (new
endpoint chains added, the service chain flushed and its vmap rule added
again, removed endpoint chains deleted), atomic as kube-proxy's syncs are.
Removing an endpoint does not touch conntrack: established connections stay
on the pod they were NATed to, as with kube-proxy (which flushes conntrack
entries for UDP only).
"""
from __future__ import annotations

import atexit
import os
import socket
import subprocess
import threading

NFT = "/usr/sbin/nft"
VIP = "127.0.0.100"
VIP_PORT = 80
SERVICE_CHAIN = "service-web"


class DataPathError(RuntimeError):
    """The kernel cannot play the data path here (one line, for the user)."""


def _nft(script: str) -> None:
    try:
        done = subprocess.run([NFT, "-f", "-"], input=script, capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataPathError(f"{NFT}: {exc}") from None
    if done.returncode != 0:
        err = " / ".join(line.strip() for line in done.stderr.splitlines() if line.strip())
        raise DataPathError(f"nft failed ({done.returncode}): {err[:400]}")


class ServiceVIP:
    """The Service's virtual address ``VIP:VIP_PORT`` and its endpoints
    (ports on 127.0.0.1). create() before use; delete() (also run at exit)
    removes the table."""

    def __init__(self) -> None:
        self.table = f"registrar-bench-{os.getpid()}"
        self.address = f"{VIP}:{VIP_PORT}"
        self.endpoints: list[int] = []
        self.transactions = 0
        self._lock = threading.Lock()
        self._created = False

    def create(self) -> ServiceVIP:
        t = f"ip {self.table}"
        # A table left by a bench of the same pid (a reused pid after a SIGKILL).
        _nft_quiet(f"delete table {t}\n")
        _nft(f"""table {t} {{
    comment "bench/services.py pid {os.getpid()}: a Service, as kube-proxy's nftables mode"
    map service-ips {{
        type ipv4_addr . inet_proto . inet_service : verdict
        elements = {{ {VIP} . tcp . {VIP_PORT} : goto {SERVICE_CHAIN} }}
    }}
    chain nat-output {{
        type nat hook output priority -100; policy accept;
        jump services
    }}
    chain services {{
        ip daddr . meta l4proto . th dport vmap @service-ips
    }}
    chain {SERVICE_CHAIN} {{
        reject
    }}
    chain filter-output {{
        type filter hook output priority -110; policy accept;
        ct state new counter
    }}
}}
""")
        self._created = True
        atexit.register(self.delete)
        return self

    def set_endpoints(self, ports: list[int]) -> None:
        """Make ``ports`` the endpoint set: one atomic transaction."""
        with self._lock:
            t = f"ip {self.table}"
            old, new = set(self.endpoints), list(dict.fromkeys(ports))
            lines = []
            for p in new:
                if p not in old:
                    lines += [f"add chain {t} endpoint-{p}",
                              f"add rule {t} endpoint-{p} meta l4proto tcp dnat to 127.0.0.1:{p}"]
            lines.append(f"flush chain {t} {SERVICE_CHAIN}")
            if new:
                vmap = ", ".join(f"{i} : goto endpoint-{p}" for i, p in enumerate(new))
                lines.append(f"add rule {t} {SERVICE_CHAIN} numgen random mod {len(new)} "
                             f"vmap {{ {vmap} }}")
            else:
                lines.append(f"add rule {t} {SERVICE_CHAIN} reject")
            lines += [f"delete chain {t} endpoint-{p}" for p in sorted(old - set(new))]
            _nft("\n".join(lines) + "\n")
            self.endpoints = new
            self.transactions += 1

    def delete(self) -> None:
        if self._created:
            self._created = False
            _nft_quiet(f"delete table ip {self.table}\n")

    def check(self) -> None:
        """A connection to the VIP from another loopback address reaches a
        listener through the DNAT; once the endpoint is removed it still
        works (conntrack), and a new one is refused. DataPathError if not."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(3)
        port = listener.getsockname()[1]
        client = accepted = None
        try:
            self.set_endpoints([port])
            client = socket.socket()
            client.settimeout(3)
            client.bind(("127.0.0.2", 0))
            try:
                client.connect((VIP, VIP_PORT))
                accepted, peer = listener.accept()
                accepted.settimeout(3)
            except OSError as exc:
                raise DataPathError(
                    f"a connection to {self.address} did not reach the endpoint "
                    f"127.0.0.1:{port} through the DNAT: {exc!r}") from None
            if peer[0] != "127.0.0.2":
                raise DataPathError(f"the endpoint saw the consumer as {peer[0]}, not 127.0.0.2")
            self.set_endpoints([])
            try:
                client.sendall(b"ping")
                got = accepted.recv(4)
                accepted.sendall(b"pong")
                back = client.recv(4)
            except OSError as exc:
                raise DataPathError(f"an established connection broke when its endpoint was "
                                    f"removed (no conntrack?): {exc!r}") from None
            if got != b"ping" or back != b"pong":
                raise DataPathError("an established connection lost data when its endpoint "
                                    "was removed")
            probe = socket.socket()
            probe.settimeout(3)
            probe.bind(("127.0.0.2", 0))
            try:
                probe.connect((VIP, VIP_PORT))
                raise DataPathError(f"with no endpoint, a connection to {self.address} "
                                    "was accepted")
            except ConnectionRefusedError:
                pass
            except OSError as exc:
                raise DataPathError(f"with no endpoint, a connection to {self.address} "
                                    f"failed with {exc!r}, not refused") from None
            finally:
                probe.close()
        finally:
            for s in (client, accepted, listener):
                if s is not None:
                    s.close()


def stale_entries() -> int | None:
    """Conntrack entries to the VIP in a state that a new SYN cannot reopen
    (ESTABLISHED ... LAST_ACK): left by connections that were open when
    conntrack went off in this namespace (a table deleted under them). A
    consumer that draws such an entry's source port has its SYN ignored by
    conntrack, so not NATed, and refused by the VIP itself: one lost request
    (the RST then closes the entry). None: /proc/net/nf_conntrack is absent."""
    try:
        with open("/proc/net/nf_conntrack") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    stuck = ("ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "SYN_SENT", "SYN_RECV")
    return sum(1 for line in lines
               if f" dst={VIP} " in line and f" dport={VIP_PORT} " in line
               and any(f" {state} " in line for state in stuck))


def _nft_quiet(script: str) -> None:
    try:
        subprocess.run([NFT, "-f", "-"], input=script, capture_output=True, text=True,
                       timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        pass
