"""The ``registrar`` command. Heavy modules are imported inside each
command, so that ``--help`` and the light commands start fast."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

from . import __version__
from .errors import ConfigError, RegistrarError


EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
#: The commands that need a configuration file (prestop only falls back on one).
NEEDS_CONFIG = ("agent", "run", "register", "deregister", "status", "check")
#: The commands that read a configuration, and so take --set.
READS_CONFIG = NEEDS_CONFIG + ("prestop",)


class UsageError(Exception):
    """A command line or an environment variable that does not parse: one
    line on stderr and exit 2."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return EXIT_CONFIG
    try:
        _resolve(args, os.environ)
        if args.command != "prestop":  # the hook prints; it need not pay for logging
            from . import logs

            logs.setup(args.log_level, args.log_format)
            if argv is None:  # the command's own process, not a caller's
                from ._deferred import defer_charset_detection

                defer_charset_detection()
        return args.func(args)
    except UsageError as exc:
        print(f"registrar {args.command}: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as exc:
        print(f"config error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    except RegistrarError as exc:
        import logging

        logging.getLogger(__name__).error("%s", exc)
        return EXIT_FAILED


def _one_line(text: str) -> str:
    from .text import printable

    return printable(text)


def _from_env(env: Mapping[str, str], name: str) -> str | None:
    """A variable's value; an empty (or blank) one counts as unset, like a
    manifest's ``value: ""``."""
    value = env.get(name)
    return value if value and value.strip() else None


def _resolve(args: argparse.Namespace, env: Mapping[str, str]) -> None:
    """Fill in what the command line left out from the REGISTRAR_* variables,
    checking them as strictly as the options they stand for."""
    from .text import show

    for option, name, choices, default in (("log_level", "REGISTRAR_LOG_LEVEL", LOG_LEVELS, "info"),
                                           ("log_format", "REGISTRAR_LOG_FORMAT", LOG_FORMATS,
                                            "text")):
        value = _from_env(env, name)
        if value is not None and value.strip().lower() not in choices:
            # Checked even when the option is given: the variable is wrong either way.
            raise UsageError(f"{name}: expected one of {', '.join(choices)}, got {show(value)}")
        if getattr(args, option, None) is None:
            setattr(args, option, value.strip().lower() if value else default)
    # --set before the command, then after it (the later one of a key wins).
    args.set = (getattr(args, "set", None) or []) + vars(args).pop("set_after", [])
    if args.set and args.command not in READS_CONFIG:
        raise UsageError("--set sets a configuration key: it is for "
                         f"{', '.join(READS_CONFIG)}")
    if getattr(args, "config", None) is None:
        args.config = _from_env(env, "REGISTRAR_CONFIG")
    if args.command in NEEDS_CONFIG and args.config is None and not args.set:
        raise UsageError("give the configuration file with --config FILE (or set "
                         "REGISTRAR_CONFIG)")
    if args.command not in READS_CONFIG:
        del args.set
        return
    # What the command reads: the file's path as given, or with --set, the
    # file's content with the settings applied (before interpolation and
    # validation, so that errors name the key as they do for the file).
    from .source import with_settings

    args.source = with_settings(args.config, args.set)
    if args.command in ("prestop", "status"):
        _resolve_control(args, env)


def _resolve_control(args: argparse.Namespace, env: Mapping[str, str]) -> None:
    """`prestop`: the control address from --control, $REGISTRAR_CONTROL,
    the config's control.listen or the default, checked here so that a bad
    one is one line naming where it came from."""
    from .prestop import DEFAULT_CONTROL, control_address

    if args.control is not None:
        where, value = "--control", args.control
    elif _from_env(env, "REGISTRAR_CONTROL") is not None:
        where, value = "REGISTRAR_CONTROL", _from_env(env, "REGISTRAR_CONTROL")
    else:
        where, value = "control.listen", _config_control(args.source)
    if value is None:
        where, value = "default", DEFAULT_CONTROL
    try:
        args.control = control_address(value)
    except ValueError as exc:
        if where == "control.listen":
            raise ConfigError(where, str(exc)) from None
        raise UsageError(f"{where}: {exc}") from None


def _config_control(source: Any) -> Any:
    """control.listen of the configuration (a path, or a mapping: the file
    with --set over it), after checking the shape of what `prestop` reads
    from it (control.token_file, stop.grace_period)."""
    if source is None:
        return None
    from .source import expand
    from .text import show

    doc = expand(source)
    for section in ("control", "stop"):
        if not isinstance(doc.get(section) or {}, Mapping):
            raise ConfigError(section, f"expected a mapping, got {show(doc[section])}")
    control = doc.get("control") or {}
    token_file = control.get("token_file")
    if token_file is not None and (not isinstance(token_file, str) or not token_file.isprintable()):
        raise ConfigError("control.token_file", f"expected a file name, got {show(token_file)}")
    return control.get("listen")


def _seconds(text: str) -> float:
    """A --timeout: a duration as the config writes them (``5s``, ``500ms``)
    or a number of seconds, more than 0 and at most a day."""
    from .fields import parse_duration

    try:
        value = parse_duration(float(text) if _NUMBER.fullmatch(text) else text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 86400:  # also NaN
        raise argparse.ArgumentTypeError(f'expected a duration like "5s" or seconds, more than '
                                         f'0 and at most 24h, got {text!r}')
    return value


_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (argparse prints the usage first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_CONFIG, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _setting(text: str) -> tuple[str, Any]:
    from .source import parse_setting

    try:
        return parse_setting(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


SET_HELP = ("set a configuration key over the file: a dotted path and a YAML scalar, e.g. "
            "stop.grace_period=30s, control.listen=${POD_IP}:9901, backends[0].ttl=10s; "
            "repeatable, the last of a key wins; errors name the key as in the file. With "
            "--set, --config may be left out when the settings say everything needed")


def _set_option(parser: argparse.ArgumentParser, top: bool) -> None:
    """--set, on the top-level parser and after the command: two lists (a
    command's own parser would replace the first), joined by _resolve()."""
    parser.add_argument("--set", dest="set" if top else "set_after", action="append",
                        type=_setting, metavar="KEY=VALUE",
                        default=None if top else argparse.SUPPRESS, help=SET_HELP)


def _global_options(parser: argparse.ArgumentParser, default: Any,
                    config_help: str | None = None) -> None:
    """The options every command takes, before or after its name: on the
    top-level parser with real defaults (None: resolved later), on each
    command's with SUPPRESS, so that an option not repeated after the
    command keeps what was given before it. --config and --set only where
    a configuration is read (``config_help``)."""
    parser.add_argument("--log-level", default=default, type=str.lower, choices=LOG_LEVELS,
                        help="log level (default: $REGISTRAR_LOG_LEVEL, else info)")
    parser.add_argument("--log-format", default=default, type=str.lower, choices=LOG_FORMATS,
                        help="log format (default: $REGISTRAR_LOG_FORMAT, else text)")
    if config_help is not None:
        parser.add_argument("--config", "-c", default=default, metavar="FILE", help=config_help)
        _set_option(parser, top=default is not argparse.SUPPRESS)


def _parser() -> argparse.ArgumentParser:
    config_help = "agent configuration file (default: $REGISTRAR_CONFIG)"
    common = _Parser(add_help=False)
    _global_options(common, argparse.SUPPRESS)
    with_config = _Parser(add_help=False)
    _global_options(with_config, argparse.SUPPRESS, config_help)

    parser = _Parser(
        prog="registrar",
        description="Register a pod in service registries and take it out gracefully.",
        epilog="--log-level, --log-format, --config and --set may come before or after the "
               "command.")
    _global_options(parser, None, config_help)
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
                   help="the agent's control address, host:port, http://host:port or "
                        "unix:/path.sock (default: $REGISTRAR_CONTROL, else control.listen of "
                        "--config, else 127.0.0.1:9901)")
    p.add_argument("--config", "-c", default=argparse.SUPPRESS, metavar="FILE",
                   help="agent configuration (default: $REGISTRAR_CONFIG); also the "
                        "fallback when no agent answers")
    _set_option(p, top=False)
    p.add_argument("--token-file", default=None,
                   help="bearer token for the control server (default: "
                        "$REGISTRAR_CONTROL_TOKEN_FILE, else control.token_file of --config)")
    p.add_argument("--timeout", type=_seconds, default=None,
                   help="seconds to wait for the agent (default: the config's grace period, "
                        "else 30)")
    p.set_defaults(func=cmd_prestop)

    p = sub.add_parser("register", parents=[with_config],
                       help="register once, wait until every observer sees it, exit",
                       description="Register once and wait until every observer sees the "
                                   "instance. No heartbeats follow: the entry lives until its "
                                   "TTL ends (etcd, Consul) or with the session (ZooKeeper). "
                                   "Use `agent` for a registration that lives.")
    p.add_argument("--timeout", type=_seconds, default=30.0,
                   help="seconds to keep trying (default: 30)")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("deregister", parents=[with_config],
                       help="remove the instance and wait until every observer saw it",
                       description="Remove the instance from every backend and wait for "
                                   "propagation; exit 0 when every observer confirmed.")
    p.add_argument("--json", action="store_true", help="print the stop report as JSON")
    p.set_defaults(func=cmd_deregister)

    p = sub.add_parser("status", parents=[with_config],
                       help="what the running agent reports, or each registry's view",
                       description="Ask the running agent (at control.listen of the config, "
                                   "as prestop does) for its state and what each observer of "
                                   "each backend sees; when no agent answers, read the "
                                   "registries directly for the instance the config names. "
                                   "Exit 0 when every observer lists the instance, 1 "
                                   "otherwise.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--control", default=None,
                   help="the agent's control address (default: $REGISTRAR_CONTROL, else "
                        "control.listen of --config, else 127.0.0.1:9901)")
    p.add_argument("--token-file", default=None,
                   help="bearer token for the control server (default: "
                        "$REGISTRAR_CONTROL_TOKEN_FILE, else control.token_file of --config)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("check", parents=[with_config],
                       help="validate the configuration and the environment; contact nothing",
                       description="Read and validate the configuration (with its ${VAR} "
                                   "references, the secrets it names and the REGISTRAR_* "
                                   "variables) as `agent` and `run` would, without contacting "
                                   "any registry: exit 0 and one line when valid, exit 2 and "
                                   "one line naming the field otherwise.")
    p.add_argument("--offline", action="store_true",
                   help="do not read the secret files it names (CI, where the Secrets are "
                        "not mounted): everything else is checked")
    p.add_argument("--effective", action="store_true",
                   help="also print the effective configuration (defaults filled in, "
                        "variables expanded, secrets redacted) as YAML on standard output")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("inject", parents=[common],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="wire registrar into Kubernetes YAML annotated "
                            "registrar.io/inject: \"true\"",
                       description=INJECT_HELP,
                       usage="registrar inject [FILE...|-] [--uninject] [--image IMG] [-o FILE]")
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="Kubernetes YAML, one or more documents each (default, or -: standard "
                        "input); read as one stream, so a ConfigMap in one file is found for a "
                        "Deployment in another")
    p.add_argument("--uninject", action="store_true",
                   help="take out what inject added, from the record it left in the pod "
                        "(registrar.io/uninject): the input comes back as it was")
    p.add_argument("--image", default=None, metavar="IMG",
                   help="the agent's image (default: registry.example/registrar:"
                        f"{__version__}; a pod's registrar.io/image wins)")
    p.add_argument("-o", "--output", default=None, metavar="FILE",
                   help="write to FILE instead of standard output (only when every object "
                        "could be injected)")
    p.set_defaults(func=cmd_inject)

    p = sub.add_parser("schema", parents=[common],
                       help="print the JSON Schema of the configuration file",
                       description="Print the JSON Schema of the configuration file, with "
                                   "a branch for every installed backend.")
    p.set_defaults(func=cmd_schema)

    from .webhook import add_parser as add_webhook  # light: the server is imported when run
    add_webhook(sub, [common])
    return parser


def cmd_agent(args: argparse.Namespace) -> int:
    from .agent import run_agent
    from .core import Registrar

    registrar = Registrar.from_config(args.source)
    _exit_now(run_agent(registrar, registrar.config))


def cmd_run(args: argparse.Namespace) -> int:
    from .core import Registrar
    from .wrapper import Wrapper

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        print("registrar run: give the app's command after --", file=sys.stderr)
        return EXIT_CONFIG
    registrar = Registrar.from_config(args.source)
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
    import logging

    from .clock import Deadline
    from .core import Registrar
    from .errors import RegistryUnavailable

    registrar = Registrar.from_config(args.source)
    _needs_backends(registrar, "register")
    deadline = Deadline.after(args.timeout, registrar.clock)
    # The registries first: with the health gate the app comes first, and a
    # wrong endpoint would hide behind "waiting for the app" until the timeout.
    unreachable = _unreachable(registrar.status(observe=True, timeout=min(args.timeout, 5.0)))
    if unreachable:
        registrar.detach()
        raise RegistryUnavailable("cannot reach " + "; ".join(unreachable))
    if registrar.gate is None and getattr(registrar.config, "health", None) is not None:
        logging.getLogger(__name__).info("registering once the app passes its health probe "
                                         "(health: false registers at once)")
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

    registrar = Registrar.from_config(args.source)
    _needs_backends(registrar, "deregister")
    report = registrar.stop("deregister command")
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return EXIT_OK if report.ok else EXIT_FAILED


#: How long `status` waits for the agent's /status (it asks every observer,
#: each bounded by 2 s).
STATUS_TIMEOUT = 5.0


def cmd_status(args: argparse.Namespace) -> int:
    status, trouble = _agent_status(args)
    if status is not None:
        status["source"] = {"agent": args.control}
    else:
        from .core import Registrar

        registrar = Registrar.from_config(args.source)
        try:
            status = registrar.status(observe=True)
        finally:
            for backend in registrar.backends:
                backend.close()
        status["source"] = {"registries": True, "agent": args.control, "agent_error": trouble}
    _print_status(status, as_json=args.json)
    return EXIT_OK if _all_seen(status) else EXIT_FAILED


def _agent_status(args: argparse.Namespace) -> tuple[dict[str, Any] | None, str]:
    """The running agent's /status, or None and why not."""
    import socket

    from . import prestop

    token_file = args.token_file or _from_env(os.environ, "REGISTRAR_CONTROL_TOKEN_FILE")
    if token_file is None:
        from .source import expand

        token_file = (expand(args.source).get("control") or {}).get("token_file")
    try:
        token = prestop.read_control_token(token_file) if token_file else None
    except ValueError as exc:
        return None, str(exc)
    try:
        code, body = prestop.call(args.control, "/status", token, STATUS_TIMEOUT, method="GET")
    except TimeoutError:
        return None, f"no answer within {STATUS_TIMEOUT:g}s"
    except (OSError, socket.gaierror) as exc:
        return None, exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
    if code == 401:
        return None, "it refused the token (401)"
    if code != 200 or not isinstance(body.get("backends"), list):
        return None, f"HTTP {code}: {body.get('error', '')}".rstrip(": ")
    return body, ""


def cmd_check(args: argparse.Namespace) -> int:
    import contextlib

    from .core import Registrar
    from .fields import secrets_unread

    with secrets_unread() if args.offline else contextlib.nullcontext():
        registrar = Registrar.from_config(args.source)  # builds the backends; connects nowhere
    for backend in registrar.backends:
        backend.close()
    inst = registrar.instance
    # The verdict on stderr (as every error is), the effective configuration
    # (YAML, on request) on stdout.
    where = "standard input" if args.config == "-" else args.config
    if args.set:
        where = f"{where} and --set" if where else "--set"
    on = (f"on {', '.join(b.name for b in registrar.backends)}" if registrar.backends
          else "with no registry (the stop waits for consumers only)")
    unread = " (secret files not read: --offline)" if args.offline else ""
    print(f"{where}: valid: {inst.service}/{inst.id} at {inst.hostport} {on}{unread}",
          file=sys.stderr)
    if args.effective:
        import yaml

        from .config import effective

        doc = effective(registrar.config)
        doc["service"].update(id=inst.id, address=inst.address)  # $POD_NAME, $POD_IP, or found
        print(yaml.safe_dump(doc, sort_keys=False), end="")
    return EXIT_OK


INJECT_HELP = """\
Read Kubernetes YAML and write it back with registrar wired into every pod
template (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, Pod,
and the items of a List) annotated registrar.io/inject: "true" (or
"required"). Other objects pass through unchanged; the order is kept. PyYAML
keeps no comments: the output has none (keep the annotated input, with its
comments, and generate the rest). A pod already injected is left as it is.

Annotations on the pod template (docs/kubernetes.md has the details):
  registrar.io/inject     "true" or "required"
  registrar.io/config     the ConfigMap whose agent.yaml holds service and
                          backends, mounted at /etc/registrar/agent.yaml;
                          without it: no registry, a pod behind a Service
  registrar.io/mode       native-sidecar (default), sidecar or wrapper
  registrar.io/container  the serving container (then, comma-separated,
                          others held until the pod is out), when several
  registrar.io/port       service.port (a number or a port name), when the
                          serving container has several ports
  registrar.io/hook       exec (default in sidecar and wrapper: the image has
                          registrar) or httpGet (default in native-sidecar)
  registrar.io/image      the agent's image (default: --image)
  registrar.io/token      the control token (drawn at random when absent)

Derived, on the agent's command line (--set): stop.grace_period =
terminationGracePeriodSeconds, control.listen ${POD_IP}:9901,
control.metrics_listen ${POD_IP}:9902, control.token_file (the token
annotation, mounted), service.port when agent.yaml has none. A ConfigMap in
the input is checked with them; a value there that disagrees is refused.
The token is readable by whoever can read the pod.

Exit 0 (warnings on standard error, one line each); 2 and one line naming
the object when one cannot be injected, and nothing is written."""


def cmd_inject(args: argparse.Namespace) -> int:
    from .inject import InjectError, Options, dump_documents, inject_documents, load_documents

    docs: list[Any] = []
    try:
        for name in args.files or ["-"]:
            docs += load_documents(_read_input(name), "standard input" if name == "-" else name)
        options = Options(image=args.image) if args.image else Options()
        docs, warnings = inject_documents(docs, options, uninject=args.uninject)
    except InjectError as exc:
        raise UsageError(str(exc)) from None
    text = dump_documents(docs) if docs else ""
    for warning in warnings:
        print(f"registrar inject: warning: {_one_line(warning)}", file=sys.stderr)
    if args.output is None:
        sys.stdout.write(text)
        return EXIT_OK
    partial = f"{args.output}.{os.getpid()}.tmp"
    try:
        with open(partial, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(partial, args.output)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise UsageError(f"cannot write {args.output}: {exc.strerror}") from None
    return EXIT_OK


def _read_input(name: str) -> str:
    if name == "-":
        if not _STDIN_READ:
            _STDIN_READ.append(sys.stdin.read())
        return _STDIN_READ[0]
    try:
        with open(name, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{name}: not UTF-8 text (byte {exc.start})") from None


_STDIN_READ: list[str] = []


def cmd_schema(args: argparse.Namespace) -> int:
    from .config import json_schema

    print(json.dumps(json_schema(), indent=2, sort_keys=True))
    return EXIT_OK


def _needs_backends(registrar: Any, verb: str) -> None:
    if not registrar.backends:
        raise ConfigError("backends", f"none given: nothing to {verb} (a config without "
                                      f"backends is for `run`, `agent` and the library)")


def _unreachable(status: dict[str, Any]) -> list[str]:
    """The backends none of whose observers answered, with the first error."""
    return [f"{b['name']}: {b['observers'][0]['error']}" for b in status["backends"]
            if b["observers"] and all("error" in o for o in b["observers"])]


def _all_seen(status: dict[str, Any]) -> bool:
    return all(o.get("sees") is True for b in status["backends"] for o in b["observers"])


def _print_status(status: dict[str, Any], as_json: bool) -> None:
    """One line for the instance and where the answer came from, one per
    backend: its state and how many observers list the instance, then each
    observer that does not."""
    if as_json:
        print(json.dumps(status, indent=2))
        return
    inst = status["instance"]
    source = status.get("source") or {}
    head = f"{inst['service']}/{inst['id']} at {inst['address']}:{inst['port']}"
    if source.get("registries"):
        # This process's own state says nothing: only the registries' views count.
        where = f" (no agent at {source['agent']}" if source.get("agent") else " (no agent"
        print(f"{head}: as the registries list it{where}: {source.get('agent_error') or '?'})")
    else:
        agent = f" (the agent at {source['agent']})" if source.get("agent") else ""
        state = status.get("state", "?")
        if status.get("ready") is False and state not in ("stopping", "stopped"):
            state += f", not ready: {status.get('reason')}"  # what /readyz says
        print(f"{head}: {state}{agent}")
    if not status["backends"]:
        print("  no registry: nothing to look up")
    for b in status["backends"]:
        observers = b.get("observers") or []
        listing = sum(o.get("sees") is True for o in observers)
        state = "" if source.get("registries") else f"{b.get('state', '?')}, "
        extra = ""
        if not source.get("registries"):
            if b.get("heartbeat_failures"):
                extra += f", {b['heartbeat_failures']} failed heartbeat(s)"
            if b.get("last_error"):
                extra += f", last error: {b['last_error']}"
        print(f"  {b['name']}: {state}listed by {listing}/{len(observers)} observers{extra}")
        for o in observers:
            if o.get("sees") is not True:
                print(f"    {o['name']}: " + ("error: " + o["error"] if "error" in o
                                              else "does not list it"))
