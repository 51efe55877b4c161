"""`registrar agent`: the sidecar daemon. Registers once the app passes its
health gate (by default: the app's port accepts connections), heartbeats,
serves the control endpoints; /prestop returns once the pod is out of every
registry and the app's busy connections are done, so the kubelet's SIGTERM
reaches an app with nothing in flight. Exits on SIGTERM or SIGINT."""
from __future__ import annotations

import logging

from .config import AgentConfig
from .core import Registrar
from .lifecycle import Lifecycle, exit_line, make_drain, serve_control, serve_late_hooks
from .signals import STOP_SIGNALS, SignalPipe
from .stopping import Trigger

log = logging.getLogger(__name__)


def run_agent(registrar: Registrar, config: AgentConfig) -> int:
    """Sidecar: register, heartbeat, serve /prestop; exit on SIGTERM/SIGINT
    (0 when the removal was confirmed everywhere). After a /prestop the
    agent stays up, out of every registry, until its own SIGTERM; after
    that, until every /prestop that may still come is answered
    (lifecycle.serve_late_hooks)."""
    pipe = SignalPipe().catch(STOP_SIGNALS)
    life = Lifecycle(registrar, pipe, drain=make_drain(registrar, config))
    fatal: list[Exception] = []
    registrar.on_fatal = lambda exc: (fatal.append(exc), pipe.wake())
    server = serve_control(registrar, config, life, ready=registrar.readiness)
    registrar.start()  # registers once the app passes the health gate
    log.info("agent started for %s (%s)", registrar.instance.id, registrar.instance.hostport)
    # A /prestop runs the sequence without ending the agent: it exits on a
    # signal (the kubelet's SIGTERM follows the hook) or a fatal error.
    signals: list[int] = []
    while not (signals or fatal):
        signals = pipe.wait()
    if signals:
        report = life.stop(Trigger.signal(signals[0]))
    else:
        report = life.stop(Trigger.fatal(fatal[0]))
    if server is not None:
        server.hand_over(report)
        if signals:
            # A regular sidecar gets its SIGTERM as the app's preStop hook
            # starts calling it: stay until no hook can still come.
            serve_late_hooks(server, life, config.control.linger,
                             registrar.instance.port if registrar.gate is not None else None)
        server.close(grace=min(0.5, max(life.deadline.remaining(), 0)))
    pipe.close()
    code = 0 if report.ok and not fatal else 1
    exit_line(code, report, life, fatal=fatal[0] if fatal else None)
    return code
