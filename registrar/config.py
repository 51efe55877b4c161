"""Configuration: a YAML file (or a mapping) with ${VAR} interpolation,
validated in full -- every backend section by its own model -- before
anything is registered. Errors are ConfigError with the field's path."""
from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .discovery import available_backends, backend_class
from .instance import segment_error
from .errors import ConfigError
from .fields import (Annotated, Duration, Meta, Model, Rule, StrList, at_least,
                     doc, dump, field, format_duration, more_than, parse, printable, read_token,
                     refuse_credentials, show)
from .plugin import BackendConfig
# with_settings() (the command line's --set over the file) lives with expand() in the
# light source module: `registrar prestop` applies it without importing this one.
from .source import expand, parse_listen, parse_setting, with_settings

__all__ = ["AgentConfig", "ServiceConfig", "HeartbeatConfig", "StopConfig", "ControlConfig",
           "HealthConfig", "load", "expand", "with_settings", "parse_setting", "json_schema",
           "signal_named"]


def _printable(value: Any) -> Any:
    # A newline or a NUL in a name ends up in a registry key or path.
    for text in [value] if isinstance(value, str) else value:
        if not text.isprintable():
            raise ValueError(f"expected printable text, got {show(text)}")
    return value


def _segment(value: Any) -> Any:
    if isinstance(value, str) and (error := segment_error(value)):
        raise ValueError(error)
    return value


def _host(value: str) -> str:
    if not is_host(value):
        raise ValueError(f"expected an IP address or a host name, got {show(value)}")
    return value


_NAME = Meta(min_length=1)


class ServiceConfig(Model, kw_only=True):  # kw_only: port (required) after the optional ones
    name: Annotated[str, _NAME, doc("Service name consumers look up."), Rule(_printable),
                    Rule(_segment)]
    id: Annotated[Annotated[str, _NAME] | None, Rule(_printable), Rule(_segment), doc(
        "Instance id (default: $POD_NAME, else the host name).")] = None
    address: Annotated[Annotated[str, _NAME] | None, Rule(_host), doc(
        "Address to advertise (default: $POD_IP, else the first non-loopback IPv4 "
        "address).")] = None
    port: Annotated[int, Meta(ge=1, le=65535), doc(
        "Port to advertise: where the app listens, which the health gate probes and the stop "
        "watches.")]
    tags: Annotated[StrList, Rule(_printable), doc(
        "Tags: Consul's Tags, and the tags of the etcd value's Metadata and of the ZooKeeper "
        "payload.")] = field(default_factory=list)
    meta: Annotated[dict[str, str], doc(
        "Metadata: Consul's Meta, and the meta of the etcd value's Metadata and of the "
        "ZooKeeper payload.")] = field(default_factory=dict)


_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})"
                       r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?")


