"""The ``registrar`` command. Heavy modules are imported inside each
command, so that ``--help`` and the light commands start fast."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from . import __version__
from .errors import ConfigError, RegistrarError


EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_CONFIG
    if args.command != "prestop":  # the hook prints; it need not pay for logging
        from . import logs

        logs.setup(args.log_level, args.log_format)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except RegistrarError as exc:
        import logging

        logging.getLogger(__name__).error("%s", exc)
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
                       description="Register, keep the registration alive, serve the control "
                                   "endpoints, and on SIGTERM or SIGINT deregister and wait for "
                                   "every observer; exit 0 when the removal was confirmed "
                                   "everywhere.")
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("run", parents=[with_config],
                       help="PID-1 wrapper: run the app, register it, deregister before "
                            "signalling it",
                       description="Start the app, register it (once healthy when a health "
                                   "gate is configured), and on SIGTERM/SIGINT or /prestop "
                                   "deregister and wait for every observer before sending the "
                                   "app stop.signal; reap zombies; forward SIGHUP/SIGUSR1/SIGUSR2; "
                                   "exit with the app's status.",
                       usage="registrar run --config FILE [options] -- CMD [ARGS...]")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("prestop", parents=[common],
                       help="preStop hook: ask the running agent to deregister; block until done",
                       description="Call the running agent's /prestop and block until every "
                                   "backend confirmed the removal (exit 0) or the stop sequence "
                                   "ended without that (exit 1). With --config and no agent "
                                   "answering, deregister directly.")
    p.add_argument("--control", default=None,
                   help="the agent's control address, host:port or unix:/path (default: "
                        "$REGISTRAR_CONTROL, else control.listen of --config, else "
                        "127.0.0.1:9901)")
    p.add_argument("--config", "-c", default=os.environ.get("REGISTRAR_CONFIG"),
                   help="agent configuration (default: $REGISTRAR_CONFIG); also the "
                        "fallback when no agent answers")
    p.add_argument("--token-file", default=None,
                   help="bearer token for the control server (default: "
                        "$REGISTRAR_CONTROL_TOKEN_FILE, else control.token_file of --config)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait for the agent (default: the config's grace period, "
                        "else 30)")
    p.set_defaults(func=cmd_prestop)

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
    from .agent import run_agent
    from .core import Registrar

    registrar = Registrar.from_config(args.config)
    _exit_now(run_agent(registrar, registrar.config))


def cmd_run(args: argparse.Namespace) -> int:
    from .core import Registrar
    from .wrapper import Wrapper

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        print("registrar run: give the app's command after --", file=sys.stderr)
        return EXIT_CONFIG
    registrar = Registrar.from_config(args.config)
    _exit_now(Wrapper(registrar, registrar.config, argv).run())


def _exit_now(code: int) -> None:
    """Exit at once once the work is done: interpreter shutdown (daemon
    threads, client libraries' teardown) adds 50-100 ms to every pod's stop,
    and nothing is left to clean up that the kernel does not."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_prestop(args: argparse.Namespace) -> int:
    from . import prestop

    return prestop.main(args)


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
