"""The ``registrar`` command. Heavy modules are imported inside each
command, so that ``--help`` and the light commands start fast."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

from . import __version__
from .errors import ConfigError, RegistrarError

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_CONFIG
    from . import logs

    logs.setup(args.log_level, args.log_format)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except RegistrarError as exc:
        log.error("%s", exc)
        return EXIT_FAILED


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=os.environ.get("REGISTRAR_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"],
                        help="log level (default: $REGISTRAR_LOG_LEVEL or info)")
    common.add_argument("--log-format", default=os.environ.get("REGISTRAR_LOG_FORMAT", "text"),
                        choices=["text", "json"],
                        help="log format (default: $REGISTRAR_LOG_FORMAT or text)")
    with_config = argparse.ArgumentParser(add_help=False, parents=[common])
    with_config.add_argument("--config", "-c", default=os.environ.get("REGISTRAR_CONFIG"),
                             required="REGISTRAR_CONFIG" not in os.environ,
                             help="agent configuration file (default: $REGISTRAR_CONFIG)")

    parser = argparse.ArgumentParser(
        prog="registrar", parents=[common],
        description="Register a pod in service registries and take it out gracefully.")
    parser.add_argument("--version", action="version", version=f"registrar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("agent", parents=[with_config],
                       help="sidecar daemon: register, heartbeat, deregister on SIGTERM",
                       description="Register, keep the registration alive, and on SIGTERM "
                                   "or SIGINT deregister and wait for every observer; exit 0 "
                                   "when the removal was confirmed everywhere.")
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("register", parents=[with_config],
                       help="register once, wait until every observer sees it, exit",
                       description="Register once and wait until every observer sees the "
                                   "instance. No heartbeats follow: the entry lives until its "
                                   "TTL ends (etcd, Consul) or with the session (ZooKeeper). "
                                   "Use `agent` for a registration that lives.")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds to keep trying (default: 30)")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("deregister", parents=[with_config],
                       help="remove the instance and wait until every observer saw it",
                       description="Remove the instance from every backend and wait for "
                                   "propagation; exit 0 when every observer confirmed.")
    p.add_argument("--json", action="store_true", help="print the stop report as JSON")
    p.set_defaults(func=cmd_deregister)

    p = sub.add_parser("status", parents=[with_config],
                       help="what each backend and each observer sees",
                       description="Show what each observer of each backend sees; exit 0 "
                                   "when every observer lists the instance, 1 otherwise.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("schema", parents=[common],
                       help="print the JSON Schema of the configuration file",
                       description="Print the JSON Schema of the configuration file, with "
                                   "a branch for every installed backend.")
    p.set_defaults(func=cmd_schema)
    return parser


def cmd_agent(args: argparse.Namespace) -> int:
    from .clock import Deadline
    from .core import Registrar

    wake = threading.Event()
    fatal: list[RegistrarError] = []
    triggers: list[tuple[str, float]] = []
    registrar = Registrar.from_config(args.config,
                                      on_fatal=lambda exc: (fatal.append(exc), wake.set()))
    clock = registrar.clock

    def on_signal(signum: int, _frame: Any) -> None:
        # Only note it: the stop sequence runs on the main thread below.
        triggers.append((signal.Signals(signum).name, clock.now()))
        wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    registrar.start()
    log.info("agent started for %s (%s)", registrar.instance.id, registrar.instance.hostport)
    wake.wait()
    if triggers:
        trigger, at = triggers[0]
    else:
        trigger, at = f"fatal error: {fatal[0]}", clock.now()
    stop = registrar.stop_config
    report = registrar.stop(trigger, Deadline.after(stop.grace_period - stop.safety_margin,
                                                    clock, start=at))
    return EXIT_OK if report.ok and not fatal else EXIT_FAILED


def cmd_register(args: argparse.Namespace) -> int:
    from .clock import Deadline
    from .core import Registrar

    registrar = Registrar.from_config(args.config)
    deadline = Deadline.after(args.timeout, registrar.clock)
    try:
        registrar.start(wait=True, timeout=args.timeout)
        while True:
            status = registrar.status(observe=True, timeout=max(deadline.remaining(), 0.5))
            if _all_seen(status) or deadline.expired:
                break
            registrar.clock.sleep(0.05)
    finally:
        registrar.detach()
    _print_status(status, as_json=False)
    return EXIT_OK if _all_seen(status) else EXIT_FAILED


def cmd_deregister(args: argparse.Namespace) -> int:
    from .core import Registrar

    report = Registrar.from_config(args.config).stop("deregister command")
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    from .core import Registrar

    registrar = Registrar.from_config(args.config)
    try:
        status = registrar.status(observe=True)
    finally:
        for backend in registrar.backends:
            backend.close()
    _print_status(status, as_json=args.json)
    return EXIT_OK if _all_seen(status) else EXIT_FAILED


def cmd_schema(args: argparse.Namespace) -> int:
    from .config import json_schema

    print(json.dumps(json_schema(), indent=2, sort_keys=True))
    return EXIT_OK


def _all_seen(status: dict[str, Any]) -> bool:
    return all(o.get("sees") is True for b in status["backends"] for o in b["observers"])


def _print_status(status: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(status, indent=2))
        return
    inst = status["instance"]
    print(f"{inst['service']}/{inst['id']} at {inst['address']}:{inst['port']}")
    for b in status["backends"]:
        print(f"  {b['name']}:")
        for o in b["observers"]:
            view = "error: " + o["error"] if "error" in o else ("listed" if o["sees"] else "absent")
            print(f"    {o['name']}: {view}")
