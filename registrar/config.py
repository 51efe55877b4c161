"""Configuration: a YAML file (or a mapping) with ${VAR} interpolation,
validated in full -- every backend section by its own model -- before
anything is registered. Errors are ConfigError with the field's path."""
from __future__ import annotations

import difflib
import ipaddress
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .discovery import available_backends, backend_class
from .errors import ConfigError
from .fields import (MAX_DURATION, Duration, Integer, Model, StrList, format_duration,
                     parse_duration, printable, read_token, show)
from .plugin import BackendConfig
from .source import _join, expand, parse_listen

__all__ = ["AgentConfig", "ServiceConfig", "HeartbeatConfig", "StopConfig", "ControlConfig",
           "HealthConfig", "load", "expand", "json_schema", "signal_named"]

class ServiceConfig(Model):
    name: str = Field(min_length=1, description="Service name consumers look up.")
    id: str | None = Field(None, min_length=1,
                           description="Instance id (default: $POD_NAME, else the host name).")
    address: str | None = Field(None, min_length=1,
                                description="Address to advertise (default: $POD_IP, else the "
                                            "first non-loopback IPv4 address).")
    port: Integer = Field(ge=1, le=65535)
    tags: StrList = Field(default_factory=list)
    meta: dict[str, str] = Field(default_factory=dict)

    @field_validator("name", "id", "tags")
    @classmethod
    def _printable(cls, value: str | list[str] | None) -> str | list[str] | None:
        # A newline or a NUL in a name ends up in a registry key or path.
        for text in [value] if isinstance(value, str) else value or ():
            if not text.isprintable():
                raise ValueError(f"expected printable text, got {show(text)}")
        return value

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and not is_host(value):
            raise ValueError(f"expected an IP address or a host name, got {show(value)}")
        return value


_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})"
                       r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?")


def is_host(text: str) -> bool:
    """An IP address (v6 without brackets) or a DNS host name."""
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return bool(_HOSTNAME.fullmatch(text))


class HeartbeatConfig(Model):
    interval: Duration | None = Field(
        None, description="Heartbeat interval, at least 10ms (default: a third of each "
                          "backend's ttl).")

    @field_validator("interval")
    @classmethod
    def _interval(cls, value: float | None) -> float | None:
        if value is not None and value < 0.01:  # 0 used to mean "the default" silently
            raise ValueError(f"should be from 10ms to 24h, got {format_duration(value)}")
        return value


class StopConfig(Model):
    grace_period: Duration = Field(30.0, description="Mirror of terminationGracePeriodSeconds.")
    safety_margin: Duration = Field(2.0, description="Kept in hand before the grace period ends.")
    min_wait: Duration = Field(0.0, description="Extra wait after propagation is confirmed, "
                                                "for consumers that cannot be asked.")
    signal: str = Field("SIGTERM", description="`run` mode: the signal that stops the app.")
    app_shutdown: Duration = Field(
        5.0, description="The part of the grace period kept for the app's own shutdown (at "
                         "most half of grace_period - safety_margin): the wait for busy "
                         "connections (and in `run` the registry steps) end this much earlier.")
    drain_connections: Literal["busy", "all", "none"] = Field(
        "busy", description="`run` and `agent`: before the app is signalled (`run`) or /prestop "
                            "returns (`agent`), wait until no connection on service.port is "
                            "busy (busy), until there is none at all (all, or true), or not at "
                            "all (none, or false). Within the deadline, less app_shutdown.")
    drain_quiet: Duration = Field(
        0.05, description="How long a connection must have moved no data to count as idle.")
    propagation_timeout: Duration | None = Field(
        None, description="Longest wait for observers (default: all that the grace period "
                          "leaves after safety_margin and min_wait).")

    # The stop budget, computed here and nowhere else.
    @property
    def budget(self) -> float:
        """Seconds from the first trigger to the process's own deadline."""
        return self.grace_period - self.safety_margin

    @property
    def app_reserve(self) -> float:
        """The part of the budget kept for the app's own shutdown."""
        return min(self.app_shutdown, self.budget / 2)

    @field_validator("propagation_timeout")
    @classmethod
    def _propagation_timeout(cls, value: float | None) -> float | None:
        if value == 0:  # no confirmation could ever come
            raise ValueError("should be more than 0s and at most 24h (leave it out to wait as "
                             "long as the grace period allows), got 0s")
        return value

    @field_validator("drain_connections", mode="before")
    @classmethod
    def _drain_bool(cls, value: Any) -> Any:
        return {True: "all", False: "none"}.get(value, value) if isinstance(value, bool) else value