def is_host(text: str) -> bool:
    """An IP address (v6 without brackets) or a DNS host name."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return bool(_HOSTNAME.fullmatch(text))


def _interval(value: float) -> float:
    if value < 0.01:  # 0 used to mean "the default" silently
        raise ValueError(f"should be from 10ms to 24h, got {format_duration(value)}")
    return value


class HeartbeatConfig(Model):
    interval: Annotated[Duration | None, Rule(_interval), doc(
        "Heartbeat interval, at least 10ms (default: a third of each backend's ttl).")] = None


def _propagation_timeout(value: float) -> float:
    if value == 0:  # no confirmation could ever come
        raise ValueError("should be more than 0s and at most 24h (leave it out to wait as "
                         "long as the grace period allows), got 0s")
    return value


def _cidrs(value: list[str]) -> list[str]:
    for spec in value:
        try:
            ipaddress.ip_network(spec, strict=False)
        except ValueError:
            raise ValueError(f"expected IP addresses or CIDRs like 10.0.0.0/8, got {show(spec)}") \
                from None
    return value


def _drain_bool(value: Any) -> Any:
    return {True: "all", False: "none"}.get(value, value) if isinstance(value, bool) else value


class StopConfig(Model):
    grace_period: Annotated[Duration, doc("Mirror of terminationGracePeriodSeconds.")] = 30.0
    safety_margin: Annotated[Duration, doc("Kept in hand before the grace period ends.")] = 2.0
    min_wait: Annotated[Duration, doc(
        "Extra wait after propagation is confirmed, for consumers that cannot be asked "
        "(with no backends: after the stop begins).")] = 0.0
    signal: Annotated[str, doc("`run` mode: the signal that stops the app.")] = "SIGTERM"
    app_shutdown: Annotated[Duration, doc(
        "The part of the grace period kept for the app's own shutdown (at most half of "
        "grace_period - safety_margin): the wait for consumers and for busy connections "
        "(and in `run` the registry steps) end this much earlier.")] = 5.0
    drain_connections: Annotated[Literal["busy", "all", "none"] | bool, Rule(_drain_bool), doc(
        "`run` and `agent`: before the app is signalled (`run`) or /prestop returns "
        "(`agent`), wait until no connection on service.port is busy (busy), until there is "
        "none at all (all, or true), or not at all (none, or false). Within the deadline, "
        "less app_shutdown.")] = "busy"
    drain_quiet: Annotated[Duration, doc(
        "How long a connection must have moved no data to count as idle.")] = 0.05
    propagation_timeout: Annotated[Duration | None, Rule(_propagation_timeout), doc(
        "Longest wait for observers (default: all that the grace period leaves after "
        "safety_margin and min_wait).")] = None
    quiesce: Annotated[bool, doc(
        "After the registries have dropped the pod, hold until consumers have stopped "
        "sending to service.port: no new connection and no request from a peer for a window "
        "its rate before the stop justifies (consumers that cache, and a Service's "
        "kube-proxy and ingress, learn of the removal late). With no backends it begins "
        "at the trigger and only new connections hold it: a Service's data path keeps an "
        "established connection on its pod whatever the endpoints say (conntrack), and "
        "only the app's own shutdown moves it. Within the deadline, less app_shutdown.")] = True
    quiet_min: Annotated[Duration, more_than(0), doc(
        "The shortest quiet window, whatever a peer's rate.")] = 0.1
    quiet_max: Annotated[Duration, more_than(0), doc(
        "The longest quiet window: a peer that sent too rarely to be judged within it "
        "(below ln(10^4)/quiet_max requests/s: a scrape, a probe) does not hold the stop; "
        "its late requests are still reported.")] = 10.0
    ignore_peers: Annotated[StrList | None, Rule(_cidrs), doc(
        "Addresses or CIDRs whose traffic is not a consumer's (default: $HOST_IP, the "
        "node, where the kubelet's probes come from, and the pod's default gateway); [] "
        "ignores nothing. registrar's own probes are never counted.")] = None

    def check(self) -> None:
        if self.quiet_min > self.quiet_max:
            raise ValueError(f"quiet_min: {format_duration(self.quiet_min)} is more than "
                             f"quiet_max ({format_duration(self.quiet_max)})")

    # The stop budget, computed here and nowhere else.
    @property
    def budget(self) -> float:
        """Seconds from the first trigger to the process's own deadline."""
        return self.grace_period - self.safety_margin

    @property
    def app_reserve(self) -> float:
        """The part of the budget kept for the app's own shutdown."""
        return min(self.app_shutdown, self.budget / 2)


def _listen(value: str) -> str:
    parse_listen(value, any_port=False)  # 0 would be a port nobody knows
    return value


class ControlConfig(Model):
    """The control server of `agent` and `run`: /healthz, /readyz, /prestop,
    /status, /metrics."""
    listen: Annotated[str | None, Rule(_listen), doc(
        'host:port, "[v6]:port" or "unix:/path.sock"; null turns the server off.')] = \
        "127.0.0.1:9901"
    token_file: Annotated[str | None, doc(
        "File holding the bearer token every endpoint but /healthz and /readyz requires; "
        "required when listen is not a loopback address.")] = None
    metrics_listen: Annotated[str | None, Rule(_listen), doc(
        'host:port (or "unix:/path.sock") serving GET /metrics alone, with no token, for '
        "Prometheus' annotation-based scraping (which sends no credentials); null: /metrics "
        "only on listen.")] = None
    linger: Annotated[Duration, doc(
        "`agent`: after a signal, how long (from the first trigger) it keeps answering "
        "/prestop for other containers' preStop hooks; with a health gate it also answers "
        "while the app still listens on service.port; 0 when no hook calls /prestop.")] = 1.0


