"""Prometheus metrics, read from the Registrar's state at scrape time (the
core stays free of instrumentation and of prometheus_client)."""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import __version__
from .core import Registrar
from .registration import LATENCY_BUCKETS

#: Propagation buckets (seconds): loopback takes milliseconds, WAN clusters more.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """A registry of its own per Registrar (no process-global state)."""

    def __init__(self, registrar: Registrar):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(registrar))
        # process_cpu_seconds_total, process_resident_memory_bytes, open fds...
        ProcessCollector(registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Collector:
    def __init__(self, registrar: Registrar):
        self.registrar = registrar

    def collect(self) -> Iterator[Metric]:
        r = self.registrar
        build = GaugeMetricFamily("registrar_build_info", "The running registrar's version (1)",
                                  labels=["version"])
        build.add_metric([__version__], 1.0)
        yield build
        status = r.status(observe=False)
        registered = GaugeMetricFamily("registrar_registered",
                                       "1 while the instance is registered on the backend",
                                       labels=["backend"])
        failures = CounterMetricFamily("registrar_heartbeat_failures",
                                       "Heartbeat calls that failed (each try counts)",
                                       labels=["backend"])
        repairs = CounterMetricFamily("registrar_repairs",
                                      "Registrations lost by the registry and re-created",
                                      labels=["backend"])
        for b in status["backends"]:
            registered.add_metric([b["name"]], 1.0 if b["state"] == "registered" else 0.0)
            failures.add_metric([b["name"]], b["heartbeat_failures"])
            repairs.add_metric([b["name"]], b["repairs"])
        yield registered
        yield failures
        yield repairs
        landed = GaugeMetricFamily("registrar_last_heartbeat_timestamp_seconds",
                                   "Unix time of the last registration or heartbeat that the "
                                   "backend accepted (absent before the first)",
                                   labels=["backend"])
        latency = GaugeMetricFamily("registrar_last_heartbeat_duration_seconds",
                                    "How long that registration or heartbeat took",
                                    labels=["backend"])
        for b in status["backends"]:
            if b["last_landed_at"] is not None:
                landed.add_metric([b["name"]], b["last_landed_at"])
                latency.add_metric([b["name"]], b["last_call_seconds"])
        yield landed
        yield latency
        calls = HistogramMetricFamily("registrar_heartbeat_duration_seconds",
                                      "Registrations and heartbeats the backend accepted, by "
                                      "how long they took", labels=["backend"])
        for name, (counts, total) in r.call_latencies().items():
            running, buckets = 0, []
            for le, n in zip((*LATENCY_BUCKETS, "+Inf"), counts, strict=True):
                running += n
                buckets.append((str(le), float(running)))
            calls.add_metric([name], buckets, sum_value=total)
        yield calls
        ready = status["ready"]  # readiness(), as status() read it above
        yield GaugeMetricFamily("registrar_ready", "1 while /readyz answers 200",
                                value=1.0 if ready else 0.0)
        if r.gate is not None:
            yield GaugeMetricFamily("registrar_app_healthy",
                                    "1 while the app passes its health probe (the gate)",
                                    value=1.0 if r.gate.healthy else 0.0)
        yield GaugeMetricFamily("registrar_stopping", "1 once the stop sequence has begun",
                                value=1.0 if r.stopping else 0.0)
        report = r.report
        if report is not None:  # absent until the stop ran (a NaN would break alert rules)
            duration = GaugeMetricFamily("registrar_stop_duration_seconds",
                                         "Duration of the stop, from its trigger to the app's "
                                         "turn; trigger: what began it (preStop, signal, app "
                                         "exit, fatal error, call), ok: whether every step "
                                         "completed", labels=["trigger", "ok"])
            cause = getattr(report.trigger, "cause", None)
            duration.add_metric([cause.value if cause is not None else "call",
                                 "true" if report.ok else "false"],
                                report.total_seconds or report.seconds)
            yield duration
        if report is not None and report.quiescence is not None:
            q = report.quiescence
            yield GaugeMetricFamily("registrar_quiescence_seconds",
                                    "How long the stop waited for consumers to stop sending",
                                    value=q.seconds)
            late = GaugeMetricFamily("registrar_late_requests",
                                     "Requests a consumer sent after every registry had dropped "
                                     "the pod, with no registry after the stop began (the 20 "
                                     "busiest peers)", labels=["peer"])
            for p in q.late[:20]:
                if not p.ignored:
                    late.add_metric([p.peer], float(p.requests))
            yield late
        if r.traffic is not None:  # status() above has just read what closed: no second look
            yield GaugeMetricFamily("registrar_consumers",
                                    "Peers that sent to service.port in the last minute "
                                    "(not counting ignored ones)", value=len(r.traffic.rates()))
        hist = HistogramMetricFamily("registrar_propagation_seconds",
                                     "deregister() to the last observer's confirmation",
                                     labels=["backend"])
        for b in (report.backends if report else []):
            values = [b.propagation_seconds] if b.propagation_seconds is not None else []
            buckets = [(str(le), float(sum(v <= le for v in values))) for le in BUCKETS]
            buckets.append(("+Inf", float(len(values))))
            hist.add_metric([b.name], buckets, sum_value=sum(values))
        yield hist
