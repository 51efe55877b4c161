"""Signals, handled the one way that is safe here: a handler only writes
the signal's number to a socket pair (no lock, no thread start inside a
handler: a handler that sets a threading.Event can deadlock when the
signal lands while the main thread holds that Event's lock), and whoever
waits on the other end does the work. `agent` and `run` wait in their main
loop; library mode waits in a thread of its own, so the app's main loop
(asyncio's own wake-up fd included) is left alone."""
from __future__ import annotations

import os
import select
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .errors import RegistrarError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalPipe:
    """Wakes one waiter, from signal handlers and from other threads."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        for sock in (self._r, self._w):
            sock.setblocking(False)
        self._caught: set[int] = set()
        self._previous_fd: int | None = None

    def catch(self, signals: Sequence[int]) -> SignalPipe:
        """Note these signals (replacing their handlers), for a process
        whose main thread waits here (`agent`, `run`).

        The kernel may deliver a signal to any thread. Python runs its
        handler only in the main thread, when that thread next runs Python
        code -- never while it sleeps in select() and the signal went to
        another thread (kazoo's, the scheduler's): the agent then slept
        through its SIGTERM. So the C-level handler writes the signal's
        number to our socket itself (``signal.set_wakeup_fd``), which wakes
        select() whichever thread got the signal; the Python handler is a
        no-op. Main thread only; not for library use (asyncio owns the
        wakeup fd there)."""
        self._caught.update(signals)
        self._previous_fd = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, _noted_by_wakeup_fd)
        return self

    def note(self, signum: int) -> None:
        try:
            self._w.send(bytes([signum]))
        except OSError:
            pass  # full (the waiter is behind anyway) or closed

    def wake(self) -> None:
        """Wake the waiter from another thread."""
        self.note(0)

    def wait(self, timeout: float | None = None) -> list[int]:
        """Block until woken (or timeout); the signal numbers received."""
        ready, _, _ = select.select([self._r], [], [], timeout)
        if not ready:
            return []
        try:
            data = self._r.recv(4096)
        except (BlockingIOError, OSError):
            return []
        # The wakeup fd carries every signal that has a Python handler:
        # keep ours (0 is a wake() from a thread).
        return [n for n in data if n and (not self._caught or n in self._caught)]

    def close(self) -> None:
        if self._previous_fd is not None:
            signal.set_wakeup_fd(self._previous_fd)
            self._previous_fd = None
        self._r.close()
        self._w.close()


def _noted_by_wakeup_fd(signum: int, frame: Any) -> None:
    """The Python-level handler of a signal the wakeup fd already noted."""


def chain_stop_handlers(stop: Callable[[int], object],
                        signals: Sequence[int] = STOP_SIGNALS) -> None:
    """Library mode (Registrar.install_signal_handlers): on a stop signal,
    run ``stop(signum)`` (the stop sequence) in a thread, then hand the
    signal to the handler that was there before (or its default action)."""
    if threading.current_thread() is not threading.main_thread():
        raise RegistrarError("install_signal_handlers() must be called from the main thread")
    previous = {sig: signal.getsignal(sig) for sig in signals}
    done: set[int] = set()  # signals re-delivered once the sequence finished
    pipe = SignalPipe()

    def handler(signum: int, frame: Any) -> None:
        if signum not in done:
            pipe.note(signum)
            return
        old: Callable | int | None = previous[signum]  # the sequence is over: the app's turn
        if callable(old):
            old(signum, frame)
        elif old != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def watch() -> None:
        while True:
            for signum in pipe.wait():
                stop(signum)
                done.add(signum)
                os.kill(os.getpid(), signum)  # handled in the main thread, by the chain above

    threading.Thread(target=watch, name="registrar-signals", daemon=True).start()
    for sig in signals:
        signal.signal(sig, handler)
