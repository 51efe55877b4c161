"""The bench's endpoints controller and kube-proxy in one: it puts a pod's
endpoint in the Service's data path when the pod is ready, and takes it out
a *lag* after the pod's deletion began (see bench/services.py for why the
lag, and why it is drawn from 0.1-3 s by default). Each change is one nft
transaction (datapath.ServiceVIP.set_endpoints), applied by one thread in
the order the changes fall due."""
from __future__ import annotations

import heapq
import itertools
import threading
import time
from dataclasses import dataclass

from .datapath import ServiceVIP


@dataclass
class Removal:
    """One endpoint taken out after a pod's deletion."""
    port: int
    lag: float  # drawn
    start: float  # time.monotonic(): the moment the lag counts from (the deletion)
    removed_at: float | None = None  # the transaction that took it out had returned

    @property
    def due(self) -> float:
        return self.start + self.lag

    def applied(self, deleted_at: float) -> float | None:
        """The lag it really had: the pod's deletion until its endpoint was out."""
        return None if self.removed_at is None else self.removed_at - deleted_at


class Endpoints:
    def __init__(self, vip: ServiceVIP):
        self.vip = vip
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._ports: list[int] = []
        self._due: list[tuple[float, int, Removal]] = []
        self._seq = itertools.count()
        self._halt = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="endpoints", daemon=True)
        self._thread.start()

    def reset(self) -> None:
        """No endpoint, nothing pending."""
        with self._cond:
            self._due.clear()
            self._ports = []
            self.vip.set_endpoints([])
            self._cond.notify_all()

    def add(self, port: int) -> None:
        with self._cond:
            self._raise()
            if port not in self._ports:
                self._ports.append(port)
                self.vip.set_endpoints(self._ports)

    def remove_after(self, port: int, lag: float, start: float) -> Removal:
        removal = Removal(port, lag, start)
        with self._cond:
            self._raise()
            heapq.heappush(self._due, (removal.due, next(self._seq), removal))
            self._cond.notify_all()
        return removal

    def pending(self) -> int:
        with self._lock:
            return len(self._due)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every scheduled removal was applied."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._due and not self.error:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self._raise()
        return True

    def close(self) -> None:
        with self._cond:
            self._halt = True
            self._cond.notify_all()
        self._thread.join(5)

    def _raise(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the endpoints controller failed: {self.error}")

    def _run(self) -> None:
        with self._cond:
            while not self._halt:
                if not self._due:
                    self._cond.wait()
                    continue
                wait = self._due[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                _due, _seq, removal = heapq.heappop(self._due)
                try:
                    self._ports = [p for p in self._ports if p != removal.port]
                    self.vip.set_endpoints(self._ports)
                except BaseException as exc:  # noqa: BLE001 - surfaced by the next call
                    self.error = exc
                    self._cond.notify_all()
                    return
                removal.removed_at = time.monotonic()
                self._cond.notify_all()
