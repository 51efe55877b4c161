"""Configuration: interpolation, defaults, and one clear line per bad field."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from registrar import cli, config, fields
from registrar.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
GOOD = {
    "service": {"name": "web", "port": 8080},
    "backends": [{"type": "etcd", "endpoints": ["http://127.0.0.1:2379"]}],
}


def with_(path: str, value, base=GOOD):
    """GOOD with the dotted `path` set to value (or removed if value is DEL)."""
    doc = json.loads(json.dumps(base))
    node, parts = doc, path.replace("]", "").replace("[", ".").split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    last = int(parts[-1]) if parts[-1].isdigit() else parts[-1]
    if value is DEL:
        del node[last]
    else:
        node[last] = value
    return doc


DEL = object()

BROKEN = [
    (with_("backends[0].ttl", "ten"), 'backends[0].ttl: expected a duration like "10s", got "ten"'),
    (with_("service.name", DEL), "service.name: required"),
    (with_("servce", {}), "servce: unknown key (did you mean 'service'?)"),
    (with_("backends[0].ttll", "5s"), "backends[0].ttll: unknown key (did you mean 'ttl'?)"),
    (with_("stop.grace", "5s"), "stop.grace: unknown key (did you mean 'grace_period'?)"),
    (with_("backends[0].type", "consol"),
     "backends[0].type: unknown backend type 'consol' (did you mean 'consul'?; installed: "),
    (with_("backends[0].type", DEL), "backends[0].type: required"),
    (with_("service.port", 70000), "service.port: should be from 1 to 65535, got 70000"),
    (with_("service.port", "http"), 'service.port: expected a whole number, got "http"'),
    (with_("backends[0].endpoints", ["127.0.0.1:2379"]),
     'backends[0].endpoints: expected a URL like http://10.0.0.1:2379 (port 1..65535), '
     'got "127.0.0.1:2379"'),
    (with_("service.meta", {"a": "x\ny"}),
     "service.meta: no control characters (a newline, a NUL) allowed"),
    (with_("backends[0].prefix", "/a\x00b"),
     "backends[0].prefix: no control characters (a newline, a NUL) allowed"),
    (with_("service.name", "${NOPE_NOT_SET}"),
     "service.name: environment variable NOPE_NOT_SET is not set"),
    (with_("stop.grace_period", "30"),
     'stop.grace_period: expected a duration like "10s", got "30"'),
    (with_("stop.min_wait", -1), "stop.min_wait: expected a duration like \"10s\", got -1"),
    (with_("stop", {"grace_period": "30s", "propagation_timeout": "25s", "min_wait": "5s"}),
     "stop.propagation_timeout: propagation_timeout 25s + min_wait 5s exceeds "
     "grace_period - safety_margin (28s)"),
    (with_("stop", {"grace_period": "2s"}),
     "stop.safety_margin: 2s leaves nothing of grace_period 2s"),
    (with_("stop", {"grace_period": "5s", "min_wait": "4s"}),
     "stop.min_wait: propagation_timeout 0s + min_wait 4s exceeds "
     "grace_period - safety_margin (3s)"),
    (with_("heartbeat.interval", "10s"),
     "heartbeat.interval: 10s is not shorter than backends[0].ttl (10s)"),
    (with_("control.listn", "0.0.0.0:9901"), "control.listn: unknown key (did you mean 'listen'?)"),
    (with_("service.tags", {"a": 1}),
     "service.tags: expected a list of text, or one comma-separated text, got {'a': 1}"),
    (with_("service.meta", {"v": {"x": 1}}),
     "service.meta: expected text as every value, got {'v': {'x': 1}}"),
    (with_("backends[0].ttl", "1s"), 'backends[0].ttl: should be from 2s to 24h, got 1s'),
    (with_("backends", [GOOD["backends"][0], GOOD["backends"][0]]),
     "backends[1].name: two backends are named 'etcd'"),
    ([1, 2], "the configuration must be a mapping at the top level"),
    (with_("backends", [{"type": "zookeeper", "hosts": ["127.0.0.1:2181"],
                         "session_timeout": "6s"}],
           with_("heartbeat.interval", "6s")),
     "heartbeat.interval: 6s is not shorter than backends[0].session_timeout (6s)"),
    (with_("backends", [{"type": "zookeeper", "hosts": ["127.0.0.1:2181"],
                         "tls": {"verfy": True}}]),
     "backends[0].tls.verfy: unknown key (did you mean 'verify'?)"),
    (with_("backends", [{"type": "zookeeper", "hosts": ["127.0.0.1:2181"],
                         "auth": {"file": "/nonexistent/secret"}}]),
     "backends[0].auth.file: cannot read /nonexistent/secret: No such file or directory"),
    (with_("control.listen", "9901"),
     'control.listen: expected "host:port" (port 1..65535) or "unix:/path.sock", got "9901"'),
    (with_("control.listen", "0.0.0.0:9901"),
     "control.token_file: required when control.listen is not a loopback address "
     "(it is 0.0.0.0:9901)"),
    (with_("control.token_file", "/nonexistent/token"),
     "control.token_file: cannot read /nonexistent/token: No such file or directory"),
    (with_("health", {"interval": "0s"}), 'health.interval: should be from 10ms to 24h, got 0s'),
    (with_("health", {"tcp": "x:1", "exec": ["true"]}),
     "health: give at most one of http, tcp, exec (got tcp, exec)"),
    (with_("stop.signal", "SIGFOO"), "stop.signal: unknown signal 'SIGFOO'"),
    (with_("health", {"tcp": "unix:/run/app.sock"}),
     "health.tcp: expected \"host:port\" (port 1..65535), got \"unix:/run/app.sock\""),
    (with_("health", True), "health: expected a mapping or false, got true"),
    (with_("backends[0].ttl", True), 'backends[0].ttl: expected a duration like "10s", got true'),
    (with_("stop.drain_connections", "maybe"),
     'stop.drain_connections: expected one of "busy", "all", "none", got "maybe"'),
    (with_("health", {"tcp": "app"}),
     'health.tcp: expected "host:port" (port 1..65535) or "unix:/path.sock", got "app"'),
]


@pytest.mark.parametrize("doc,expected", BROKEN, ids=[e.split(":")[0] for _, e in BROKEN])
def test_broken_config_exits_2_with_one_line_naming_the_field(tmp_path, capsys, doc, expected):
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["agent", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"config error: {expected}"), err


def test_invalid_yaml_names_the_line(tmp_path, capsys):
    path = tmp_path / "agent.yaml"
    path.write_text("service:\n  name: [web\n")
    assert cli.main(["status", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {path}: invalid YAML (line 3") and err.count("\n") == 1


def test_missing_file(tmp_path, capsys):
    assert cli.main(["deregister", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_a_real_process_exits_2_without_a_traceback(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(with_("backends[0].ttl", "ten")))
    proc = subprocess.run([sys.executable, "-m", "registrar", "agent", "--config", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr == ('config error: backends[0].ttl: expected a duration like "10s", '
                           'got "ten"\n')


def test_secrets_are_not_echoed():
    doc = with_("backends", [{"type": "consul", "token": 12345}])
    with pytest.raises(ConfigError) as info:
        config.load(doc)
    assert info.value.path == "backends[0].token" and "12345" not in str(info.value)
    err = fields._config_error("Expected `str`, got `int` - at `$.password`",
                               fields.Model, "backends[0]", {"password": 12345})
    assert str(err) == "backends[0].password: expected text"


def test_defaults_and_interpolation():
    cfg = config.load({
        "service": {"name": "${SVC}", "port": "${PORT}", "tags": "${TAGS:-a,b}"},
        "backends": [{"type": "etcd", "endpoints": "${EPS:-http://127.0.0.1:1,http://127.0.0.1:2}"}],
        "stop": {"min_wait": "${MIN_WAIT:-500ms}"},
    }, environ={"SVC": "api", "PORT": "9090", "EMPTY": ""})
    assert cfg.service.name == "api" and cfg.service.port == 9090
    assert cfg.service.tags == ["a", "b"]
    (cls, etcd), = cfg.backends
    assert cls.__name__ == "EtcdBackend"
    assert etcd.endpoints == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert (etcd.ttl, etcd.prefix, etcd.timeout) == (10.0, "services", 2.0)
    assert cfg.stop.min_wait == 0.5
    stop = cfg.stop
    assert (stop.grace_period, stop.safety_margin, stop.propagation_timeout) == (30, 2, None)
    assert cfg.heartbeat.interval is None


def test_dollar_escapes_and_embedded_references():
    out = config.expand({"a": "$${X}", "b": "pre-${X}-post", "c": "${X}", "d": "${EMPTY:-d}"},
                        environ={"X": "7", "EMPTY": ""})
    assert out == {"a": "${X}", "b": "pre-7-post", "c": 7, "d": "d"}


@pytest.mark.parametrize("text,seconds", [("500ms", 0.5), ("10s", 10), ("1m", 60), ("1.5h", 5400),
                                          (" 2s ", 2), (3, 3.0), (0.25, 0.25)])
def test_durations(text, seconds):
    assert fields.parse_duration(text) == seconds


def test_from_config_builds_the_instance_from_the_downward_api():
    from registrar import Registrar

    registrar = Registrar.from_config(GOOD, environ={"POD_NAME": "web-3", "POD_IP": "10.1.1.1"})
    assert (registrar.instance.id, registrar.instance.address) == ("web-3", "10.1.1.1")


def test_committed_schema_is_current():
    committed = json.loads((ROOT / "config" / "registrar.schema.json").read_text())
    assert committed == json.loads(json.dumps(config.json_schema())), \
        ("config/registrar.schema.json is stale: "
         "run `registrar schema > config/registrar.schema.json`")


@pytest.mark.parametrize("example", sorted((ROOT / "config").glob("agent-*.yaml")),
                         ids=lambda p: p.name)
def test_examples_validate_against_the_schema_and_the_loader(example):
    schema = json.loads((ROOT / "config" / "registrar.schema.json").read_text())
    doc = config.expand(example, environ={})
    jsonschema.validate(doc, schema)
    config.load(example, environ={})


def test_schema_rejects_what_the_loader_rejects():
    schema = json.loads((ROOT / "config" / "registrar.schema.json").read_text())
    for doc in (with_("backends[0].ttl", "ten"), with_("servce", {}), with_("backends[0].ttll", 1)):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, schema)


def test_config_error_str_is_the_line():
    assert str(ConfigError("a.b", "bad")) == "a.b: bad"


# -- hostile files: one line and exit 2, never a traceback or gigabytes ------------------

def _alias_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\nservice: {name: web, port: 8080}\nbackends: [{type: etcd}]\n" \
        f"meta_bomb: *a{levels - 1}\n"


HOSTILE = [
    ("[" * 5000, "nested deeper than 32 levels (line 1)"),
    ("".join("  " * i + "a:\n" for i in range(200)) + "  " * 200 + "1\n",
     "nested deeper than 32 levels"),
    (_alias_bomb(), "more than 10000 values (YAML aliases expanded)"),
    ("x: " + "y" * (2 << 20), "larger than 1 MiB"),
    (b"\xff\xfe\x00garbage", "not UTF-8 text (byte 0)"),
    (yaml.safe_dump(with_("backends[0].timeout", 1e30)),
     "backends[0].timeout: expected a duration of at most 24h"),
    (yaml.safe_dump(with_("backends[0].ttl", 1e308)),
     "backends[0].ttl: expected a duration of at most 24h"),
    (yaml.safe_dump(with_("stop.grace_period", "99999999999999999999h")),
     "stop.grace_period: expected a duration of at most 24h"),
    (yaml.safe_dump(with_("backends[0].ttl", float("inf"))),
     "backends[0].ttl: expected a duration of at most 24h"),
    (yaml.safe_dump(with_("backends[0].ttl", float("nan"))),
     'backends[0].ttl: expected a duration like "10s"'),
    (yaml.safe_dump(with_("control.linger", "25h")),
     "control.linger: expected a duration of at most 24h"),
]


@pytest.mark.parametrize("text,expected", HOSTILE, ids=[e[:30] for _, e in HOSTILE])
def test_a_hostile_file_is_one_line_and_exit_2(tmp_path, capsys, text, expected):
    path = tmp_path / "agent.yaml"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    assert cli.main(["agent", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


@pytest.mark.parametrize("environ, message", [
    ({"POD_IP": "foo bar"}, 'service.address: $POD_IP is "foo bar": not an IP address'),
    ({"POD_NAME": "a\nb", "POD_IP": "10.0.0.1"},
     "service.id: $POD_NAME: expected a name without '\\n' (it goes into registry keys and "
     "URLs), got 'a\\nb'"),
])
def test_downward_api_variables_are_checked_like_the_config(environ, message):
    from registrar import Registrar

    raw = {"service": {"name": "web", "port": 8080},
           "backends": [{"type": "etcd", "endpoints": ["http://127.0.0.1:1"]}]}
    with pytest.raises(ConfigError) as info:
        Registrar.from_config(raw, environ=environ)
    assert str(info.value).startswith(message)


def test_a_misspelt_key_is_named_before_the_key_it_leaves_missing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("service: {name: web, port: 8080}\nbackend:\n  - {type: etcd}\n")
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    assert str(info.value) == "backend: unknown key (did you mean 'backends'?)"


def test_a_misspelt_backend_type_gets_a_did_you_mean():
    raw = {"service": {"name": "web", "port": 8080}, "backends": [{"type": "etdc"}]}
    with pytest.raises(ConfigError) as info:
        config.load(raw)
    assert str(info.value).startswith(
        "backends[0].type: unknown backend type 'etdc' (did you mean 'etcd'?")


def test_a_backend_of_ours_that_is_not_installed_names_its_distribution(monkeypatch):
    from registrar import discovery

    installed = {k: v for k, v in discovery.available_backends().items() if k != "consul"}
    monkeypatch.setattr(discovery, "available_backends", lambda: installed)
    raw = {"service": {"name": "web", "port": 8080}, "backends": [{"type": "consul"}]}
    with pytest.raises(ConfigError) as info:
        config.load(raw)
    assert str(info.value) == ("backends[0].type: backend type 'consul' is not installed "
                               "(installed: etcd, zookeeper): install the distribution "
                               "'registrar-consul' (pip install 'registrar[consul]')")


def test_the_configuration_can_come_on_standard_input():
    text = "service: {name: web, port: 8080}\nbackends: [{type: etcd}]\n"
    done = subprocess.run([sys.executable, "-m", "registrar", "check", "-c", "-"], input=text,
                          capture_output=True, text=True, env={**os.environ, "POD_IP": "10.0.0.1"},
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "valid: web/" in done.stderr


def test_a_list_that_is_not_optional_refuses_null():
    """A StrList is Any to msgspec: null used to pass as "not given" and
    crash later (found by test_config_props)."""
    with pytest.raises(ConfigError, match=r"^service\.tags: expected a list of text, or one "
                                          r"comma-separated text, got null$"):
        config.load({"service": {"name": "web", "port": 80, "tags": None},
                     "backends": [{"type": "etcd", "endpoints": ["http://127.0.0.1:2379"]}]})
    stop = config.load({"service": {"name": "web", "port": 80}, "stop": {"ignore_peers": None},
                        "backends": [{"type": "etcd", "endpoints": ["http://127.0.0.1:2379"]}]}).stop
    assert stop.ignore_peers is None  # Optional: null is "not given"


@pytest.mark.parametrize("field,value", [
    ("service.id", "../victim"), ("service.id", ".."), ("service.id", "a/b"),
    ("service.id", "a?b"), ("service.id", "a#b"), ("service.id", "a%2Fb"),
    ("service.id", "a b"), ("service.name", "web/../x"), ("service.name", "."),
])
def test_a_name_that_would_escape_its_key_or_url_is_refused(field, value):
    """Issue 24: `service.id: ../victim` registered on Consul, and the stop's
    PUTs went to another endpoint. A name is a key element and a URL path
    segment on every backend: nothing that reaches above or beside it."""
    with pytest.raises(ConfigError) as info:
        config.load(with_(field, value))
    assert str(info.value).startswith(f"{field}: expected a name")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("pod_name", ["../../x", "web/1", ".."])
def test_a_pod_name_that_would_escape_its_key_or_url_is_refused(pod_name):
    from registrar import Registrar

    with pytest.raises(ConfigError) as info:
        Registrar.from_config(GOOD, environ={"POD_NAME": pod_name,
                                            "POD_IP": "10.0.0.1"})
    assert str(info.value).startswith("service.id: $POD_NAME: expected a name")


def test_ordinary_names_pass():
    for name in ("web-5d8f7c6b9-x2x7q", "web.default", "web_1", "web:8080", "api@v2"):
        assert config.load(with_("service.id", name)).service.id == name


@pytest.mark.parametrize("path,value", [
    ("backends", [{"type": "etcd", "endpoints": ["http://root:S3cr3t-PW@127.0.0.1:2379"]}]),
    ("backends", [{"type": "etcd", "endpoints": "https://root:S3cr3t-PW@10.0.0.1:2379"}]),
    ("backends", [{"type": "consul", "address": "http://acl:S3cr3t-PW@127.0.0.1:8500"}]),
    ("backends", [{"type": "consul", "observers": ["S3cr3t-PW@127.0.0.1:8500"]}]),
    ("health", {"http": "http://admin:S3cr3t-PW@127.0.0.1:8080/healthz"}),
])
def test_credentials_in_a_url_are_refused_without_showing_them(path, value):
    """Issue 24 (4): a password in an endpoint URL showed in /status, the
    report file, `registrar check` and `status --json`. It is refused, with
    a pointer to where it belongs, and the message does not repeat it."""
    with pytest.raises(ConfigError) as info:
        config.load(with_(path, value))
    message = str(info.value)
    assert "credentials in a URL are refused" in message and "***@" in message, message
    assert "S3cr3t" not in message and "\n" not in message


def _special(kind: str, tmp_path: Path) -> str:
    if kind == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
        return str(path)
    if kind == "directory":
        return str(tmp_path)
    if kind == "large":
        path = tmp_path / "large"
        path.write_bytes(b"x" * (64 * 1024 + 1))
        return str(path)
    return "/dev/zero"


@pytest.mark.parametrize("kind,why", [
    ("zero", "not a regular file (a character device)"), ("fifo", "not a regular file (a FIFO)"),
    ("directory", "not a regular file (a directory)"), ("large", "larger than 64 KiB")])
def test_a_secret_file_must_be_a_small_regular_file(tmp_path, kind, why):
    """Issue 24 (5): `token_file: /dev/zero` grew `registrar check` to 6 GB,
    and a FIFO hung it. Run as a user would, bounded by a timeout."""
    doc = with_("control", {"listen": "127.0.0.1:9901", "token_file": _special(kind, tmp_path)})
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(doc))
    done = subprocess.run([sys.executable, "-m", "registrar", "check", "-c", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("config error: control.token_file: cannot read ") and \
        line.endswith(f": {why}"), line


@pytest.mark.parametrize("kind", ["zero", "fifo", "directory"])
def test_the_config_file_must_be_a_regular_file(tmp_path, kind):
    done = subprocess.run([sys.executable, "-m", "registrar", "check", "-c",
                           _special(kind, tmp_path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "not a regular file" in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1


@pytest.mark.parametrize("kind", ["zero", "fifo"])
def test_prestop_refuses_a_special_token_file(tmp_path, kind):
    done = subprocess.run([sys.executable, "-m", "registrar", "prestop", "--control",
                           "127.0.0.1:9", "--token-file", _special(kind, tmp_path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "not a regular file" in done.stderr, done.stderr


# -- issue 24 (8): nothing accepted without a word ---------------------------------------

def _check(tmp_path, text: str, environ=None) -> subprocess.CompletedProcess:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    env = {"PATH": os.environ["PATH"], "POD_IP": "10.0.0.1", **(environ or {})}
    return subprocess.run([sys.executable, "-m", "registrar", "check", "--effective", "-c",
                           str(path)], capture_output=True, text=True, timeout=30, env=env)


BASE = "backends: [{type: etcd, endpoints: ['http://127.0.0.1:2379']}]\n"


def test_a_key_written_twice_is_refused(tmp_path):
    done = _check(tmp_path, "service: {name: web, port: 8080}\n" + BASE +
                  "stop:\n  grace_period: 30s\n  grace_period: 10s\n")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"config error: {tmp_path / 'agent.yaml'}: invalid YAML (line 5, column 3): "
        f"duplicate key 'grace_period' (first on line 4)")


def test_a_merge_key_may_be_overridden(tmp_path):
    """``<<: *anchor`` and then a key of the mapping's own is YAML's override,
    not a key written twice."""
    done = _check(tmp_path, "service: {name: web, port: 8080}\n"
                  "backends:\n"
                  "  - &one {type: etcd, endpoints: ['http://127.0.0.1:2379']}\n"
                  "  - {<<: *one, name: other, endpoints: ['http://127.0.0.1:2380']}\n")
    assert done.returncode == 0, done.stderr
    second = yaml.safe_load(done.stdout)["backends"][1]
    assert second["name"] == "other" and second["endpoints"] == ["http://127.0.0.1:2380"]


@pytest.mark.parametrize("ref", ["${}", "${A", "${ A }", "${A${B}}", "${A:-${B}}", "x${1A}"])
def test_a_malformed_reference_is_refused(tmp_path, ref):
    done = _check(tmp_path, f"service: {{name: '{ref}', port: 8080}}\n" + BASE,
                  {"A": "a", "B": "b"})
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith('config error: service.name: malformed reference "$'), line


def test_well_formed_references_and_dollars_still_work(tmp_path):
    done = _check(tmp_path, "service: {name: 'w$${A}-${A}-${C:-c}$', port: 8080}\n" + BASE,
                  {"A": "a"})
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["service"]["name"] == "w${A}-a-c$"


@pytest.mark.parametrize("ttl", ["١٠s", "１０s", "²s"])
def test_a_duration_takes_ascii_digits_only(ttl):
    with pytest.raises(ConfigError, match=r'backends\[0\].ttl: expected a duration like "10s"'):
        config.load(with_("backends[0].ttl", ttl))


@pytest.mark.parametrize("pod_ip", ["not-an-ip", "web.example.com"])
def test_pod_ip_must_be_an_ip_address(tmp_path, pod_ip):
    done = _check(tmp_path, "service: {name: web, port: 8080}\n" + BASE, {"POD_IP": pod_ip})
    assert done.returncode == 2
    assert done.stderr.strip() == \
        f'config error: service.address: $POD_IP is "{pod_ip}": not an IP address'


def test_thousands_of_backends_are_refused_at_once():
    doc = with_("backends", [{"type": "etcd"}] * 3000)
    began = time.monotonic()
    with pytest.raises(ConfigError) as info:
        config.load(doc)
    assert str(info.value).startswith("backends: ") and "32" in str(info.value), info.value
    print(f"\nrefused in {1000 * (time.monotonic() - began):.1f} ms")


# -- settings over the file (the command line's --set; registrar inject's wiring) ----------


def test_settings_go_over_the_file_before_validation(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(with_("stop", {"grace_period": "10s", "safety_margin": "1s"})))
    before = path.read_text()
    cfg = config.load(path, environ={}, settings=["stop.grace_period=45s", "service.port=9090",
                                                  "stop.quiesce=false", "backends[0].ttl=4s",
                                                  "service.tags=a,b"])
    assert (cfg.stop.grace_period, cfg.stop.safety_margin) == (45.0, 1.0)  # the rest kept
    assert cfg.service.port == 9090 and cfg.stop.quiesce is False
    assert cfg.backends[0][1].ttl == 4.0 and cfg.service.tags == ["a", "b"]
    assert path.read_text() == before  # the file itself untouched


def test_the_last_setting_of_a_key_wins_and_the_source_mapping_is_untouched():
    source = with_("stop", {"grace_period": "10s"})
    kept = json.loads(json.dumps(source))
    merged = config.with_settings(source, ["stop.grace_period=20s", "stop.grace_period=25s"])
    assert merged["stop"] == {"grace_period": "25s"} and source == kept
    assert config.with_settings(source, []) is source  # no settings: the source as it is


def test_settings_alone_make_a_configuration_and_take_the_files_variables():
    """The Service-only pod `registrar inject` wires: no file at all, and
    ${POD_IP} expanded by the configuration's own interpolation."""
    with fields.secrets_unread():  # the token file is the pod's
        cfg = config.load(None, environ={"POD_IP": "10.1.2.3"}, settings=[
            "service.name=web", "service.port=8080", "control.listen=${POD_IP}:9901",
            "control.metrics_listen=${POD_IP}:9902", "control.token_file=/run/token"])
    assert cfg.backends == () and cfg.service.port == 8080
    assert cfg.control.listen == "10.1.2.3:9901" and cfg.control.metrics_listen == "10.1.2.3:9902"


