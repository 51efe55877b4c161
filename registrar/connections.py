"""What the app's port is doing, read from the kernel: `run` waits for its
connections before signalling the app (``stop.drain_connections``). All
containers of a pod share one network namespace, so this sees the app's
sockets from any of them."""
from __future__ import annotations

import os

_TCP_ESTABLISHED = "01"


def established_connections(port: int, proc_net: str = "/proc/net") -> int:
    """ESTABLISHED TCP connections whose local port is ``port`` (IPv4 and
    IPv6), read from /proc/net/tcp{,6} of this network namespace."""
    count = 0
    for name in ("tcp", "tcp6"):
        try:
            with open(os.path.join(proc_net, name)) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == _TCP_ESTABLISHED \
                            and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        count += 1
        except OSError:
            continue
    return count