class ControlConfig(Model):
    """The control server of `agent` and `run`: /healthz, /readyz, /prestop,
    /status, /metrics."""
    listen: str | None = Field(
        "127.0.0.1:9901", description='host:port, "[v6]:port" or "unix:/path.sock"; null '
                                      "turns the server off.")
    token_file: str | None = Field(
        None, description="File holding the bearer token every endpoint but /healthz and "
                          "/readyz requires; required when listen is not a loopback address.")
    metrics_listen: str | None = Field(
        None, description='host:port (or "unix:/path.sock") serving GET /metrics alone, '
                          "with no token, for Prometheus' annotation-based scraping (which "
                          "sends no credentials); null: /metrics only on listen.")
    linger: Duration = Field(
        1.0, description="`agent`: after a signal, how long (from the first trigger) it keeps "
                         "answering /prestop for other containers' preStop hooks; with a "
                         "health gate it also answers while the app still listens on "
                         "service.port; 0 when no hook calls /prestop.")

    @field_validator("listen", "metrics_listen")
    @classmethod
    def _listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen(value, any_port=False)  # 0 would be a port nobody knows
        return value


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


class HealthConfig(Model):
    """The app's health gate in `run` and `agent`: register only once it
    passes, out of rotation while it fails. With no probe given, the probe
    is: service.address:service.port accepts a TCP connection."""
    http: str | None = Field(None, description="URL that must answer 2xx/3xx.")
    tcp: str | None = Field(None, description="host:port that must accept a connection "
                                              "(default: service.address:service.port).")
    exec: list[str] | None = Field(None, min_length=1, description="Command that must exit 0.")
    interval: Duration = Field(2.0, ge=0.01)
    timeout: Duration = Field(1.0, gt=0)
    failure_threshold: Integer = Field(3, ge=1, le=1000,
                                       description="Failures in a row that take the instance "
                                                   "out of rotation.")

    @field_validator("http")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None:
            from urllib.parse import urlsplit

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

    @field_validator("exec")
    @classmethod
    def _exec(cls, argv: list[str] | None) -> list[str] | None:
        if argv is not None and (not argv[0] or any("\0" in arg for arg in argv)):
            raise ValueError(f"expected a command and its arguments (no NUL), got {show(argv)}")
        return argv

    @model_validator(mode="after")
    def _one_probe(self) -> "HealthConfig":
        given = [k for k in ("http", "tcp", "exec") if getattr(self, k) is not None]
        if len(given) > 1:
            raise PydanticCustomError("one_probe",
                                      "give at most one of http, tcp, exec (got {got})",
                                      {"got": ", ".join(given)})
        return self

    @field_validator("tcp")
    @classmethod
    def _tcp(cls, value: str | None) -> str | None:
        if value is not None and isinstance(parse_listen(value, any_port=False), str):
            raise ValueError(f'expected "host:port" (port 1..65535), got {show(value)}')
        return value


