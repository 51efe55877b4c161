"""The command line: global options before or after the command mean the
same; an option, an address or a REGISTRAR_* variable that does not parse
is one line on stderr and exit 2, never a traceback. A handful of cases run
the real `registrar` console script; the rest run in-process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from registrar import cli
from registrar_testing import free_port

REGISTRAR = str(Path(sys.executable).with_name("registrar"))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRAR_")}
    return {**env, **extra}


@pytest.fixture
def cfg(tmp_path):
    """A valid configuration whose registry is a closed port on 127.0.0.1,
    with a 1 s stop budget: `deregister` fails fast and logs."""
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({
        "service": {"name": "web", "port": 8080, "id": "web-0", "address": "127.0.0.1"},
        "backends": [{"type": "etcd", "endpoints": [f"http://127.0.0.1:{free_port()}"],
                      "timeout": "200ms"}],
        "stop": {"grace_period": "2s", "safety_margin": "1s"},
        "control": {"listen": None}}))
    return path


@pytest.fixture(autouse=True)
def _no_registrar_variables(monkeypatch):
    for name in list(os.environ):
        if name.startswith("REGISTRAR_"):
            monkeypatch.delenv(name)


def run(*argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([REGISTRAR, *argv], capture_output=True, text=True, timeout=60,
                          env=clean_env(**env))


def one_line(text: str) -> str:
    assert text.count("\n") == 1 and text.endswith("\n") and "Traceback" not in text, text
    return text[:-1]


# -- the real console script -------------------------------------------------------------

@pytest.mark.parametrize("where", ["before", "after"])
def test_log_options_before_or_after_the_command_take_effect(cfg, where):
    options = ["--log-level", "error", "--log-format", "json"]
    argv = [*options, "deregister", "-c", str(cfg)] if where == "before" else \
        ["deregister", "-c", str(cfg), *options]
    proc = run(*argv)
    assert proc.returncode == 1, proc.stderr  # nothing listens: the removal failed
    records = [json.loads(line) for line in proc.stderr.splitlines()]  # every line JSON
    assert records and {r["level"] for r in records} == {"error"}, records
    assert any("stop incomplete" in r["msg"] for r in records)


def test_the_log_variables_apply_when_no_option_is_given(cfg):
    proc = run("deregister", "-c", str(cfg), REGISTRAR_LOG_LEVEL="ERROR",
               REGISTRAR_LOG_FORMAT="json")
    assert proc.returncode == 1
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    assert records and {r["level"] for r in records} == {"error"}


def test_json_logs_carry_structured_fields(cfg):
    proc = run("--log-format", "json", "deregister", "-c", str(cfg))
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    first, last = records[0], records[-1]
    assert first["msg"].startswith("stopping after deregister command")
    assert first["trigger"] == "deregister command" and 0 < first["seconds"] <= 1
    assert last["msg"].startswith("stop incomplete") and last["ok"] is False
    assert last["trigger"] == "deregister command" and last["seconds"] >= 0
    assert "; consumers: quiet" in last["msg"] and last["late"] == []  # none here


@pytest.mark.parametrize("argv,env,expected", [
    (["prestop", "--control", "garbage"], {},
     "registrar prestop: --control: expected host:port, http://host:port or unix:/path, "
     "got 'garbage'"),
    (["prestop", "--control", "127.0.0.1:99999"], {},
     "registrar prestop: --control: expected host:port, http://host:port or unix:/path, "
     "got '127.0.0.1:99999'"),
    (["prestop"], {"REGISTRAR_CONTROL": "unix:"},
     "registrar prestop: REGISTRAR_CONTROL: expected host:port, http://host:port or unix:/path, "
     "got 'unix:'"),
    (["schema"], {"REGISTRAR_LOG_LEVEL": "verbose"},
     'registrar schema: REGISTRAR_LOG_LEVEL: expected one of debug, info, warning, error, '
     'got "verbose"'),
    (["check", "-c", "/dev/null"], {"REGISTRAR_LOG_FORMAT": "yaml"},
     'registrar check: REGISTRAR_LOG_FORMAT: expected one of text, json, got "yaml"'),
])
def test_the_real_command_refuses_in_one_line(argv, env, expected):
    proc = run(*argv, **env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert one_line(proc.stderr) == expected


def test_check_accepts_a_valid_config_and_contacts_nothing(cfg):
    proc = run("--log-level", "debug", "check", "--effective", "-c", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.endswith(f"{cfg}: valid: web/web-0 at 127.0.0.1:8080 on etcd\n")
    shown = yaml.safe_load(proc.stdout)  # the effective configuration, defaults filled in
    assert shown["backends"][0]["prefix"] == "services" and shown["stop"]["grace_period"] == "2s"
    again = subprocess.run([REGISTRAR, "check", "--effective", "-c", "-"], input=proc.stdout,
                           text=True, capture_output=True, timeout=60, env=clean_env())
    assert again.returncode == 0 and again.stdout == proc.stdout, again.stderr


def test_check_prints_the_effective_configuration_without_its_secrets(tmp_path):
    token = tmp_path / "token"
    token.write_text("control-s3cret\n")
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({
        "service": {"name": "web", "port": 8080},
        "backends": [{"type": "consul", "token": "acl-s3cret"}],
        "control": {"listen": "${POD_IP}:9901", "token_file": str(token),
                    "metrics_listen": "${POD_IP}:9902"}}))
    proc = run("check", "--effective", "-c", str(path), POD_IP="10.1.2.3", POD_NAME="web-7")
    assert proc.returncode == 0, proc.stderr
    assert "s3cret" not in proc.stdout + proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert shown["backends"][0]["token"] == "<redacted>"
    assert shown["service"]["id"] == "web-7" and shown["service"]["address"] == "10.1.2.3"
    assert shown["control"]["metrics_listen"] == "10.1.2.3:9902"


@pytest.mark.parametrize("metrics_listen, expected", [
    ("10.1.2.3:9901", "control.metrics_listen: must differ from control.listen"),
    ("10.1.2.3:0", "control.metrics_listen: "),
    ("nonsense", "control.metrics_listen: "),
])
def test_a_bad_metrics_address_is_one_line(tmp_path, metrics_listen, expected):
    (tmp_path / "token").write_text("t")
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({
        "service": {"name": "web", "port": 8080}, "backends": [{"type": "etcd"}],
        "control": {"listen": "10.1.2.3:9901", "token_file": str(tmp_path / "token"),
                    "metrics_listen": metrics_listen}}))
    proc = run("check", "-c", str(path), POD_IP="10.1.2.3", POD_NAME="web-7")
    assert proc.returncode == 2 and expected in one_line(proc.stderr)


# -- in-process ----------------------------------------------------------------------------

def parsed(argv: list[str], env: dict[str, str] | None = None) -> dict:
    args = cli._parser().parse_args(argv)
    cli._resolve(args, env or {})
    return {k: v for k, v in vars(args).items() if k != "func"}


@pytest.mark.parametrize("command,extra", [("agent", []), ("run", ["--", "app", "-c", "x"]),
                                           ("register", []), ("deregister", []),
                                           ("status", ["--control", "127.0.0.1:1"]), ("check", []),
                                           ("prestop", ["--control", "127.0.0.1:1"])])
def test_global_options_mean_the_same_before_and_after_the_command(command, extra):
    options = ["--log-level", "debug", "--log-format", "json", "-c", "/etc/registrar.yaml"]
    after = parsed([command, *options, *extra])
    assert parsed([*options, command, *extra]) == after
    assert parsed([options[0], options[1], command, *options[2:], *extra]) == after
    assert (after["log_level"], after["log_format"], after["config"]) == \
        ("debug", "json", "/etc/registrar.yaml")
    if command == "run":
        assert after["argv"] == ["--", "app", "-c", "x"]  # the app's own options stay its own


def test_an_option_after_the_command_wins_over_one_before():
    assert parsed(["--log-level", "debug", "schema", "--log-level", "error"])["log_level"] == \
        "error"


def test_options_beat_variables_and_variables_beat_defaults():
    env = {"REGISTRAR_LOG_LEVEL": "Warning", "REGISTRAR_LOG_FORMAT": "json",
           "REGISTRAR_CONFIG": "/from/env.yaml"}
    assert parsed(["check"], env) | {} == {"command": "check", "log_level": "warning",
                                           "log_format": "json", "config": "/from/env.yaml",
                                           "offline": False, "effective": False, "set": [],
                                           "source": "/from/env.yaml"}
    got = parsed(["--log-level", "error", "check", "-c", "x.yaml"], env)
    assert (got["log_level"], got["config"]) == ("error", "x.yaml")
    got = parsed(["schema"], {"REGISTRAR_LOG_LEVEL": "", "REGISTRAR_LOG_FORMAT": "  "})
    assert (got["log_level"], got["log_format"]) == ("info", "text")  # empty: unset


def test_a_bad_variable_is_refused_even_when_an_option_overrides_it():
    with pytest.raises(cli.UsageError, match="^REGISTRAR_LOG_LEVEL: expected one of"):
        parsed(["--log-level", "info", "schema"], {"REGISTRAR_LOG_LEVEL": "verbose"})


@pytest.mark.parametrize("argv", [
    ["--log-level", "verbose", "schema"], ["schema", "--log-format", "yaml"],
    ["prestop", "--timeout", "nan"], ["prestop", "--timeout", "inf"],
    ["prestop", "--timeout", "-1"], ["prestop", "--timeout", "0"],
    ["register", "-c", "x", "--timeout", "1e9"], ["register", "-c", "x", "--timeout", "soon"],
    ["agent", "--no-such-option"], ["no-such-command"],
])
def test_an_option_that_does_not_parse_is_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith("registrar") and "(see registrar" in err


@pytest.mark.parametrize("control,env", [
    ("garbage", {}), ("127.0.0.1:99999", {}), ("127.0.0.1:0", {}), ("unix:", {}),
    ("unix:relative.sock", {}), ("[::1]:", {}), ("https://127.0.0.1:9901", {}),
    (None, {"REGISTRAR_CONTROL": "garbage"}), (None, {"REGISTRAR_CONTROL": "127.0.0.1:-1"}),
    (None, {"REGISTRAR_CONTROL": "unix:/" + "a" * 200}),
])
def test_an_address_that_does_not_parse_is_one_line_naming_where_it_came_from(
        control, env, capsys, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["prestop", *(["--control", control] if control else [])]) == 2
    err = one_line(capsys.readouterr().err)
    where = "--control" if control else "REGISTRAR_CONTROL"
    assert err.startswith(f"registrar prestop: {where}: expected host:port"), err


@pytest.mark.parametrize("control,token_file,expected", [
    ("garbage", None, "config error: control.listen: expected host:port"),
    ("127.0.0.1:0", None, "config error: control.listen: expected host:port"),
    (["a"], None, "config error: control.listen: expected host:port"),
    ("127.0.0.1:1", ["x"], "config error: control.token_file: expected a file name"),
    ("127.0.0.1:1", "/tmp/a\0b", "config error: control.token_file: expected a file name"),
])
def test_prestop_names_the_config_field_it_could_not_use(tmp_path, capsys, control, token_file,
                                                         expected):
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"control": {"listen": control, "token_file": token_file}}))
    assert cli.main(["prestop", "-c", str(path)]) == 2
    assert one_line(capsys.readouterr().err).startswith(expected)


@pytest.mark.parametrize("text,expected", [("control: [1]\n", "control: expected a mapping"),
                                           ("stop: 5\n", "stop: expected a mapping")])
def test_prestop_refuses_a_config_of_the_wrong_shape(tmp_path, capsys, text, expected):
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    assert cli.main(["prestop", "-c", str(path)]) == 2
    assert one_line(capsys.readouterr().err) == f"config error: {expected}, got " + \
        ("[1]" if "control" in text else "5")


def test_prestop_resolves_the_address_from_option_variable_config_default(tmp_path, monkeypatch):
    path = tmp_path / "agent.yaml"
    path.write_text("control: {listen: 'unix:/run/registrar.sock'}\n")
    assert parsed(["prestop", "--control", "http://[::1]:9/"])["control"] == "[::1]:9"
    assert parsed(["prestop", "-c", str(path)],
                  {"REGISTRAR_CONTROL": "localhost:7"})["control"] == "localhost:7"
    assert parsed(["prestop", "-c", str(path)])["control"] == "unix:/run/registrar.sock"
    assert parsed(["prestop"], {"REGISTRAR_CONTROL": ""})["control"] == "127.0.0.1:9901"


@pytest.mark.parametrize("command", cli.NEEDS_CONFIG)
def test_a_command_without_its_config_says_how_to_give_one(command, capsys):
    assert cli.main([command]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"registrar {command}: give the configuration file with --config FILE "
        "(or set REGISTRAR_CONFIG)")


def test_no_command_prints_the_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_a_config_error_with_a_control_character_stays_one_line(tmp_path, capsys):
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"service": {"name": "web", "port": 8080, "a\nb\u2028": 1},
                                    "backends": [{"type": "etcd"}]}))
    assert cli.main(["check", "-c", str(path)]) == 2
    assert one_line(capsys.readouterr().err) == \
        "config error: service.a\\nb\\u2028: unknown key; known keys: name, id, address, " \
        "port, tags, meta"


@pytest.mark.parametrize("given,seconds", [("5s", 5.0), ("500ms", 0.5), ("7", 7.0),
                                           ("2.5", 2.5), ("1m", 60.0)])
def test_timeout_takes_durations_as_the_config_does(given, seconds):
    """Issue 25: `prestop --timeout 5s` was refused (`expected seconds`)."""
    args = cli._parser().parse_args(["prestop", "--control", "127.0.0.1:9", "--timeout", given])
    assert args.timeout == seconds


@pytest.mark.parametrize("given", ["0", "0s", "25h", "soon", "١٠"])
def test_a_bad_timeout_is_one_line(given, capsys):
    with pytest.raises(SystemExit) as info:
        cli._parser().parse_args(["prestop", "--timeout", given])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'expected a duration like "5s" or seconds' in err


def test_durations_in_messages_have_at_most_three_decimals():
    from registrar.fields import format_duration

    assert format_duration(10 / 3) == "3.333s"  # a heartbeat at ttl/3 of 10 s
    assert format_duration(0.1 / 3) == "33.333ms"
    assert format_duration(30.0) == "30s" and format_duration(0.5) == "500ms"


def test_register_names_an_unreachable_registry_before_waiting_for_the_app(tmp_path):
    # No app listens and the endpoint is wrong: the registry is the problem,
    # and it is said at once, not "waiting for the app" until the timeout.
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"service": {"name": "web", "port": free_port()},
                                    "backends": [{"type": "etcd",
                                                  "endpoints": [f"http://127.0.0.1:{free_port()}"]}]}))
    began = time.monotonic()
    proc = run("register", "-c", str(path), "--timeout", "20s", POD_IP="127.0.0.1")
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - began < 10
    assert "cannot reach etcd: " in proc.stderr and "waiting for the app" not in proc.stderr


def test_status_heads_with_why_the_pod_is_not_ready(capsys):
    # Issue 25: an agent whose app had not come up said "serving" (no
    # registry) or "starting", and nothing of /readyz's reason.
    status = {"instance": {"service": "web", "id": "web-1", "address": "10.0.0.9", "port": 8080},
              "state": "starting", "ready": False,
              "reason": "waiting for the app: 10.0.0.9:8080: Connection refused",
              "backends": [], "source": {"agent": "127.0.0.1:9901"}}
    cli._print_status(status, as_json=False)
    assert capsys.readouterr().out.splitlines()[0] == (
        "web/web-1 at 10.0.0.9:8080: starting, not ready: waiting for the app: "
        "10.0.0.9:8080: Connection refused (the agent at 127.0.0.1:9901)")
    cli._print_status(status | {"state": "stopping", "reason": "stopping"}, as_json=False)
    assert capsys.readouterr().out.startswith("web/web-1 at 10.0.0.9:8080: stopping (the agent")


# -- --set: a configuration key on the command line ------------------------------------------


def test_set_before_and_after_the_command_are_joined_and_the_last_of_a_key_wins(cfg):
    got = parsed(["--set", "stop.grace_period=3s", "check", "-c", str(cfg), "--set",
                  "service.port=9090", "--set", "stop.grace_period=4s"])
    assert got["set"] == [("stop.grace_period", "3s"), ("service.port", 9090),
                          ("stop.grace_period", "4s")]
    assert got["source"]["stop"]["grace_period"] == "4s"
    assert got["source"]["service"]["port"] == 9090
    assert got["config"] == str(cfg)  # still named as given
    # Without --set the command reads the file itself, as before.
    assert parsed(["check", "-c", str(cfg)])["source"] == str(cfg)


@pytest.mark.parametrize("command", cli.READS_CONFIG)
def test_every_command_that_reads_a_config_takes_set_instead_of_a_file(command, monkeypatch):
    monkeypatch.setenv("POD_IP", "127.0.0.1")
    got = parsed([command, "--set", "service.name=web", "--set", "control.listen=${POD_IP}:9",
                  *(["--", "app"] if command == "run" else [])])
    assert got["config"] is None
    assert got["source"] == {"service": {"name": "web"}, "control": {"listen": "${POD_IP}:9"}}
    if command in ("prestop", "status"):  # the control address, from the setting
        assert got["control"] == "127.0.0.1:9"


def test_set_on_a_command_that_reads_no_config_is_one_line(capsys):
    assert cli.main(["--set", "a=1", "schema"]) == 2
    assert one_line(capsys.readouterr().err).startswith(
        "registrar schema: --set sets a configuration key: it is for agent, run")


def test_check_with_settings_alone_and_over_a_file(cfg, tmp_path):
    """The real command: what `registrar inject` writes for a pod with no
    registrar.io/config, and the same settings over a file."""
    token = tmp_path / "token"
    token.write_text("t0k3n-t0k3n-t0k3n-t0k3n\n")
    settings = ["--set", "service.name=web", "--set", "service.port=8080", "--set",
                "stop.grace_period=45s", "--set", "control.listen=${POD_IP}:9901",
                "--set", f"control.token_file={token}"]
    alone = run("check", "--effective", *settings, POD_IP="10.1.2.3", POD_NAME="web-0")
    assert alone.returncode == 0, alone.stderr
    assert one_line(alone.stderr) == ("--set: valid: web/web-0 at 10.1.2.3:8080 with no registry "
                                      "(the stop waits for consumers only)")
    shown = yaml.safe_load(alone.stdout)
    assert shown["stop"]["grace_period"] == "45s" and shown["control"]["listen"] == "10.1.2.3:9901"
    over = run("check", "-c", str(cfg), *settings, POD_IP="10.1.2.3")
    assert over.returncode == 0, over.stderr
    assert one_line(over.stderr) == f"{cfg} and --set: valid: web/web-0 at 127.0.0.1:8080 on etcd"


@pytest.mark.parametrize("setting,expected", [
    ("stop.grace_period=soon", 'config error: stop.grace_period: expected a duration like "10s", '
                               'got "soon"'),
    ("stop.grace=30s", "config error: stop.grace: unknown key (did you mean 'grace_period'?)"),
    ("control=5", "config error: control: expected a mapping, got 5"),
])
def test_a_bad_setting_is_one_line_naming_the_key(cfg, setting, expected):
    proc = run("check", "-c", str(cfg), "--set", setting)
    assert proc.returncode == 2 and proc.stdout == ""
    assert one_line(proc.stderr).startswith(expected), proc.stderr


@pytest.mark.parametrize("value", ["nonsense", "=1", "a..b=1"])
def test_a_setting_that_does_not_parse_is_a_usage_error(value):
    proc = run("check", "--set", value)
    assert proc.returncode == 2
    assert one_line(proc.stderr).startswith("registrar check: argument --set: expected ")


def test_agent_and_prestop_run_on_settings_alone(tmp_path):
    """No file anywhere: the agent of a pod behind a Service, and the exec hook
    `registrar inject` writes, which finds it through the same settings."""
    from registrar_testing import free_ports, wait_until

    app_port, control_port = free_ports(2)
    token = tmp_path / "token"
    token.write_text("t0k3n-t0k3n-t0k3n-t0k3n")
    hook = ["--set", f"control.listen=${{POD_IP}}:{control_port}", "--set",
            f"control.token_file={token}", "--set", "stop.grace_period=5s"]
    env = clean_env(POD_IP="127.0.0.1", POD_NAME="web-0")
    app = subprocess.Popen([sys.executable, "-m", "http.server", str(app_port), "--bind",
                            "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    agent = subprocess.Popen([REGISTRAR, "agent", "--set", "service.name=web", "--set",
                              f"service.port={app_port}", *hook], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        from registrar_testing import http_get

        wait_until(lambda: http_get(f"http://127.0.0.1:{control_port}/readyz", 1)[0] == 200, 20,
                   "the agent's /readyz")
        done = subprocess.run([REGISTRAR, "prestop", *hook], env=env, capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.startswith("stopped after preStop (/prestop)"), done.stdout
        agent.terminate()
        assert agent.wait(timeout=20) == 0, agent.stderr.read()
    finally:
        for proc in (agent, app):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_the_hooks_settings_start_without_yaml_or_msgspec():
    """`registrar inject`'s exec hook: `registrar prestop --set ...`, text
    values and a grace period in seconds. It reads them without PyYAML and
    msgspec (~50 ms of the hook's start-up together)."""
    code = """if True:
        import os, sys
        from registrar import cli, prestop
        from registrar.source import expand
        os.environ["POD_IP"] = "10.0.0.7"
        args = cli._parser().parse_args(["prestop", "--set", "control.listen=${POD_IP}:9901",
                                         "--set", "control.token_file=/run/token",
                                         "--set", "stop.grace_period=45s"])
        cli._resolve(args, os.environ)
        print(args.control, prestop._grace_period(expand(args.source)),
              "yaml" in sys.modules, "msgspec" in sys.modules)
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=clean_env())
    assert done.stdout.split() == ["10.0.0.7:9901", "50", "False", "False"], done.stderr