@pytest.mark.parametrize("text,value", [
    ("a=30", 30), ("a=2.5", 2.5), ("a=true", True), ("a=False", False), ("a=null", None),
    ("a=", None), ("a=30s", "30s"), ("a='30'", "30"), ('a="x y"', "x y"),
    ("a=${POD_IP}:9901", "${POD_IP}:9901"), ("a=[1, 2]", "[1, 2]"), ("a=x=y", "x=y"),
])
def test_a_setting_is_a_yaml_scalar(text, value):
    assert config.parse_setting(text) == ("a", value)


@pytest.mark.parametrize("text", ["a", "=1", "a..b=1", "a[x]=1", ".a=1", "a b=1", "a='x"])
def test_a_setting_that_does_not_parse_says_how_it_should_look(text):
    with pytest.raises(ValueError, match=r"^expected "):
        config.parse_setting(text)


@pytest.mark.parametrize("settings,expected", [
    (["stop.grace_period=soon"], 'stop.grace_period: expected a duration like "10s", got "soon"'),
    (["stop.grace=30s"], "stop.grace: unknown key (did you mean 'grace_period'?)"),
    (["service.port=0"], "service.port: "),
    (["backends[1].ttl=5s"], "backends: --set backends[1].ttl: no item 1 (the list has 1)"),
    (["service.name.first=x"], 'service.name: --set service.name.first: expected a mapping, '
                               'got "web"'),
    (["backends.ttl=x"], "backends: --set backends.ttl: expected a mapping, got [{"),
    (["nonsense"], '--set: expected KEY=VALUE, e.g. stop.grace_period=30s, got "nonsense"'),
])
def test_a_bad_setting_is_one_error_naming_the_key(settings, expected):
    with pytest.raises(ConfigError) as info:
        config.load(GOOD, environ={}, settings=settings)
    assert str(info.value).startswith(expected), info.value
