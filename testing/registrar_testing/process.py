"""A server process with its output in a log file: start, kill, freeze."""
from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from . import wait_until


class ServerProcess:
    """One server process with its output in a log file under its own dir."""

    def __init__(self, name: str, argv: Sequence[str], workdir: Path,
                 env: dict[str, str] | None = None):
        self.name = name
        self.argv = list(argv)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{name}.log"
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        if self.running:
            return
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir, env=self.env, start_new_session=True)
        finally:
            log.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL and reap (a crash, or a fast teardown)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a frozen process must die too
            self.proc.kill()
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL if it has not exited within timeout."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def freeze(self) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing.
        Returns once every thread is stopped (a busy process may otherwise
        answer for a moment after the signal)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        wait_until(self._all_threads_stopped, 5, f"every thread of {self.name} stops",
                   interval=0.001, ignore=OSError)

    def _all_threads_stopped(self) -> bool:
        for stat in Path(f"/proc/{self.pid}/task").glob("*/stat"):
            try:
                state = stat.read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue  # the thread just went away
            if state not in ("T", "t"):
                return False
        return True

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
