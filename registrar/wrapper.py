"""`registrar run -- CMD`: PID 1 around the app. Starts it, registers it
(once healthy, with a health gate), and on SIGTERM/SIGINT or /prestop
deregisters and waits for propagation *before* signalling the app; reaps
every zombie; forwards SIGHUP/SIGUSR1/SIGUSR2; exits with the app's status.
``stop.app_shutdown`` of the budget is kept for the app itself."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence

from .config import AgentConfig, signal_named
from .core import Registrar
from .health import ProbeProcesses
from .lifecycle import Lifecycle, exit_line, make_drain, serve_control
from .signals import STOP_SIGNALS, SignalPipe
from .stopping import Cause, StopReport, Trigger

log = logging.getLogger(__name__)

FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
#: Seconds what the app left behind gets between SIGTERM and SIGKILL.
LEFTOVER_GRACE = 1.0
_PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: orphans go to init as before
        pass


def _descendants(root: int) -> list[int]:
    """Every live process below ``root`` (from /proc), zombies excluded."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) and stat[0] != b"Z":
            parents.setdefault(stat[1], []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _own_pid() -> int:
    """This process's pid as /proc numbers it: in a PID namespace of its own
    with the host's /proc still mounted (a test's kubelet simulator),
    os.getpid() is 1, and the host's pid 1 is not our tree."""
    try:
        return int(os.readlink("/proc/self"))
    except (OSError, ValueError):
        return os.getpid()


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != b"Z"


def _stat(pid: int) -> tuple[bytes, int] | None:
    """A process's state letter and parent pid, from /proc; None once gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


class Wrapper:
    """The app process, its reaping and its signals, around one Registrar."""

    def __init__(self, registrar: Registrar, config: AgentConfig, argv: Sequence[str]):
        self.registrar = registrar
        self.config = config
        self.argv = list(argv)
        self.pipe: SignalPipe | None = None
        self.life: Lifecycle | None = None
        self.app: subprocess.Popen | None = None
        self.app_status: int | None = None
        #: The stop signal, once the stop sent it to the app.
        self._sent_stop_signal: int | None = None
        self._probes = ProbeProcesses()  # the reaper never steals a probe's child
        self.report: StopReport | None = None

    def run(self) -> int:
        # Orphans of the app's tree (a daemonising child that called setsid()
        # and left the app's process group) become our children, so that we
        # reap them and end them when we exit (as PID 1 we are their parent
        # anyway; elsewhere they would outlive us).
        _become_subreaper()
        self.pipe = SignalPipe().catch(STOP_SIGNALS + FORWARDED_SIGNALS + (signal.SIGCHLD,))
        reserve = self.config.stop.app_reserve
        self.life = Lifecycle(self.registrar, self.pipe, reserve=reserve,
                              drain=make_drain(self.registrar, self.config))
        server = serve_control(self.registrar, self.config, self.life,
                               ready=self.registrar.readiness)
        try:
            self.app = subprocess.Popen(self.argv, process_group=0)
        except OSError as exc:
            log.error("cannot start %s: %s", self.argv[0], exc.strerror)
            return 127
        log.info("started %s (pid %d)", " ".join(self.argv), self.app.pid)
        # Registers once the app passes the health gate.
        self.registrar.start(app_running=self._app_running, children=self._probes)
        code = self._main_loop(server)
        self._end_the_rest()
        if server is not None:
            if self.report is not None:
                server.hand_over(self.report)
            # A /prestop still being answered gets its report before we exit.
            server.close(grace=min(0.5, max(self.life.deadline.remaining(), 0.05)))
        self.pipe.close()
        exit_line(code, self.report, self.life, app_status=self.app_status,
                  sent=self._sent_stop_signal)
        return code

    def _handle(self, signals: list[int]) -> None:
        """Reap, forward, note stop signals: everything a wake-up may mean."""
        self._reap()
        for sig in signals:
            if sig in FORWARDED_SIGNALS:
                self._signal_app(sig)
            elif sig in STOP_SIGNALS:
                self.life.note(Trigger.signal(sig))

    def _app_running(self) -> bool:
        """Whether the app runs: also asked from other threads (readiness,
        the stop's wait for consumers) while the main loop is in the stop,
        so an exit not yet reaped counts too (peeked at, not reaped)."""
        if self.app is None or self.app_status is not None:
            return False
        try:
            info = os.waitid(os.P_PID, self.app.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False  # reaped already: its status is being noted
        return info is None or info.si_pid == 0

    def _main_loop(self, server) -> int:
        while True:
            self._handle(self.pipe.wait())
            if self.app_status is not None and not self.life.triggered:
                log.warning("the app exited with status %d: %s", self.app_status,
                            "deregistering" if self.registrar.backends else "stopping")
                self.report = self.life.stop(Trigger.app_exit(self.app_status))
                return self.app_status
            if self.life.triggered:
                return self._shutdown(server)

    def _shutdown(self, server) -> int:
        # The stop: registries, consumers, busy connections (podstop.py).
        self.report = self.life.stop(self.life.first)
        self._handle([])
        deadline = self.life.deadline
        if server is not None and self.life.first.cause is Cause.PRESTOP:
            # Let the hook's answer leave before the app (and so we) exit.
            server.responses_sent.wait(max(0.0, min(0.5, deadline.remaining()
                                                    - self.config.stop.app_reserve)))
        stop_signal = signal_named(self.config.stop.signal)
        if self.app_status is None:
            log.info("sending %s to the app (%.1fs left for it)", stop_signal.name,
                     deadline.remaining())
            self._signal_app(stop_signal)
            self._sent_stop_signal = int(stop_signal)
        while self.app_status is None and not deadline.expired:
            self._handle(self.pipe.wait(deadline.cap(0.1)))
        if self.app_status is None:
            log.error("the app did not exit before the deadline: SIGKILL")
            self._signal_app(signal.SIGKILL, group=True)
            while self.app_status is None:
                self._handle(self.pipe.wait(0.05))
        return self.app_status

    def _end_the_rest(self) -> None:
        """The app has exited: SIGTERM what is left of its tree, and SIGKILL
        what is still there after LEFTOVER_GRACE (within the deadline)."""
        left = _descendants(_own_pid())
        if not left:
            return
        log.warning("the app left %d process(es) behind (pid %s): SIGTERM, then SIGKILL",
                    len(left), ", ".join(map(str, left[:10])))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = self.life.deadline if self.life is not None else None
            wait = LEFTOVER_GRACE if deadline is None else \
                min(LEFTOVER_GRACE, max(deadline.remaining(), 0.05))
            end = time.monotonic() + wait
            while left and time.monotonic() < end:
                self._handle(self.pipe.wait(0.02))
                left = [pid for pid in left if _alive(pid)]
            if not left:
                return

    def _signal_app(self, sig: int, group: bool = False) -> None:
        if self.app is None or self.app_status is not None:
            return
        try:
            (os.killpg if group else os.kill)(self.app.pid, sig)
        except ProcessLookupError:
            pass

    def _reap(self) -> None:
        """Reap every exited child except the health probes' (their own
        subprocess call waits for them); note the app's status."""
        while True:
            with self._probes.lock:
                try:
                    info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:
                    return
                if info is None or info.si_pid == 0 or info.si_pid in self._probes.pids:
                    return
                pid, status = os.waitpid(info.si_pid, 0)
            if self.app is not None and pid == self.app.pid:
                code = os.waitstatus_to_exitcode(status)
                self.app_status = 128 - code if code < 0 else code
                self.app.returncode = code  # Popen must not wait for it again
