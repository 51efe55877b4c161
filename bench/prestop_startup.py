#!/usr/bin/env python3
"""Start-up cost of the preStop hook: `registrar prestop` on its no-op path
(the agent has already finished its stop sequence and answers at once)
against `python -c pass`, each run N times as a fresh process.
Target: prestop <= 3x python -c pass.

    .venv/bin/python bench/prestop_startup.py [--runs 40]
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from registrar_testing import free_port
from registrar_testing.etcd import EtcdCluster

BIN = Path(sys.executable).parent


def timed(argv: list[str], runs: int, env: dict[str, str]) -> list[float]:
    out = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=True)
        out.append(time.perf_counter() - began)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    # SIGTERM (a CI timeout, say) unwinds like Ctrl-C: the finally blocks
    # stop every server and process this bench started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="bench-prestop-") as tmp, \
            EtcdCluster(1, Path(tmp) / "etcd") as cluster:
        control = f"127.0.0.1:{free_port()}"
        config = Path(tmp) / "agent.yaml"
        config.write_text(f"service: {{name: bench, port: 8080}}\n"
                          f"backends: [{{type: etcd, endpoints: [{cluster.endpoints[0]}]}}]\n"
                          f"control: {{listen: '{control}'}}\n")
        env = {**os.environ, "POD_NAME": "bench-0", "POD_IP": "10.0.0.1"}
        agent = subprocess.Popen([str(BIN / "registrar"), "agent", "--config", str(config)],
                                 env=env, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 15
            prestop = [str(BIN / "registrar"), "prestop", "--control", control]
            while subprocess.run(prestop, env=env, stdout=subprocess.DEVNULL).returncode != 0:
                if time.monotonic() > deadline:
                    raise SystemExit("the agent never answered /prestop")
                time.sleep(0.1)
            baseline = timed([sys.executable, "-c", "pass"], args.runs, env)
            hook = timed(prestop, args.runs, env)
            module = timed([sys.executable, "-m", "registrar", "prestop", "--control", control],
                           args.runs, env)
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=30)
    base = statistics.median(baseline)
    print(f"{args.runs} runs each, median (p90):")
    for name, values in (("python -c pass", baseline), ("registrar prestop (no-op)", hook),
                         ("python -m registrar prestop", module)):
        med = statistics.median(values)
        p90 = sorted(values)[int(0.9 * (len(values) - 1))]
        print(f"  {name:30s} {med * 1000:6.1f} ms ({p90 * 1000:6.1f} ms)   {med / base:4.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
