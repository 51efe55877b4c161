"""An in-memory registry and backend for the core's unit tests.

The registry has several members that apply writes after an optional lag,
so propagation is something to wait for, and fault switches: unreachable,
rejecting, hanging calls. It lives in the testing kit on purpose, not among
the backends: a registry inside the agent's own process is of no use in
production.
"""
from __future__ import annotations

import threading
import time
from typing import Literal

from registrar.clock import Clock
from registrar.plugin import Backend, BackendConfig, Duration, Observer
from registrar.errors import MemberDown, RegistrationRejected, RegistryUnavailable
from registrar.instance import Instance


class MemoryRegistry:
    """Committed state plus per-member views that catch up after `lag`."""

    def __init__(self, members: int = 3, lag: float = 0.0, clock: Clock | None = None):
        self.clock = clock or Clock()
        self.lag = [lag] * members
        self.frozen_at: dict[int, float] = {}  # member -> time its view stopped
        self.log: list[tuple[float, str, str | None]] = []  # (time, id, value or None)
        self.lock = threading.Lock()
        self.unavailable = False
        self.reject = False
        self.down: set[int] = set()  # members that refuse connections
        self.hang = threading.Event()  # set: calls block until `release` is set
        self.release = threading.Event()
        self.calls: list[str] = []

    def call(self, what: str) -> None:
        with self.lock:
            self.calls.append(what)
        if self.hang.is_set():
            self.release.wait(30)
        if self.unavailable:
            raise RegistryUnavailable(f"memory registry unreachable ({what})")
        if self.reject:
            raise RegistrationRejected(f"memory registry refused {what}")

    def write(self, key: str, value: str | None) -> None:
        with self.lock:
            self.log.append((self.clock.now(), key, value))

    def committed(self, key: str) -> str | None:
        with self.lock:
            values = [v for _, k, v in self.log if k == key]
        return values[-1] if values else None

    def freeze(self, member: int) -> None:
        """The member applies no further writes."""
        self.frozen_at[member] = self.clock.now()

    def view(self, member: int, key: str) -> str | None:
        cutoff = min(self.clock.now() - self.lag[member], self.frozen_at.get(member, float("inf")))
        with self.lock:
            values = [v for t, k, v in self.log if k == key and t <= cutoff]
        return values[-1] if values else None

    def count(self, what: str) -> int:
        with self.lock:
            return self.calls.count(what)


class MemoryConfig(BackendConfig):
    type: Literal["memory"]
    ttl: Duration = 1.0


class MemoryBackend(Backend):
    config_model = MemoryConfig

    def __init__(self, instance: Instance, config: MemoryConfig | None = None,
                 registry: MemoryRegistry | None = None):
        super().__init__(instance, config or MemoryConfig(type="memory"))
        self.registry = registry or MemoryRegistry()
        self.closed = False

    def register(self) -> None:
        self.registry.call("register")
        self.registry.write(self.instance.id, "up")
        self.registered = True

    def refresh(self) -> bool:
        self.registry.call("heartbeat")
        if self.registry.committed(self.instance.id) is None:
            self.registry.write(self.instance.id, "up")
            return True
        return False

    def drain(self, reason: str) -> None:
        self.registry.call("drain")
        if self.registry.committed(self.instance.id) is not None:
            self.registry.write(self.instance.id, "draining")

    def deregister(self) -> int:
        self.registry.call("deregister")
        self.registry.write(self.instance.id, None)
        self.registered = False
        return len(self.registry.log)

    def make_observers(self) -> list[Observer]:
        return [MemoryObserver(self.registry, i) for i in range(len(self.registry.lag))]

    def close(self) -> None:
        self.closed = True


class MemoryObserver(Observer):
    def __init__(self, registry: MemoryRegistry, member: int):
        self.registry = registry
        self.member = member
        self.name = f"memory member {member}"

    def close(self) -> None:
        pass  # it holds no connection

    def sees(self, instance: Instance, since: int | None = None) -> bool:
        if self.member in self.registry.down:
            raise MemberDown(f"{self.name}: connection refused")
        if self.registry.unavailable:
            raise RegistryUnavailable(f"{self.name} unreachable")
        return self.registry.view(self.member, instance.id) is not None


class FakeClock(Clock):
    """Time that moves only when someone sleeps: deadlines without waiting."""

    def __init__(self, start: float = 1000.0):
        self.t = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self.t

    def sleep(self, seconds: float, interrupt: threading.Event | None = None) -> bool:
        with self._lock:
            self.t += max(seconds, 0)
        time.sleep(0)  # let other threads run
        return bool(interrupt and interrupt.is_set())