class _FileModel(Model):
    service: ServiceConfig
    backends: list[dict[str, Any]] = Field(min_length=1)
    heartbeat: HeartbeatConfig = Field(default_factory=HeartbeatConfig)
    stop: StopConfig = Field(default_factory=StopConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    health: HealthConfig | Literal[False] | None = Field(
        None, description="The gate: register once the app passes its probe (default: "
                          "service.port accepts a TCP connection); false registers at once.")


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
    def dump(model: BaseModel) -> Any:
        return _redact(model.model_dump(mode="json"))

    return {"service": dump(config.service),
            "backends": [dump(section) for _, section in config.backends],
            "heartbeat": dump(config.heartbeat), "stop": dump(config.stop),
            "control": dump(config.control),
            "health": False if config.health is None else dump(config.health)}


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("<redacted>" if v is not None and _SECRET.search(k)
                    and not k.endswith("_file") else _redact(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


def load(source: str | os.PathLike | Mapping[str, Any],
         environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read, interpolate and validate a configuration file or mapping.
    Raises ConfigError only, its text one line."""
    try:
        return _load(source, environ)
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


def _validate(model: type[BaseModel], data: Any, prefix: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # A misspelt key also makes the right one "missing": name the typo
        # (with its "did you mean"), which is what the user wrote.
        first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0]) \
            if any(e["type"] == "missing" for e in errors) else errors[0]
        raise _config_error(first, model, prefix, data) from None
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a plugin's validator that crashed
        raise ConfigError(prefix, f"internal error in the checks of "
                                  f"{getattr(model, '__name__', model)}: "
                                  f"{type(exc).__name__}: {exc}") from None


_SECRET = re.compile(r"token|password|secret|key", re.I)


_BOUNDS = {"greater_than_equal": ("at least", "ge"), "greater_than": ("more than", "gt"),
           "less_than_equal": ("at most", "le"), "less_than": ("less than", "lt")}


def _config_error(err: Mapping[str, Any], model: type[BaseModel], prefix: str,
                  data: Any = None) -> ConfigError:
    loc = [part for part in err["loc"] if not str(part).startswith("function-")]
    path = prefix
    for part in loc:
        path = f"{path}[{part}]" if isinstance(part, int) else _join(path, part)
    kind = err["type"]
    if kind == "missing":
        return ConfigError(path, "required")
    if kind == "extra_forbidden":
        return ConfigError(path, "unknown key" + _did_you_mean(model, loc))
    if kind in ("duration", "one_probe", "integer"):
        return ConfigError(path, err["msg"])
    if kind == "value_error":  # our validators' messages say what they got
        return ConfigError(path, str(err["ctx"]["error"]))
    message = err["msg"][0].lower() + err["msg"][1:]
    if loc and _SECRET.search(str(loc[-1])):
        return ConfigError(path, message)  # never echo what may be a secret
    given = _lookup(data, loc, err.get("input"))
    if kind in _BOUNDS:
        message = "should be " + _range(_field(model, loc), err)
    return ConfigError(path, f"{message}, got {show(given)}")


def _range(info: Any, err: Mapping[str, Any]) -> str:
    """A field's whole range in words ("from 1 to 65535", "from 2s to
    24h"), from its constraints; else the one bound that was broken."""
    duration = info is not None and any(
        getattr(m, "func", None) is parse_duration
        for m in [*info.metadata, *(m for a in typing.get_args(info.annotation)
                                   for m in getattr(a, "__metadata__", ()))])
    say = format_duration if duration else (lambda n: f"{n:g}" if isinstance(n, float) else str(n))
    low = high = None
    for m in info.metadata if info is not None else ():
        for key, words in (("ge", "at least"), ("gt", "more than"), ("le", "at most"),
                           ("lt", "less than")):
            if getattr(m, key, None) is not None:
                if key in ("ge", "gt"):
                    low = (key, words, getattr(m, key))
                else:
                    high = (key, words, getattr(m, key))
    if duration and high is None:
        high = ("le", "at most", MAX_DURATION)
    if low is None and high is None:
        words, key = _BOUNDS[err["type"]]
        return f"{words} {say(err['ctx'][key])}"
    if low and high and low[0] == "ge" and high[0] == "le":
        return f"from {say(low[2])} to {say(high[2])}"
    return " and ".join(f"{bound[1]} {say(bound[2])}" for bound in (low, high) if bound)


def _field(model: type[BaseModel], loc: list) -> Any:
    """The FieldInfo at ``loc`` in ``model``, or None."""
    fields, info = model.model_fields, None
    for part in loc:
        if isinstance(part, int):
            continue
        info = fields.get(part) if isinstance(part, str) else None
        if info is None:
            return None
        models = [a for a in (typing.get_args(info.annotation) or (info.annotation,))
                  if hasattr(a, "model_fields")]
        fields = models[0].model_fields if models else {}
    return info


def _lookup(data: Any, loc: list, default: Any) -> Any:
    """The value at ``loc`` as the user wrote it (before conversion)."""
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return default
    return data


def _did_you_mean(model: type[BaseModel], loc: list) -> str:
    # Walk the model to the mapping that holds the unknown key.
    fields = model.model_fields
    for part in loc[:-1]:
        if isinstance(part, int) or part not in fields:
            continue
        annotation = fields[part].annotation
        # An optional section (``Tls | None``) is a union: look into its model.
        models = [a for a in (typing.get_args(annotation) or (annotation,))
                  if hasattr(a, "model_fields")]
        fields = models[0].model_fields if models else {}
    close = difflib.get_close_matches(str(loc[-1]), list(fields), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(fields)}"


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the configuration file, with one branch per
    installed backend."""
    schema = _FileModel.model_json_schema()
    branches = []
    for _, ep in sorted(available_backends().items()):
        sub = ep.load().config_model.model_json_schema()
        schema.setdefault("$defs", {}).update(sub.pop("$defs", {}))
        branches.append(sub)
    schema["properties"]["backends"]["items"] = {"oneOf": branches} if branches else {}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "registrar configuration"
    return schema
