"""Real network faults on loopback, injected with nftables (root only)."""
from __future__ import annotations

import functools
import itertools
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable

log = logging.getLogger(__name__)

_TABLE_PREFIX = "registrar_test_"
_seq = itertools.count()


def _nft(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True,
                          timeout=10)


class Blackhole:
    """Drop (or refuse with a TCP reset) TCP to 127.0.0.1 on the given port(s).

    The rule lives in an nftables table of its own (family inet, chain on the
    `output` hook), deleted again on exit; nothing else in the ruleset is touched.
    mode="drop": connects and requests time out; mode="reject": connection refused/reset.
    With ``gid``, only sockets of processes running with that group id are
    cut off (start the process under test with ``Popen(group=gid)``): the
    test's own reads of the same servers go through.
    """

    def __init__(self, port: int | Iterable[int], mode: str = "drop", gid: int | None = None):
        if mode not in ("drop", "reject"):
            raise ValueError(f"mode must be 'drop' or 'reject', not {mode!r}")
        self.ports = [port] if isinstance(port, int) else list(port)
        self.mode = mode
        self.gid = gid
        self.table = f"{_TABLE_PREFIX}{os.getpid()}_{next(_seq)}"
        self.active = False

    @staticmethod
    @functools.cache
    def available() -> bool:
        """Whether nft works here (root, nft present, kernel accepts a table)."""
        if os.geteuid() != 0 or not shutil.which("nft"):
            return False
        probe = f"{_TABLE_PREFIX}probe_{os.getpid()}"
        try:
            return _nft(f"add table inet {probe}; delete table inet {probe}").returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    @staticmethod
    def cleanup_stale() -> list[str]:
        """Delete tables left behind by test processes that no longer exist."""
        out = _nft("list", "tables").stdout
        removed = []
        for name, pid in re.findall(rf"^table inet ({_TABLE_PREFIX}(\d+)_\d+)$", out, re.M):
            if not os.path.exists(f"/proc/{pid}"):
                _nft("delete", "table", "inet", name)
                removed.append(name)
        return removed

    def add(self) -> None:
        verdict = "drop" if self.mode == "drop" else "reject with tcp reset"
        ports = ", ".join(str(p) for p in self.ports)
        match = "" if self.gid is None else f"meta skgid {self.gid} "
        res = _nft("-f", "-", stdin=(
            f"table inet {self.table} {{\n"
            f"  chain out {{\n"
            f"    type filter hook output priority 0; policy accept;\n"
            f"    {match}ip daddr 127.0.0.1 tcp dport {{ {ports} }} {verdict}\n"
            f"  }}\n}}\n"))
        if res.returncode != 0:
            raise RuntimeError(f"nft could not add table {self.table}: {res.stderr.strip()}")
        self.active = True
        log.info("blackhole %s: %s tcp to 127.0.0.1 port(s) %s%s", self.table, self.mode, ports,
                 "" if self.gid is None else f" from gid {self.gid}")

    def remove(self) -> None:
        if not self.active:
            return
        res = _nft("delete", "table", "inet", self.table)
        if res.returncode != 0:
            log.warning("could not delete nft table %s: %s", self.table, res.stderr.strip())
        self.active = False

    def __enter__(self) -> Blackhole:
        self.add()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()
