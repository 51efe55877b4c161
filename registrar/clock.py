"""Time, passed in so tests can control it, and the one stop Deadline."""
from __future__ import annotations

import threading
import time


class Clock:
    """Monotonic time and interruptible sleep. Tests pass a fake one."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float, interrupt: threading.Event | None = None) -> bool:
        """Sleep up to ``seconds``; return True early if ``interrupt`` is set."""
        if seconds <= 0:
            return bool(interrupt and interrupt.is_set())
        if interrupt is None:
            time.sleep(seconds)
            return False
        return interrupt.wait(seconds)


class Deadline:
    """A point in time every step of the stop sequence draws its budget from."""

    def __init__(self, at: float, clock: Clock):
        self.at = at
        self.clock = clock

    @classmethod
    def after(cls, seconds: float, clock: Clock, start: float | None = None) -> Deadline:
        """The deadline ``seconds`` after ``start`` (default: now)."""
        return cls((clock.now() if start is None else start) + seconds, clock)

    def remaining(self) -> float:
        return max(0.0, self.at - self.clock.now())

    @property
    def expired(self) -> bool:
        return self.clock.now() >= self.at

    def cap(self, seconds: float) -> float:
        """``seconds``, or less if the deadline comes first."""
        return min(seconds, self.remaining())

    def __repr__(self) -> str:
        return f"Deadline(remaining={self.remaining():.3f}s)"
