"""The pod's stop, once, under one deadline (docs/design.md, "The stop
sequence"). It reads top to bottom:

  1. the registries: drain and deregister every backend, wait until every
     observer has dropped the pod, then ``min_wait`` (stopping.StopSequence);
     with no backend (a pod behind a Kubernetes Service only) nothing but
     ``min_wait``: the endpoints' removal began with the pod's deletion;
  2. the consumers: hold until the traffic on the app's port has stopped
     for the window its rate justifies (traffic.Traffic), counted from the
     end of step 1; with no backend, until no new connection arrives (a
     Service's data path keeps established connections on the pod); not
     when the app has exited (steps 2 and 3 are about serving);
  3. what is in flight: wait until no connection to the app's port is busy
     (connections.Drain; `agent` and `run`);
  4. the report, complete before any caller sees it, and its one line.

What comes next is the mode's: `run` signals the app, `agent` answers
/prestop (and exits on its SIGTERM), the library's stop() returns. The
deadline is the stop budget (grace_period - safety_margin) from the first
trigger; steps 2 and 3 end ``app_shutdown`` before it (the app's own share),
and in `run` step 1 does too."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future

from .clock import Clock, Deadline
from .config import StopConfig
from .connections import Drain
from .instance import Instance
from .registration import Slot
from .stopping import Cause, StopReport, StopSequence, Trigger
from .traffic import Traffic

log = logging.getLogger(__name__)


class PodStop:
    """Runs the stop once; every caller of run() gets the same report."""

    def __init__(self, instance: Instance, slots: list[Slot], config: StopConfig, clock: Clock,
                 traffic: Traffic | None = None):
        self.config = config
        self.clock = clock
        self.traffic = traffic
        #: Step 3, given by `agent` and `run` (stop.drain_connections).
        self.drain: Drain | None = None
        #: Seconds before the deadline that step 1 ends (`run`: the app's share).
        self.registry_reserve = 0.0
        #: `run`: whether the app still runs (steps 2 and 3 end when it exits).
        self.app_running: Callable[[], bool] | None = None
        self.instance = instance
        self._sequence = StopSequence(instance, slots, config, clock) if slots else None
        self._lock = threading.Lock()
        self._future: Future[StopReport] | None = None
        #: The deadline, from the first trigger on.
        self.deadline: Deadline | None = None

    @property
    def report(self) -> StopReport | None:
        """The report once the stop has finished, else None."""
        future = self._future
        if future is not None and future.done() and future.exception() is None:
            return future.result()
        return None

    def begin(self, deadline: Deadline) -> bool:
        """Claim the stop and fix its deadline; False if it was claimed already."""
        with self._lock:
            if self._future is not None:
                return False
            self._future = Future()
            self.deadline = deadline
            return True

    def run(self, trigger: Trigger, began: float) -> StopReport:
        """Steps 1 to 4 (call after begin() returned True)."""
        try:
            report = self._run(trigger, began)
        except BaseException as exc:
            self._future.set_exception(exc)
            raise
        self._future.set_result(report)
        return report

    def result(self) -> StopReport:
        """Wait for the stop another caller runs."""
        return self._future.result()

    def _no_registry(self, trigger: Trigger, deadline: Deadline, serving: bool) -> StopReport:
        """Step 1 with no backend: say what the stop waits for; ``min_wait``
        (0 by default) is then a floor from the trigger on."""
        quiesce = self.traffic is not None and self.config.quiesce and serving
        log.info("stopping after %s: no registry; %s (budget %.1fs)", trigger,
                 f"waiting until consumers stop opening connections to port "
                 f"{self.instance.port}" if quiesce else "not waiting for consumers",
                 deadline.remaining(),
                 extra={"trigger": str(trigger), "seconds": round(deadline.remaining(), 3)})
        waited = 0.0
        if self.config.min_wait and serving:
            waited = deadline.cap(self.config.min_wait)
            self.clock.sleep(waited)
        return StopReport(trigger, True, 0.0, waited, [])

    def _run(self, trigger: Trigger, began: float) -> StopReport:
        deadline = self.deadline
        app_share = deadline.at - self.config.app_reserve
        # With the app gone there is nothing to serve the consumers with:
        # holding the pod would only delay the container's restart.
        serving = trigger.cause is not Cause.APP_EXIT
        # 1. The registries.
        if self._sequence is not None:
            report = self._sequence.run(trigger, Deadline(deadline.at - self.registry_reserve,
                                                          self.clock))
            dropped_at = self.clock.now() - report.min_wait_seconds
        else:
            report = self._no_registry(trigger, deadline, serving)
            dropped_at = began
        # 2. The consumers.
        if self.traffic is not None and self.config.quiesce and serving:
            report.quiescence = self.traffic.quiesce(began, dropped_at, app_share,
                                                     serving=self.app_running,
                                                     opens_only=self._sequence is None)
        if self.traffic is not None:
            self.traffic.close()
        # 3. What is in flight.
        if self.drain is not None and serving:
            service_only = self._sequence is None
            keepers = self.traffic.keepers if self.traffic is not None and service_only else ()
            report.drain = self.drain.wait(until=app_share, in_flight_only=service_only,
                                           skip=frozenset(keepers))
            if report.drain.waited_for and not report.drain.cut:
                log.info("connections: %s", report.drain.summary())
        # 4. The report, and the one line that says what happened.
        report.total_seconds = self.clock.now() - began
        late = report.quiescence.late if report.quiescence is not None else []
        (log.info if report.ok else log.error)("%s", report.summary(), extra={
            "trigger": str(trigger), "seconds": round(report.seconds, 3), "ok": report.ok,
            "total_seconds": round(report.total_seconds, 3),
            "late": [p.__dict__ for p in late[:20]]})
        return report