def is_loopback(listen: str) -> bool:
    where = parse_listen(listen)
    if isinstance(where, str):
        return True  # a unix socket is only reachable inside the pod
    host = where[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume reachable from outside


def _http(value: str) -> str:
    from urllib.parse import urlsplit

    refuse_credentials(value, "health.http takes no credentials")
    try:
        parts = urlsplit(value)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and \
            value.isprintable() and (parts.port is None or parts.port > 0)
    except ValueError:  # a bad port or IPv6 literal
        ok = False
    if not ok:
        raise ValueError(f"expected a URL like http://127.0.0.1:8080/healthz "
                         f"(port 1..65535), got {show(value)}")
    return value


def _tcp(value: str) -> str:
    if isinstance(parse_listen(value, any_port=False), str):
        raise ValueError(f'expected "host:port" (port 1..65535), got {show(value)}')
    return value


def _exec(argv: list[str]) -> list[str]:
    if not argv[0] or any("\0" in arg for arg in argv):
        raise ValueError(f"expected a command and its arguments (no NUL), got {show(argv)}")
    return argv


class HealthConfig(Model):
    """The app's health gate in `run`, `agent` and the library's start():
    register only once it passes, out of rotation after failure_threshold
    failures in a row, back once it passes. At most one probe. With none
    given, the probe is: service.port accepts a TCP connection, at
    service.address when that address is this pod's own, else at 127.0.0.1
    (it never leaves the pod). Until the app first passes, it probes every
    20ms, backing off to 250ms (or interval, if shorter)."""
    http: Annotated[str | None, Rule(_http), doc("URL that must answer 2xx/3xx.")] = None
    tcp: Annotated[str | None, Rule(_tcp), doc(
        "host:port that must accept a connection (default: service.address:service.port).")] \
        = None
    exec: Annotated[Annotated[list[str], Meta(min_length=1)] | None, Rule(_exec), doc(
        "Command that must exit 0.")] = None
    interval: Annotated[Duration, at_least(0.01), doc("Probe period.")] = 2.0
    timeout: Annotated[Duration, more_than(0), doc("Timeout of one probe.")] = 1.0
    failure_threshold: Annotated[int, Meta(ge=1, le=1000), doc(
        "Failures in a row that take the instance out of rotation.")] = 3

    def check(self) -> None:
        given = [k for k in ("http", "tcp", "exec") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of http, tcp, exec (got {', '.join(given)})")


#: Backends in one file at most: each is a registry the pod is in; a list of
#: thousands is a mistake (3,000 took 6.9 s to reject, one by one).
MAX_BACKENDS = 32


class _FileModel(Model):
    service: ServiceConfig
    backends: Annotated[list[dict[str, Any]], Meta(max_length=MAX_BACKENDS), doc(
        "The registries to register in, one section each (its `type` names the backend). "
        "Empty or absent: no registry, for a pod behind a Kubernetes Service only; the stop "
        "then holds the pod until its consumers have stopped opening connections to it "
        "(stop.quiesce), which replaces `preStop: sleep`.")] = field(default_factory=list)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    stop: StopConfig = field(default_factory=StopConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    health: Annotated[HealthConfig | Literal[False] | None, doc(
        "The gate: register once the app passes its probe (default: service.port accepts a "
        "TCP connection); false registers at once.")] = None


@dataclass(frozen=True)
class AgentConfig:
    """A validated configuration file: ``backends`` pairs each Backend class
    with its validated section."""
    service: ServiceConfig
    backends: tuple[tuple[type, BackendConfig], ...]
    heartbeat: HeartbeatConfig
    stop: StopConfig
    control: ControlConfig
    #: The gate; None when the file says ``health: false``.
    health: HealthConfig | None = None


def effective(config: AgentConfig) -> dict[str, Any]:
    """The configuration as the agent will run it (defaults filled in,
    variables expanded), secrets redacted: what `registrar check` prints."""
    return {"service": dump(config.service),
            "backends": [dump(section) for _, section in config.backends],
            "heartbeat": dump(config.heartbeat), "stop": dump(config.stop),
            "control": dump(config.control),
            "health": False if config.health is None else dump(config.health)}


def load(source: str | os.PathLike | Mapping[str, Any] | None,
         environ: Mapping[str, str] | None = None,
         settings: Sequence[str | tuple[str, Any]] = ()) -> AgentConfig:
    """Read, interpolate and validate a configuration file or mapping, with
    ``settings`` (``KEY=VALUE``, the command line's ``--set``) applied over
    it first (with_settings(); ``source`` may then be None). Raises
    ConfigError only, its text one line."""
    if source is None and not settings:
        raise ConfigError("", "no configuration: give a file, a mapping or settings")
    try:
        return _load(with_settings(source, settings), environ)
    except ConfigError as exc:
        if str(exc).isprintable():
            raise
        raise type(exc)(printable(exc.path), printable(exc.message)) from None


def _load(source: str | os.PathLike | Mapping[str, Any],
          environ: Mapping[str, str] | None = None) -> AgentConfig:
    top = _validate(_FileModel, expand(source, environ), "")
    backends = []
    for i, section in enumerate(top.backends):
        path = f"backends[{i}]"
        type_name = section.get("type")
        if not isinstance(type_name, str) or not type_name:
            raise ConfigError(f"{path}.type", "required: the backend type, e.g. \"etcd\"")
        cls = backend_class(type_name, f"{path}.type")
        backends.append((cls, _validate(cls.config_model, section, path)))
    names = [cfg.name or cfg.type for _, cfg in backends]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(f"backends[{i}].name",
                              f"two backends are named {name!r}; give each a distinct name")
    health = None if top.health is False else (top.health or HealthConfig())
    config = AgentConfig(top.service, tuple(backends), top.heartbeat, top.stop, top.control, health)
    _check_budgets(config)
    _check_control(config.control)
    _check_signal(config.stop)
    return config


def _check_control(control: ControlConfig) -> None:
    if control.token_file is not None:
        read_token(control.token_file, "control.token_file")
    elif control.listen is not None and not is_loopback(control.listen):
        raise ConfigError("control.token_file", f"required when control.listen is not a "
                                                f"loopback address (it is {control.listen})")
    if control.metrics_listen is not None:
        if control.listen is None:
            raise ConfigError("control.metrics_listen", "needs control.listen (null turns the "
                                                        "control server off)")
        if parse_listen(control.metrics_listen) == parse_listen(control.listen):
            raise ConfigError("control.metrics_listen",
                              f"must differ from control.listen ({control.listen})")


def signal_named(name: str):
    """The signal.Signals for "SIGTERM", "term", "Term"...; None if unknown."""
    import signal

    name = name.upper()
    found = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    return found if isinstance(found, signal.Signals) else None


def _check_signal(stop: StopConfig) -> None:
    if signal_named(stop.signal) is None:
        raise ConfigError("stop.signal", f"unknown signal {stop.signal!r} "
                                         "(e.g. SIGTERM, SIGINT, SIGQUIT)")


#: The least stop budget (grace_period - safety_margin) a configuration may
#: leave: below it a deregistration barely has the time for one request.
MIN_BUDGET = 1.0


def _check_budgets(config: AgentConfig) -> None:
    """Combinations each valid alone that would make the stop skip or cut
    the removal."""
    stop = config.stop
    if stop.safety_margin >= stop.grace_period:
        raise ConfigError("stop.safety_margin", f"{format_duration(stop.safety_margin)} leaves "
                          f"nothing of grace_period {format_duration(stop.grace_period)}")
    budget = stop.budget
    if budget < MIN_BUDGET:
        raise ConfigError("stop.safety_margin", f"{format_duration(stop.safety_margin)} leaves "
                          f"{format_duration(budget)} of grace_period "
                          f"{format_duration(stop.grace_period)}; the stop needs at least "
                          f"{format_duration(MIN_BUDGET)}")
    if (stop.propagation_timeout or 0) + stop.min_wait > budget:
        field = "propagation_timeout" if stop.propagation_timeout is not None else "min_wait"
        raise ConfigError(
            f"stop.{field}",
            f"propagation_timeout {format_duration(stop.propagation_timeout or 0)} + min_wait "
            f"{format_duration(stop.min_wait)} exceeds grace_period - safety_margin "
            f"({format_duration(budget)})")
    interval = config.heartbeat.interval
    for i, (cls, section) in enumerate(config.backends):
        field = cls.ttl_field
        ttl = getattr(section, field, None)
        if interval is not None and ttl is not None and interval >= ttl:
            raise ConfigError("heartbeat.interval", f"{format_duration(interval)} is not shorter "
                              f"than backends[{i}].{field} ({format_duration(ttl)}): the "
                              "registration would expire between heartbeats")
    # Every call into a backend holds its lock, and the removal waits for a
    # heartbeat in flight: a request's timeout must leave the removal at
    # least as long again. (`run` keeps app_reserve, at most half the
    # budget, for the app: there a call in flight still ends in time for
    # the removal to be tried.)
    for i, (_cls, section) in enumerate(config.backends):
        timeout = getattr(section, "timeout", None)
        if isinstance(timeout, (int, float)) and 2 * timeout > budget:
            raise ConfigError(
                f"backends[{i}].timeout",
                f"{format_duration(timeout)} is more than half of grace_period - safety_margin "
                f"({format_duration(budget)}): a request in flight when the stop begins could "
                "leave the removal no time")


def _validate(model: type, data: Any, prefix: str) -> Any:
    try:
        return parse(model, data, prefix)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin's check that crashed
        raise ConfigError(prefix, f"internal error in the checks of "
                                  f"{getattr(model, '__name__', model)}: "
                                  f"{type(exc).__name__}: {exc}") from None


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the configuration file, with one branch per
    installed backend."""
    import msgspec.json

    models = [ep.load().config_model for _, ep in sorted(available_backends().items())]
    (top, *branches), defs = msgspec.json.schema_components([_FileModel, *models])
    schema = {**defs[top["$ref"].rsplit("/", 1)[1]], "$defs": defs}
    del defs[top["$ref"].rsplit("/", 1)[1]]
    schema["properties"]["backends"]["items"] = {"oneOf": branches} if branches else {}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "registrar configuration"
    return schema
