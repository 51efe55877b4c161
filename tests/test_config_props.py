"""Property-based tests of the configuration: whatever the file, the
environment or the REGISTRAR_* variables hold, the loader raises only
ConfigError, the CLI exits 0 or 2 with one line naming the field, and
nothing it accepts is unbounded or can make the stop skip the removal.

The hand-picked hostile files are in test_config.py; here hypothesis
mutates one field of a valid configuration at a time, writes random
YAML-ish text, and sets random environment variables."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import yaml
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st

from registrar import cli, config
from registrar.clock import Deadline
from registrar.discovery import available_backends
from registrar.errors import ConfigError
from registrar.fields import MAX_DURATION, Model, _hints, _models_in
from registrar.instance import Instance
from registrar.registration import Slot
from registrar.stopping import StopSequence, Trigger
from registrar_testing.memory import FakeClock, MemoryBackend, MemoryConfig, MemoryRegistry

ROOT = Path(__file__).resolve().parent.parent
REGISTRAR = str(Path(sys.executable).with_name("registrar"))

IN_PROCESS = settings(max_examples=200, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow])
SUBPROCESS = settings(max_examples=12, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow])

BACKENDS = {name: ep.load().config_model for name, ep in available_backends().items()}
#: A valid section for each installed backend (on closed ports: nothing is contacted).
SECTIONS = {"etcd": {"type": "etcd", "endpoints": ["http://127.0.0.1:1"]},
            "consul": {"type": "consul", "address": "http://127.0.0.1:1"},
            "zookeeper": {"type": "zookeeper", "hosts": ["127.0.0.1:1"]}}


def good(backend: str = "etcd") -> dict:
    return {"service": {"name": "web", "port": 8080, "id": "web-0", "address": "127.0.0.1"},
            "backends": [dict(SECTIONS.get(backend, {"type": backend}))]}


def _model_paths(model: type[Model], prefix: str) -> list[str]:
    """Every field of a model, nested sections included, as dotted paths."""
    paths = []
    for name, hint in _hints(model).items():
        path = f"{prefix}.{name}" if prefix else name
        paths.append(path)
        for sub in _models_in(hint):
            paths.extend(_model_paths(sub, path))
    return paths


CORE_PATHS = [p for p in _model_paths(config._FileModel, "") if p != "backends"]


def backend_paths(backend: str) -> list[str]:
    return _model_paths(BACKENDS[backend], "backends[0]") if backend in BACKENDS else []


# -- values ------------------------------------------------------------------------------

HOSTILE_TEXT = [
    "", " ", "\n", "\x00", "a\x00b", "\u2028", "é", "10s", "0s", "1ms", "25h", "-1s", "1e30",
    "99999999999999999999h", "nan", ".inf", "true", "null", "${NOT_SET}", "${V}", "${V:-5}",
    "$$", "pre-${V}-post", "127.0.0.1:0", "127.0.0.1:99999", "0.0.0.0:9901", "[::1]:9901",
    "unix:", "unix:/tmp/x\x00.sock", "unix:/" + "a" * 200, "http://127.0.0.1:1",
    "http://[::1", "http://a:99999", "https://x", "world:anyone:r", "SIGKILL", "SIGFOO",
    "/nonexistent/file", "/dev/null", "/", "a/b", "..", "busy", "all", "9" * 5000,
]
HOSTILE_NUMBERS = [0, 1, -1, 65535, 65536, 2**31, 2**64, -(2**63), 10**400, 0.0, -0.0, 1e-9,
                   1e30, 1e308, math.inf, -math.inf, math.nan, 86400, 86400.001]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(),
    st.sampled_from(HOSTILE_NUMBERS), st.sampled_from(HOSTILE_TEXT),
    st.text(max_size=20), st.text(st.characters(codec="utf-8"), max_size=20),
    st.binary(max_size=8))
keys = st.one_of(st.text(max_size=10), st.sampled_from(["type", "name", "ttl", "timeout", "file",
                                                         "env", "listen", "grace_period"]))
hostile = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                       st.dictionaries(keys, inner, max_size=4), max_leaves=8)
#: Durations and numbers as a user would write them, in and around every range.
durations = st.one_of(
    st.integers(0, 200_000), st.floats(0, 200_000, allow_nan=False),
    st.builds("{}{}".format, st.integers(0, 100_000) | st.floats(0, 1e5).map("{:.3f}".format),
              st.sampled_from(["ms", "s", "m", "h"])))
values = st.one_of(durations, hostile)
env_values = st.one_of(st.sampled_from(HOSTILE_TEXT + ["8080", "0x1F", "1.0e+400", "[" * 5000]),
                       st.text(st.characters(codec="utf-8", exclude_characters="\x00"),
                               max_size=30))


def with_(doc: dict, path: str, value) -> dict:
    """``doc`` with the dotted ``path`` (``backends[0].tls.ca_file``) set."""
    doc = json.loads(json.dumps(doc))
    parts = path.replace("[0]", ".0").split(".")
    node = doc
    for part in parts[:-1]:
        if part == "0":
            node = node[0]
        else:
            if not isinstance(node.get(part), (dict, list)):
                node[part] = {}
            node = node[part]
    node[parts[-1]] = value
    return doc


@st.composite
def mutated(draw):
    """(doc, mutated path, environ): a valid configuration with one field
    set to anything, sometimes through a ${V} reference."""
    backend = draw(st.sampled_from(sorted(BACKENDS)))
    path = draw(st.sampled_from(CORE_PATHS + backend_paths(backend)))
    env = {"V": draw(env_values)}
    value = "${V}" if draw(st.booleans()) else draw(values)
    return with_(good(backend), path, value), path, env


TIMING = ["stop.grace_period", "stop.safety_margin", "stop.min_wait", "stop.propagation_timeout",
          "stop.app_shutdown", "stop.drain_quiet", "heartbeat.interval", "control.linger"]


@st.composite
def timings(draw):
    """(doc, backend): a valid configuration with several of the numbers
    the stop depends on set together -- each valid alone, maybe not
    together."""
    backend = draw(st.sampled_from(sorted(BACKENDS)))
    doc = good(backend)
    fields = TIMING + [p for p in backend_paths(backend)
                       if p.rsplit(".", 1)[-1] in ("timeout", "ttl", "session_timeout")]
    for path in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=5, unique=True)):
        doc = with_(doc, path, draw(durations))
    return doc


#: Where an error may legitimately land when a field of a section changes: the
#: checks that look at two fields at once (the stop budget against a backend's
#: timeout, a heartbeat against a ttl, a public listen address without a token).
RELATED = {"service": ("service",), "heartbeat": ("heartbeat",), "health": ("health",),
           "control": ("control",), "stop": ("stop", "backends[0].timeout"),
           "backends[0]": ("backends[0]", "heartbeat")}


def assert_names_the_field(error: ConfigError, path: str) -> None:
    line = str(error)
    assert line.isprintable() and line.strip(), repr(line)
    section = path.split(".")[0]
    assert error.path.startswith(RELATED[section]), (path, line)


# -- what an accepted configuration promises ---------------------------------------------

def _numbers(model: Model, where: str):
    for name in type(model).__struct_fields__:
        value = getattr(model, name)
        if isinstance(value, Model):
            yield from _numbers(value, f"{where}.{name}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{where}.{name}", value


def assert_bounded_and_safe(cfg: config.AgentConfig) -> None:
    """Every number finite and in range; the stop budget leaves the removal
    its time; and the stop sequence, run with this configuration, removes."""
    models = [("service", cfg.service), ("heartbeat", cfg.heartbeat), ("stop", cfg.stop),
              ("control", cfg.control)] + ([("health", cfg.health)] if cfg.health else []) + \
             [(f"backends[{i}]", section) for i, (_, section) in enumerate(cfg.backends)]
    for where, model in models:
        for name, value in _numbers(model, where):
            assert math.isfinite(value) and 0 <= value <= MAX_DURATION, (name, value)
    assert 1 <= cfg.service.port <= 65535
    stop = cfg.stop
    assert stop.budget >= 1.0  # MIN_BUDGET: the least a deregistration needs
    assert (stop.propagation_timeout or 0) + stop.min_wait <= stop.budget
    for _, section in cfg.backends:
        assert 2 * getattr(section, "timeout", 0) <= stop.budget
    # The sequence itself, on the in-memory registry, with the `run` mode's
    # (the smaller) share of the budget: the removal is made and confirmed.
    clock = FakeClock()
    instance = Instance("web", "web-0", "127.0.0.1", 8080)
    registry = MemoryRegistry(members=2, clock=clock)
    backend = MemoryBackend(instance, MemoryConfig(type="memory", ttl=2.0), registry)
    backend.register()
    report = StopSequence(instance, [Slot(backend, clock)], stop, clock).run(
        Trigger("SIGTERM"), Deadline.after(stop.budget - stop.app_reserve, clock))
    assert registry.count("deregister") == 1 and report.backends[0].removed, report.summary()
    assert report.backends[0].confirmed, report.summary()


# -- the loader --------------------------------------------------------------------------

@IN_PROCESS
@given(mutated(), st.booleans())
@example((with_(good(), "stop.grace_period", "3s"), "stop.grace_period", {}), False)
@example((with_(good(), "heartbeat.interval", 0), "heartbeat.interval", {}), False)
@example((with_(good(), "service.port", True), "service.port", {}), True)
@example((with_(good(), "service.name", "${V}"), "service.name", {"V": "[" * 5000}), True)
@example((with_(good(), "service.port", "${V}"), "service.port", {"V": "9" * 5000}), False)
@example((with_(good(), "control.token_file", "/tmp/a\x00b"), "control.token_file", {}), True)
@example((with_(good(), "health.exec", []), "health.exec", {}), False)
def test_one_field_set_to_anything_is_accepted_safely_or_one_line_naming_it(case, as_file):
    doc, path, env = case
    try:
        if as_file:
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
                yaml.safe_dump(doc, f, allow_unicode=True)
            try:
                cfg = config.load(f.name, environ=env)
            finally:
                os.unlink(f.name)
        else:
            cfg = config.load(doc, environ=env)
    except ConfigError as exc:
        assert_names_the_field(exc, path)
        return
    assert_bounded_and_safe(cfg)


@IN_PROCESS
@given(timings())
@example(with_(with_(good(), "stop.grace_period", "3s"), "stop.safety_margin", "2.5s"))
@example(with_(with_(good(), "stop.grace_period", "5s"), "backends[0].timeout", "4s"))
@example(with_(good(), "stop.propagation_timeout", 0))
def test_no_accepted_timing_makes_the_stop_skip_the_removal(doc):
    try:
        cfg = config.load(doc, environ={})
    except ConfigError as exc:
        assert str(exc).isprintable()
        assert exc.path.startswith(("stop.", "heartbeat.", "control.", "backends[0]."))
        return
    assert_bounded_and_safe(cfg)


YAML_TOKENS = ["service:", "backends:", "- type: etcd", "  name: web", "  port: 8080", "stop:",
               "  grace_period: ", "[", "]", "{", "}", ", ", "&a ", "*a", "*b", "!!binary ",
               "!!python/object:os.system ", "!!set ", "!!timestamp ", "!!int ", "? ", "- ",
               ": ", "\n", "  ", "---\n", "...\n", "%YAML 1.1\n", "%TAG ! x\n", '"\\x00"',
               '"\\ud800"', "2001-02-30", "1e400", ".nan", "0x" + "f" * 64, "9" * 5000, "'",
               '"', "#", "|\n", ">-\n", "\t", "\x00", "\ufeff", "<<: *a\n", "${V}", "~"]


@IN_PROCESS
@given(st.one_of(st.lists(st.sampled_from(YAML_TOKENS), max_size=40).map("".join),
                 st.text(max_size=200), st.binary(max_size=200)), env_values)
@example("a: &a [" + ", ".join(["*a"] * 3) + "]", "x")  # a recursive alias
@example("x: !!timestamp 2001-02-30\n", "x")
@example("x: !!int " + "9" * 5000 + "\n", "x")
def test_random_text_is_a_config_error_never_a_traceback(text, env):
    with tempfile.NamedTemporaryFile("wb", suffix=".yaml", delete=False) as f:
        f.write(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        config.load(f.name, environ={"V": env})
    except ConfigError as exc:
        line = str(exc)
        assert line.isprintable() and line, repr(line)
    finally:
        os.unlink(f.name)


# -- the command line and its environment ------------------------------------------------

VARIABLES = ["REGISTRAR_LOG_LEVEL", "REGISTRAR_LOG_FORMAT", "REGISTRAR_CONTROL",
             "REGISTRAR_CONTROL_TOKEN_FILE", "POD_NAME", "POD_IP", "CONSUL_HTTP_ADDR",
             "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE", "CONSUL_HTTP_SSL", "V"]
environments = st.dictionaries(st.sampled_from(VARIABLES), env_values, max_size=5)
GOOD_ENV = {"REGISTRAR_LOG_LEVEL": ["debug", "INFO", "warning", "error", ""],
            "REGISTRAR_LOG_FORMAT": ["text", "json", "JSON", ""]}


def _expect_variable(env: dict[str, str], err: str) -> None:
    """A REGISTRAR_* variable that does not parse is named in the line."""
    for name, ok in GOOD_ENV.items():
        value = env.get(name)
        if value is not None and value.strip().lower() not in ok:
            assert err.startswith(f"registrar check: {name}: "), err
            return
    assert err.startswith("config error: "), err


@contextlib.contextmanager
def environment(env: dict[str, str]):
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("REGISTRAR_", "POD_", "CONSUL_"))}
    with mock.patch.dict(os.environ, {**base, **env}, clear=True):
        yield


def run_in_process(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, out.getvalue(), err.getvalue()


@IN_PROCESS
@given(mutated(), environments)
def test_check_with_any_config_and_environment_exits_0_or_2_with_one_line(case, env):
    doc, path, doc_env = case
    env = {k: v for k, v in {**doc_env, **env}.items() if "\x00" not in v}  # the OS refuses
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(doc, f, allow_unicode=True)
    try:
        with environment(env):
            code, out, err = run_in_process(["check", "--effective", "-c", f.name])
    finally:
        os.unlink(f.name)
    assert "Traceback" not in err
    if code == 0:  # the verdict on stderr, the effective configuration on stdout
        assert err.startswith(f"{f.name}: valid: ") and err.count("\n") == 1, err
        assert isinstance(yaml.safe_load(out), dict), out
    else:
        assert code == 2 and err.count("\n") == 1 and err.endswith("\n"), (code, err)
        assert err[:-1].isprintable(), repr(err)
        _expect_variable(env, err)


@IN_PROCESS
@given(st.one_of(env_values, st.sampled_from(["127.0.0.1:9901", "[::1]:1", "unix:/run/r.sock",
                                             "http://localhost:9901/", "localhost:65535"])),
       st.booleans())
def test_prestop_control_from_option_or_variable_is_an_address_or_one_line(value, as_option):
    """Resolved only (nothing is called): any value either parses into an
    address prestop can use or is a usage error naming where it came from."""
    assume("\x00" not in value)  # neither argv nor the environment can hold one
    args = cli._parser().parse_args(["prestop", f"--control={value}"] if as_option
                                    else ["prestop"])
    with environment({} if as_option else {"REGISTRAR_CONTROL": value}):
        try:
            cli._resolve(args, os.environ)
        except cli.UsageError as exc:
            where = "--control" if as_option else "REGISTRAR_CONTROL"
            assert str(exc).startswith(f"{where}: expected ") and str(exc).isprintable()
            return
    from registrar.source import parse_listen

    where = parse_listen(args.control)
    if not value.strip():
        assert args.control == "127.0.0.1:9901"  # empty: unset
    assert isinstance(where, str) or 1 <= where[1] <= 65535


@SUBPROCESS
@given(mutated(), environments)
def test_the_real_command_exits_0_or_2_with_one_line(case, env):
    doc, path, doc_env = case
    env = {k: v for k, v in {**doc_env, **env}.items() if "\x00" not in v}  # the OS refuses
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "agent.yaml"
        cfg.write_text(yaml.safe_dump(doc, allow_unicode=True))
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("REGISTRAR_", "POD_", "CONSUL_"))}
        proc = subprocess.run([REGISTRAR, "check", "-c", str(cfg)], capture_output=True,
                              text=True, timeout=60, env={**base, **env})
    assert "Traceback" not in proc.stderr
    assert proc.returncode in (0, 2), proc.stderr
    if proc.returncode == 2:
        assert proc.stderr.count("\n") == 1, proc.stderr
        _expect_variable(env, proc.stderr)
