#!/usr/bin/env python3
"""What watching the app's port costs (registrar/traffic.py): the time of one
look at a port, live connections and TIME_WAIT, against how many TCP sockets
the host holds, and the CPU the sampler takes before a stop.

    .venv/bin/python bench/traffic_cost.py [--time-wait 0,10000,30000] [--seconds 10]

For each count it makes that many connections to a throw-away port of its
own and lets the server close them first (so they wait in TIME_WAIT, as the
short connections of a busy HTTP server do), then times 50 looks at another
port with 50 idle keep-alive connections, and runs a Traffic sampler on that
port for --seconds, reading the process's CPU time. The kernel walks every
TCP socket of the host to answer for one port, so the look's cost follows the
host's sockets, not the port's. Everything is on 127.0.0.1; the sockets it
made leave TIME_WAIT on their own after 60 s.
"""
from __future__ import annotations

import argparse
import socket
import time

from registrar.connections import LIVE, TIME_WAIT, connections
from registrar.traffic import Traffic


def time_wait_sockets(count: int) -> None:
    server = socket.create_server(("127.0.0.1", 0), backlog=512)
    port = server.getsockname()[1]
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server closes first: its side waits in TIME_WAIT
        client.close()
    server.close()


def host_time_wait() -> int:
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("tw") + 1])
    return -1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-wait", default="0,10000,30000",
                        help="comma-separated counts of TIME_WAIT sockets to add")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    app = socket.create_server(("127.0.0.1", 0))
    port = app.getsockname()[1]
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    accepted = [app.accept()[0] for _ in idle]
    print(f"{'TIME_WAIT on the host':>22} {'live look':>10} {'TIME_WAIT look':>15} "
          f"{'sampler CPU':>12}")
    made = 0
    for target in (int(n) for n in args.time_wait.split(",")):
        if target > made:
            time_wait_sockets(target - made)
            made = target
        looks = {}
        for name, states in (("live", LIVE), ("tw", TIME_WAIT)):
            began = time.process_time()
            for _ in range(50):
                connections(port, states)
            looks[name] = (time.process_time() - began) / 50 * 1000
        traffic = Traffic([port]).start()
        cpu, wall = time.process_time(), time.monotonic()
        time.sleep(args.seconds)
        share = 100 * (time.process_time() - cpu) / (time.monotonic() - wall)
        traffic.close()
        print(f"{host_time_wait():>22} {looks['live']:>8.2f}ms {looks['tw']:>13.2f}ms "
              f"{share:>10.2f} %")
    for s in idle + accepted + [app]:
        s.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
