"""`registrar prestop`: the preStop exec hook.

Asks the running agent's /prestop to run (or join) the stop sequence and
blocks until it is done. The standard library only: the hook must start in
a blink, so no registry client, no requests, no pydantic, no APScheduler
(unless it must fall back to deregistering by itself).

An agent that already stopped and went answers through the report it left
next to its unix socket. Exit 0: the stop was confirmed everywhere (now or
before we came); 1: it was not, or no agent answered (one line says which);
2: an address or option that does not parse.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import sys
import time
from typing import Any

from .errors import ConfigError
from .source import parse_listen

DEFAULT_CONTROL = "127.0.0.1:9901"
DEFAULT_TIMEOUT = 30.0
CONNECT_TIMEOUT = 2.0


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def control_address(text: Any) -> str:
    """``http://host:port[/]``, ``host:port``, ``[v6]:port`` or
    ``unix:/path`` -> the address as parse_listen() takes it; ValueError
    with a one-line reason otherwise (the port is 1..65535)."""
    address = text.strip() if isinstance(text, str) else text
    if isinstance(address, str) and address.startswith("http://"):
        address = address[len("http://"):].rstrip("/")
    try:
        parse_listen(address, any_port=False)
    except ValueError:
        raise ValueError(f"expected host:port, http://host:port or unix:/path, "
                         f"got {text!r}") from None
    return address


def report_file(socket_path: str) -> str:
    """Where an agent listening on a unix socket leaves its stop report
    (next to the socket: a directory the hook's container shares) for a
    hook that comes after it has gone."""
    return socket_path + ".report.json"


def handed_over(control: str) -> dict[str, Any] | None:
    """The report the agent at ``control`` left when it stopped (unix
    sockets only), or None."""
    where = parse_listen(control)
    if not isinstance(where, str):
        return None
    from .files import read_regular

    try:
        doc = json.loads(read_regular(report_file(where), 1 << 20))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("summary"), str) \
            or not isinstance(doc.get("finished_at"), (int, float)):
        return None
    return doc


def _connection(control: str, timeout: float) -> http.client.HTTPConnection:
    where = parse_listen(control)
    if isinstance(where, str):
        return _UnixConnection(where, timeout)
    return http.client.HTTPConnection(*where, timeout=timeout)


def call(control: str, path: str, token: str | None, timeout: float,
         method: str = "POST") -> tuple[int, dict[str, Any]]:
    """One request to the control server; (status, JSON body). Raises
    OSError when nothing answers."""
    conn = _connection(control, timeout)
    try:
        conn.timeout = CONNECT_TIMEOUT  # a dead address must not eat the budget
        conn.connect()
        conn.sock.settimeout(timeout)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(body or b"{}")
    except ValueError:
        return resp.status, {"error": body[:200].decode(errors="replace")}


def read_control_token(path: str) -> str:
    """The control server's bearer token from its file (a small regular
    file); ValueError with a one-line reason otherwise."""
    from .files import SECRET_BYTES, read_regular

    try:
        return read_regular(path, SECRET_BYTES).decode(errors="replace").strip()
    except (OSError, ValueError) as exc:  # also not a regular file, too large
        reason = exc.strerror if isinstance(exc, OSError) else exc
        raise ValueError(f"cannot read the token file {path}: {reason}") from None


def main(args: argparse.Namespace) -> int:
    control = args.control or os.environ.get("REGISTRAR_CONTROL")
    token_file = args.token_file or os.environ.get("REGISTRAR_CONTROL_TOKEN_FILE")
    timeout = args.timeout
    # The configuration file, or with --set, the file with the settings over it.
    source = getattr(args, "source", args.config)
    doc: dict[str, Any] = {}
    if source is not None:
        from .source import expand

        doc = expand(source)
        section = doc.get("control") or {}
        control = control or section.get("listen")
        token_file = token_file or section.get("token_file")
        if timeout is None:
            timeout = _grace_period(doc)
    try:
        control = control_address(control or DEFAULT_CONTROL)
    except ValueError as exc:
        print(f"registrar prestop: --control: {exc}", file=sys.stderr)
        return 2
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    try:
        token = read_control_token(token_file) if token_file else None
    except ValueError as exc:
        print(f"registrar prestop: {exc}", file=sys.stderr)
        return 1
    try:
        status, body = call(control, "/prestop", token, timeout)
    except (ConnectionError, FileNotFoundError, socket.gaierror) as exc:
        reason = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
        report = handed_over(control)
        if report is not None:  # the agent stopped before we came: its report
            age = max(time.time() - report["finished_at"], 0)
            print(f"registrar prestop: the agent at {control} had already stopped "
                  f"({age:.1f}s ago): {report['summary']}")
            return 0 if report.get("ok") is True else 1
        # The fallback needs an instance to remove: a file, or --set naming the service.
        if args.config or "service" in doc:
            where = f"{args.config} and --set" if args.config and getattr(args, "set", None) \
                else args.config or "--set"
            print(f"registrar prestop: no agent at {control} ({reason}): running the stop "
                  f"of {where} here", file=sys.stderr)
            return _deregister_directly(source)
        print(f"registrar prestop: no agent answered at {control}: {reason}")
        return 1
    except TimeoutError:
        print(f"registrar prestop: the agent at {control} did not answer within {timeout:g}s")
        return 1
    except OSError as exc:
        print(f"registrar prestop: {control}: {exc.strerror or exc}")
        return 1
    if status == 401:
        print(f"registrar prestop: the agent at {control} refused the token (401)")
        return 1
    summary = body.get("summary") or body.get("error") or f"HTTP {status}"
    print(summary)
    return 0 if status == 200 and body.get("ok") else 1


#: "30s", the grace period `registrar inject` gives the hook: read here
#: without importing registrar.fields (msgspec, ~20 ms of the hook's start).
_SECONDS = re.compile(r"([0-9]{1,5})s")


def _grace_period(doc: dict[str, Any]) -> float | None:
    value = (doc.get("stop") or {}).get("grace_period")
    if value is None:
        return None
    if isinstance(value, str) and (m := _SECONDS.fullmatch(value)) and int(m[1]) <= 86400:
        return int(m[1]) + 5  # the agent's own deadline comes first
    from .fields import parse_duration  # only when the file sets one

    try:
        return parse_duration(value) + 5  # the agent's own deadline comes first
    except Exception:  # noqa: BLE001 - a bad value is the agent's to report
        return None


def _deregister_directly(config_path: Any) -> int:
    from . import logs
    from .core import Registrar
    from .stopping import Trigger

    logs.setup("warning")
    try:
        report = Registrar.from_config(config_path).stop(Trigger.prestop("direct"))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.ok else 1
