"""`registrar inject`: every annotation and every refusal, what is derived and
how it is checked against a known ConfigMap, idempotence, --uninject giving
the input back, the Service-only form, multi-document streams with other
kinds, and the command line (exit codes, one-line errors, standard input).
tests/test_manifests.py runs the shipped inputs through it, and one injected
pod for real."""
from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from registrar import __version__, cli, inject
from registrar.inject import InjectError, Options, inject_pod, inject_stream, uninject_pod

REGISTRAR = str(Path(sys.executable).with_name("registrar"))
TOKEN = "t0k3n-for-the-tests-0123456789abcdefghijk"
SECURE = {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
          "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
AGENT_YAML = {"service": {"name": "web", "port": 8080},
              "backends": [{"type": "etcd", "endpoints": "http://etcd:2379"}]}


def container(name="web", ports=(8080,), **extra) -> dict:
    c = {"name": name, "image": f"registry.example/{name}:1.0"}
    if ports:
        c["ports"] = [{"name": f"p{p}", "containerPort": p} for p in ports]
    c["securityContext"] = copy.deepcopy(SECURE)
    c.update(extra)
    return c


def pod(annotations=None, containers=None, *, inject_value="true", config="web-registrar",
        labels=None, **spec) -> dict:
    """A pod template: annotated for injection, with the ConfigMap named."""
    notes = {"registrar.io/inject": inject_value}
    if config:
        notes["registrar.io/config"] = config
    notes.update(annotations or {})
    return {"metadata": {"labels": labels or {"app": "web"}, "annotations": notes},
            "spec": {"terminationGracePeriodSeconds": 30,
                     "containers": containers or [container()], **spec}}


def config_map(doc=None, name="web-registrar") -> dict:
    text = doc if isinstance(doc, str) else yaml.safe_dump(AGENT_YAML if doc is None else doc)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
            "data": {"agent.yaml": text}}


def injected(p: dict, **kwargs) -> inject.Injected:
    kwargs.setdefault("config_map", config_map() if p["metadata"]["annotations"].get(
        "registrar.io/config") else None)
    return inject_pod(p, Options(token=TOKEN), **kwargs)


def named(items: list[dict], name: str) -> dict:
    (found,) = [i for i in items if i["name"] == name]
    return found


def sets(argv: list[str]) -> dict:
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")


DERIVED = {"stop.grace_period": "30s", "control.listen": "${POD_IP}:9901",
           "control.metrics_listen": "${POD_IP}:9902",
           "control.token_file": "/var/run/registrar/token"}


# -- what is injected, mode by mode --------------------------------------------------------


def test_native_sidecar_is_the_default():
    before = pod()
    kept = copy.deepcopy(before)
    result = injected(before)
    assert before == kept, "the input is not touched"
    assert result.changed and result.warnings == []
    spec = result.pod["spec"]
    (agent,) = spec["initContainers"]
    assert agent == {
        "name": "registrar", "image": f"registry.example/registrar:{__version__}",
        "restartPolicy": "Always",
        "args": ["agent", "--config", "/etc/registrar/agent.yaml", "--log-format", "json",
                 "--set", "service.port=8080",
                 "--set", "stop.grace_period=30s", "--set", "control.listen=${POD_IP}:9901",
                 "--set", "control.metrics_listen=${POD_IP}:9902",
                 "--set", "control.token_file=/var/run/registrar/token"],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}],
        "ports": [{"name": "reg-control", "containerPort": 9901},
                  {"name": "reg-metrics", "containerPort": 9902}],
        "startupProbe": {"httpGet": {"path": "/healthz", "port": 9901}, "periodSeconds": 1,
                         "failureThreshold": 30},
        "resources": {"requests": {"cpu": "20m", "memory": "64Mi"},
                      "limits": {"memory": "128Mi"}},
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "volumeMounts": [
            {"name": "registrar-config", "mountPath": "/etc/registrar", "readOnly": True},
            {"name": "registrar-token", "mountPath": "/var/run/registrar", "readOnly": True}]}
    (app,) = spec["containers"]
    assert app["lifecycle"] == {"preStop": {"httpGet": {
        "path": "/prestop", "port": 9901,
        "httpHeaders": [{"name": "Authorization", "value": f"Bearer {TOKEN}"}]}}}
    assert app["readinessProbe"] == {"httpGet": {"path": "/readyz", "port": 9901},
                                     "periodSeconds": 2}
    assert "env" not in app and "volumeMounts" not in app  # an httpGet hook needs neither
    assert spec["volumes"] == [
        {"name": "registrar-config", "configMap": {
            "name": "web-registrar", "items": [{"key": "agent.yaml", "path": "agent.yaml"}]}},
        {"name": "registrar-token", "downwardAPI": {"items": [{"path": "token", "fieldRef": {
            "fieldPath": "metadata.annotations['registrar.io/token']"}}]}}]
    notes = result.pod["metadata"]["annotations"]
    assert notes["registrar.io/token"] == TOKEN
    assert {k: notes[k] for k in ("prometheus.io/scrape", "prometheus.io/port",
                                  "prometheus.io/path")} == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "9902",
        "prometheus.io/path": "/metrics"}
    assert notes["registrar.io/injected"] == __version__
    assert spec["terminationGracePeriodSeconds"] == 30
    assert list(spec) == ["terminationGracePeriodSeconds", "initContainers", "containers",
                          "volumes"]  # for the reader


def test_sidecar_mode_adds_a_container_and_an_exec_hook():
    result = injected(pod({"registrar.io/mode": "sidecar"}))
    web, agent = result.pod["spec"]["containers"]
    assert "initContainers" not in result.pod["spec"]
    assert agent["name"] == "registrar" and agent["args"][0] == "agent"
    assert "restartPolicy" not in agent and "startupProbe" not in agent
    assert web["lifecycle"]["preStop"] == {"exec": {"command": [
        "registrar", "prestop", "--set", "stop.grace_period=30s",
        "--set", "control.listen=${POD_IP}:9901",
        "--set", "control.token_file=/var/run/registrar/token"]}}
    # The hook's ${POD_IP} and its token file: in the app container too.
    assert web["env"] == [{"name": "POD_IP",
                           "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    assert web["volumeMounts"] == [{"name": "registrar-token", "mountPath": "/var/run/registrar",
                                    "readOnly": True}]
    assert TOKEN not in json.dumps(web)  # read from the file, in no command line


def test_wrapper_mode_puts_registrar_run_before_the_command():
    app = container(command=["web-server", "--port", "$(PORT)"], args=["--verbose"],
                    env=[{"name": "PORT", "value": "8080"}])
    result = injected(pod({"registrar.io/mode": "wrapper"}, [app]))
    assert result.warnings == []
    spec = result.pod["spec"]
    assert "initContainers" not in spec
    (web,) = spec["containers"]
    args = ["--config", "/etc/registrar/agent.yaml", "--log-format", "json",
            "--set", "service.port=8080",
            "--set", "stop.grace_period=30s", "--set", "control.listen=${POD_IP}:9901",
            "--set", "control.metrics_listen=${POD_IP}:9902",
            "--set", "control.token_file=/var/run/registrar/token"]
    # The app's command and args after --, as written ($(PORT) is the kubelet's to expand).
    assert web["command"] == ["registrar", "run", *args, "--", "web-server", "--port", "$(PORT)",
                              "--verbose"]
    assert "args" not in web
    assert [e["name"] for e in web["env"]] == ["PORT", "POD_NAME", "POD_IP", "HOST_IP"]
    assert [p["name"] for p in web["ports"]] == ["p8080", "reg-control", "reg-metrics"]
    # The hook reads what the wrapper reads: with no wrapper answering, it deregisters itself.
    assert web["lifecycle"]["preStop"]["exec"]["command"] == ["registrar", "prestop", *args]
    assert [m["name"] for m in web["volumeMounts"]] == ["registrar-config", "registrar-token"]


def test_wrapper_mode_needs_the_command():
    with pytest.raises(InjectError) as info:
        injected(pod({"registrar.io/mode": "wrapper"}))
    assert str(info.value) == ("container web: wrapper mode needs its command (the image's "
                               "ENTRYPOINT is not known here): write command: [...] in the "
                               "container")


@pytest.mark.parametrize("mode,hook,expected", [
    ("native-sidecar", None, "httpGet"), ("native-sidecar", "exec", "exec"),
    ("sidecar", None, "exec"), ("sidecar", "httpGet", "httpGet"),
    ("wrapper", None, "exec"), ("wrapper", "httpget", "httpGet"),
])
def test_the_hook_follows_the_mode_unless_annotated(mode, hook, expected):
    notes = {"registrar.io/mode": mode, **({"registrar.io/hook": hook} if hook else {})}
    result = injected(pod(notes, [container(command=["web"])]))
    (web,) = [c for c in result.pod["spec"]["containers"] if c["name"] == "web"]
    (kind,) = web["lifecycle"]["preStop"]
    assert kind == expected
    if expected == "exec":
        assert sets(web["lifecycle"]["preStop"]["exec"]["command"])["control.token_file"] == \
            "/var/run/registrar/token"
        assert any(m["name"] == "registrar-token" for m in web["volumeMounts"])
    else:
        assert web["lifecycle"]["preStop"]["httpGet"]["httpHeaders"] == [
            {"name": "Authorization", "value": f"Bearer {TOKEN}"}]


@pytest.mark.parametrize("key,value,expected", [
    ("registrar.io/mode", "daemon", 'registrar.io/mode is "daemon": expected native-sidecar, '
                                    "sidecar or wrapper"),
    ("registrar.io/hook", "tcp", 'registrar.io/hook is "tcp": expected exec or httpGet'),
    ("registrar.io/port", "https", 'registrar.io/port is "https": expected a port number or one '
                                   "of the container web's port names (p8080)"),
    ("registrar.io/port", "70000", 'registrar.io/port is "70000": expected a port number'),
    ("registrar.io/container", "api", 'registrar.io/container is "api": expected one or more of '
                                      "web, comma-separated, each once"),
    ("registrar.io/token", "short", "registrar.io/token must be 16 or more printable ASCII "
                                    "characters, no spaces"),
])
def test_a_bad_annotation_is_refused_in_one_line_saying_what_to_write(key, value, expected):
    with pytest.raises(InjectError) as info:
        injected(pod({key: value}))
    assert str(info.value).startswith(expected) and "\n" not in str(info.value), info.value


def test_an_annotation_that_is_not_text_is_refused():
    p = pod()
    p["metadata"]["annotations"]["registrar.io/inject"] = True  # `inject: true`, unquoted
    with pytest.raises(InjectError) as info:
        injected(p)
    assert str(info.value) == ("registrar.io/inject is true, not text: quote it (annotation "
                               "values are strings)")


def test_a_wrappers_other_held_container_gets_a_hook_of_its_own():
    """Only the wrapped container mounts the config: another named one's exec
    hook finds the wrapper through the settings alone."""
    result = injected(pod({"registrar.io/mode": "wrapper", "registrar.io/container": "web,log"},
                          [container(command=["web"]), container("log", ports=())]))
    web, log = result.pod["spec"]["containers"]
    assert "--config" in web["lifecycle"]["preStop"]["exec"]["command"]
    assert log["lifecycle"]["preStop"]["exec"]["command"] == [
        "registrar", "prestop", "--set", "stop.grace_period=30s",
        "--set", "control.listen=${POD_IP}:9901",
        "--set", "control.token_file=/var/run/registrar/token"]
    assert [e["name"] for e in log["env"]] == ["POD_IP"]
    assert [m["name"] for m in log["volumeMounts"]] == ["registrar-token"]
    assert "command" not in log and "readinessProbe" not in log


def test_the_image_from_the_options_or_the_annotation():
    assert Options().image == f"registry.example/registrar:{__version__}"
    p = pod()
    got = inject_pod(p, Options(image="mirror.example/registrar:9"), config_map=config_map())
    assert got.pod["spec"]["initContainers"][0]["image"] == "mirror.example/registrar:9"
    p["metadata"]["annotations"]["registrar.io/image"] = "own.example/registrar:1"
    got = inject_pod(p, Options(image="mirror.example/registrar:9"), config_map=config_map())
    assert got.pod["spec"]["initContainers"][0]["image"] == "own.example/registrar:1"


# -- the token -------------------------------------------------------------------------------


def test_the_token_is_drawn_once_and_kept():
    first = inject_pod(pod(), config_map=config_map()).pod
    second = inject_pod(pod(), config_map=config_map()).pod
    a, b = (p["metadata"]["annotations"]["registrar.io/token"] for p in (first, second))
    assert a != b and all(len(t) == 43 and t.replace("-", "").replace("_", "").isalnum()
                          for t in (a, b))  # secrets.token_urlsafe(32)
    header = first["spec"]["containers"][0]["lifecycle"]["preStop"]["httpGet"]["httpHeaders"]
    assert header == [{"name": "Authorization", "value": f"Bearer {a}"}]
    # A user's own token is used and kept by --uninject.
    own = pod({"registrar.io/token": "my-own-token-of-twenty-chars"})
    result = injected(own)
    assert "my-own-token-of-twenty-chars" in json.dumps(result.pod["spec"])
    assert uninject_pod(result.pod).pod == own


# -- which container, which port ------------------------------------------------------------


def test_several_containers_need_the_serving_one_named():
    two = [container("web"), container("proxy", ports=(15001,))]
    with pytest.raises(InjectError) as info:
        injected(pod(None, two))
    assert str(info.value).startswith("2 containers (web, proxy): name the one that serves in "
                                      "registrar.io/container")
    result = injected(pod({"registrar.io/container": "web"}, copy.deepcopy(two)))
    web, proxy = result.pod["spec"]["containers"]
    assert "lifecycle" in web and "readinessProbe" in web
    assert "lifecycle" not in proxy and "readinessProbe" not in proxy
    # Named too: held by the hook until the pod is out (the probe stays on the first).
    # The first serves: its one port is service.port, which agent.yaml must not contradict.
    with pytest.raises(InjectError, match="the container proxy's one port is 15001 but "):
        injected(pod({"registrar.io/container": "proxy, web"}, copy.deepcopy(two)))
    result = injected(pod({"registrar.io/container": "proxy, web"}, copy.deepcopy(two)),
                      config_map=config_map({"service": {"name": "web", "port": 15001},
                                             "backends": []}))
    web, proxy = result.pod["spec"]["containers"]
    assert web["lifecycle"] == proxy["lifecycle"]
    assert "readinessProbe" in proxy and "readinessProbe" not in web
    # service.port: the first named container's (agent.yaml may leave it out).
    result = injected(pod({"registrar.io/container": "proxy,web"}, copy.deepcopy(two)),
                      config_map=config_map({"service": {"name": "web"}, "backends": []}))
    assert sets(result.pod["spec"]["initContainers"][0]["args"])["service.port"] == "15001"


def test_the_port_comes_from_the_annotation_the_one_container_port_or_agent_yaml():
    no_port = {"service": {"name": "web"}, "backends": [{"type": "etcd"}]}

    def args(r):
        return sets(r.pod["spec"]["initContainers"][0]["args"])

    # The pod says it: set, whether agent.yaml says it too (the same) or not,
    # so that the webhook, which sees no ConfigMap, writes the same pod.
    assert args(injected(pod()))["service.port"] == "8080"
    assert args(injected(pod(), config_map=None))["service.port"] == "8080"
    # The container's one port, or the annotation (a number or a name).
    assert args(injected(pod(), config_map=config_map(no_port)))["service.port"] == "8080"
    ports = [container(ports=(8080, 8443))]
    assert args(injected(pod({"registrar.io/port": "p8443"}, ports),
                         config_map=config_map(no_port)))["service.port"] == "8443"
    assert args(injected(pod({"registrar.io/port": "9000"}, ports),
                         config_map=config_map(no_port)))["service.port"] == "9000"
    with pytest.raises(InjectError) as info:
        injected(pod(None, ports), config_map=config_map(no_port))
    assert str(info.value) == ("which port does the app serve? The container web declares "
                               "8080, 8443: give registrar.io/port (or service.port in "
                               "agent.yaml)")
    # The pod does not say it: left to agent.yaml, known or not (the webhook).
    assert "service.port" not in args(injected(pod(None, ports), config_map=None))
    assert "service.port" not in args(injected(pod(None, ports)))


def test_a_port_annotation_that_disagrees_with_agent_yaml_is_refused():
    with pytest.raises(InjectError) as info:
        injected(pod({"registrar.io/port": "9090"}))
    assert str(info.value) == ("registrar.io/port is 9090 but agent.yaml says service.port "
                               "8080; remove service.port from agent.yaml (registrar derives "
                               "it) or give registrar.io/port")
    # So is the container's one port: the webhook would set it over agent.yaml's.
    with pytest.raises(InjectError) as info:
        injected(pod(None, [container(ports=(9090,))]))
    assert str(info.value).startswith("the container web's one port is 9090 but agent.yaml "
                                      "says service.port 8080; ")
    # Two ports, neither agent.yaml's: said, not refused (agent.yaml's is used).
    result = injected(pod(None, [container(ports=(9090, 9091))]))
    assert result.warnings == ["agent.yaml says service.port 8080 but the container web "
                               "declares 9090, 9091"]


# -- the grace period, the control server: agreeing by construction --------------------------


@pytest.mark.parametrize("pod_grace,file_grace,expected", [
    (30, None, 30), (45, None, 45), (None, None, 30), (None, "45s", 45), (None, "1m", 60),
    (45, "45s", 45), (120, "2m", 120),
])
def test_the_grace_period_is_written_once_and_derived(pod_grace, file_grace, expected):
    p = pod(terminationGracePeriodSeconds=pod_grace)
    if pod_grace is None:
        del p["spec"]["terminationGracePeriodSeconds"]
    doc = copy.deepcopy(AGENT_YAML)
    if file_grace:
        doc["stop"] = {"grace_period": file_grace}
    result = injected(p, config_map=config_map(doc))
    spec = result.pod["spec"]
    assert spec["terminationGracePeriodSeconds"] == expected
    assert sets(spec["initContainers"][0]["args"])["stop.grace_period"] == f"{expected}s"
    assert uninject_pod(result.pod).pod == p  # a derived grace period goes with --uninject


@pytest.mark.parametrize("pod_grace,file_grace,expected", [
    (30, "45s", "agent.yaml says stop.grace_period 45s but terminationGracePeriodSeconds is 30; "
                "remove one (registrar derives the other)"),
    (None, "45500ms", "agent.yaml says stop.grace_period 45.5s, and "
                      "terminationGracePeriodSeconds takes whole seconds: write it in the pod "
                      "instead"),
    (None, "soon", 'ConfigMap web-registrar: agent.yaml: stop.grace_period: expected a duration '
                   'like "10s", got "soon"'),
    ("30", None, 'terminationGracePeriodSeconds is "30": expected a whole number of seconds'),
])
def test_grace_periods_that_cannot_agree_are_refused(pod_grace, file_grace, expected):
    p = pod()
    if pod_grace is None:
        del p["spec"]["terminationGracePeriodSeconds"]
    else:
        p["spec"]["terminationGracePeriodSeconds"] = pod_grace
    doc = {**AGENT_YAML, **({"stop": {"grace_period": file_grace}} if file_grace else {})}
    with pytest.raises(InjectError) as info:
        injected(p, config_map=config_map(doc))
    assert str(info.value) == expected


@pytest.mark.parametrize("control,expected", [
    ({"listen": "127.0.0.1:9901"}, 'agent.yaml says control.listen "127.0.0.1:9901" but the '
                                   "injected pod needs ${POD_IP}:9901 (where the kubelet's probes "
                                   "and hooks go); remove it from agent.yaml"),
    ({"metrics_listen": "${POD_IP}:9100"}, 'agent.yaml says control.metrics_listen '
                                           '"${POD_IP}:9100" but the injected pod needs '
                                           "${POD_IP}:9902 (what the prometheus.io/port "
                                           "annotation names); remove it from agent.yaml"),
    ({"token_file": "/secrets/token"}, 'agent.yaml says control.token_file "/secrets/token" '
                                       "but the injected pod needs /var/run/registrar/token (the "
                                       "registrar.io/token annotation, mounted); remove it from "
                                       "agent.yaml"),
    ({"listen": None, "metrics_listen": "${POD_IP}:9902"}, None),  # null: not said
    ({"listen": "${POD_IP}:9901", "linger": "2s"}, None),  # the same, and what is not ours
])
def test_a_control_setting_that_disagrees_is_refused(control, expected):
    doc = {**AGENT_YAML, "control": control}
    if expected is None:
        assert injected(pod(), config_map=config_map(doc)).changed
        return
    with pytest.raises(InjectError) as info:
        injected(pod(), config_map=config_map(doc))
    assert str(info.value) == expected


@pytest.mark.parametrize("text,expected", [
    ("service: {name: web, port: 8080\n", "ConfigMap web-registrar: agent.yaml: invalid YAML "
                                          "(line 2, column 1): expected ',' or '}', but got "
                                          "'<stream end>'"),
    (yaml.safe_dump({**AGENT_YAML, "stop": {"grace": "30s"}}),
     "ConfigMap web-registrar: agent.yaml with the derived settings: stop.grace: unknown key "
     "(did you mean 'grace_period'?)"),
    (yaml.safe_dump({"service": {"name": "web", "port": 8080},
                     "backends": [{"type": "etcd", "endpoints": "${ETCD_ENDPOINTS}"}]}),
     "ConfigMap web-registrar: agent.yaml with the derived settings: backends[0].endpoints: "
     "environment variable ETCD_ENDPOINTS is not set (write ${ETCD_ENDPOINTS:-default} to give "
     "a default)"),
    (yaml.safe_dump({**AGENT_YAML, "stop": {"safety_margin": "30s"}}),
     "ConfigMap web-registrar: agent.yaml with the derived settings: stop.safety_margin: 30s "
     "leaves nothing of grace_period 30s"),
    ("- a list\n", "ConfigMap web-registrar: agent.yaml: the configuration must be a mapping"),
])
def test_a_known_agent_yaml_is_validated_with_the_derived_settings(text, expected):
    with pytest.raises(InjectError) as info:
        injected(pod(), config_map=config_map(text))
    assert str(info.value) == expected


def test_a_config_map_without_agent_yaml_is_refused():
    cm = config_map()
    cm["data"] = {"config.yaml": "x"}
    with pytest.raises(InjectError, match=r"^ConfigMap web-registrar has no agent.yaml"):
        injected(pod(), config_map=cm)


def test_a_backend_not_installed_here_is_a_warning_not_a_refusal():
    doc = {"service": {"name": "web", "port": 8080}, "backends": [{"type": "nacos"}]}
    result = injected(pod(), config_map=config_map(doc))
    assert result.changed
    (warning,) = result.warnings
    assert warning.startswith("ConfigMap web-registrar: agent.yaml with the derived settings: "
                              "not checked: backends[0].type: "), warning


# -- no registry: the Service-only form ------------------------------------------------------


@pytest.mark.parametrize("labels,name", [({"app": "shop"}, "shop"),
                                         ({"app.kubernetes.io/name": "cart", "app": "x"}, "cart"),
                                         ({"tier": "front"}, "web")])
def test_without_a_config_map_the_agent_gets_everything_from_set(labels, name):
    result = injected(pod(config=None, labels=labels))
    spec = result.pod["spec"]
    (agent,) = spec["initContainers"]
    assert agent["args"][:3] == ["agent", "--log-format", "json"]  # no --config
    assert sets(agent["args"]) == {"service.name": name, "service.port": "8080", **DERIVED}
    assert [m["name"] for m in agent["volumeMounts"]] == ["registrar-token"]
    assert [v["name"] for v in spec["volumes"]] == ["registrar-token"]


def test_without_a_config_map_the_port_must_be_known():
    with pytest.raises(InjectError) as info:
        injected(pod(config=None, containers=[container(ports=())]))
    assert str(info.value) == ("which port does the app serve? The container web declares no "
                               "containerPort: give registrar.io/port")


# -- what is kept, and what is said ---------------------------------------------------------


def test_an_existing_prestop_hook_is_replaced_and_said_and_uninject_restores_it():
    app = container(lifecycle={"preStop": {"sleep": {"seconds": 5}}, "postStart": {
        "exec": {"command": ["true"]}}})
    before = pod(None, [app])
    result = injected(before)
    (web,) = result.pod["spec"]["containers"]
    assert "httpGet" in web["lifecycle"]["preStop"]
    assert web["lifecycle"]["postStart"] == {"exec": {"command": ["true"]}}
    assert result.warnings == ["container web: its preStop hook (sleep 5s) is replaced by "
                               "registrar's (--uninject restores it)"]
    assert uninject_pod(result.pod).pod == before


def test_an_apps_own_readiness_probe_is_kept_and_said():
    probe = {"httpGet": {"path": "/health", "port": 8080}}
    result = injected(pod(None, [container(readinessProbe=probe)]))
    assert result.pod["spec"]["containers"][0]["readinessProbe"] == probe
    (warning,) = result.warnings
    assert warning.startswith("container web: its own readinessProbe is kept, so registrar's "
                              "/readyz (port 9901")


def test_prometheus_annotations_already_there_are_kept_and_a_port_of_the_apps_said():
    result = injected(pod({"prometheus.io/scrape": "true", "prometheus.io/port": "8080"}))
    notes = result.pod["metadata"]["annotations"]
    assert (notes["prometheus.io/port"], notes["prometheus.io/path"]) == ("8080", "/metrics")
    assert result.warnings == ['prometheus.io/port is "8080": kept, so registrar\'s metrics '
                               "(port 9902, reg-metrics) are not scraped through the "
                               "annotations; use a PodMonitor for both"]


def test_containers_that_fail_restricted_are_said_not_changed():
    app = container()
    del app["securityContext"]
    init = {"name": "migrate", "image": "x", "securityContext": {
        **SECURE, "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_BIND_SERVICE"]}}}
    result = injected(pod(None, [app], initContainers=[init]))
    assert result.warnings == [
        'container migrate would fail Pod Security "restricted" (capabilities.add has NET_ADMIN): '
        "not changed",
        'container web would fail Pod Security "restricted" (allowPrivilegeEscalation is not '
        "false; capabilities.drop lacks ALL; runAsNonRoot is not true; seccompProfile is not "
        "RuntimeDefault or Localhost): not changed"]
    assert "securityContext" not in named(result.pod["spec"]["containers"], "web")
    # Pod-level settings count: these containers pass through the pod's own.
    bare = container()
    bare["securityContext"] = {"allowPrivilegeEscalation": False,
                               "capabilities": {"drop": ["ALL"]}}
    ok = injected(pod(None, [bare], securityContext={
        "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}))
    assert ok.warnings == []


@pytest.mark.parametrize("spec,expected", [
    ({"hostNetwork": True}, 'hostNetwork: true fails Pod Security "restricted" (and puts ports '
                            "9901/9902 on the node)"),
    ({"securityContext": {"runAsUser": 0}}, "the pod's securityContext runs as root: "
                                            "registrar's container (runAsNonRoot) would not "
                                            "start; not changed"),
    ({"volumes": [{"name": "logs", "hostPath": {"path": "/var/log"}}]},
     'volumes logs: a type Pod Security "restricted" does not allow'),
])
def test_pod_level_settings_are_said_not_changed(spec, expected):
    result = injected(pod(None, None, **spec))
    assert expected in result.warnings, result.warnings
    for key, value in spec.items():
        if key != "volumes":
            assert result.pod["spec"][key] == value


@pytest.mark.parametrize("p,expected", [
    (pod(None, [container(), container("registrar", ports=())]),
     "2 containers (web, registrar)"),  # the annotation is asked for first
    (pod({"registrar.io/container": "web"}, [container(), container("registrar", ports=())]),
     "a container is already named 'registrar', the agent's name: rename it"),
    (pod(None, [container(ports=(8080, 9901))]),
     "container web uses port 9901, which registrar's control server needs (9901 and 9902)"),
    (pod(None, None, volumes=[{"name": "registrar-token", "emptyDir": {}}]),
     "a volume is already named 'registrar-token', which registrar mounts: rename it"),
    (pod({"registrar.io/mode": "sidecar"}, [container(env=[{"name": "POD_IP", "value": "x"}])]),
     "container web: env POD_IP is not the Downward API's status.podIP, which registrar reads: "
     "rename yours"),
    ({"metadata": {"annotations": {"registrar.io/inject": "true"}}, "spec": {}},
     "no spec.containers with names: not a pod template"),
])
def test_what_would_collide_is_refused(p, expected):
    with pytest.raises(InjectError) as info:
        injected(p)
    assert str(info.value).startswith(expected), info.value


# -- not annotated, already injected, uninjected ---------------------------------------------


@pytest.mark.parametrize("value,warnings", [
    (None, []), ("false", []), ("", []),
    ("yes", ['registrar.io/inject is "yes": not "true", "required" or "false": not injected'])])
def test_a_pod_not_annotated_comes_back_unchanged(value, warnings):
    p = pod()
    if value is None:
        del p["metadata"]["annotations"]["registrar.io/inject"]
    else:
        p["metadata"]["annotations"]["registrar.io/inject"] = value
    result = injected(p)
    assert (result.pod, result.changed, result.warnings) == (p, False, warnings)
    assert uninject_pod(p).pod == p and not uninject_pod(p).changed


def test_required_is_injected_like_true_offline():
    assert injected(pod(inject_value="required")).pod["spec"] == injected(pod()).pod["spec"]


#: Pods covering every path through the injection, for the round trip.
VARIANTS = {
    "native": pod(),
    "native-exec": pod({"registrar.io/hook": "exec"}),
    "sidecar": pod({"registrar.io/mode": "sidecar"}),
    "sidecar-httpget": pod({"registrar.io/mode": "sidecar", "registrar.io/hook": "httpGet"}),
    "wrapper": pod({"registrar.io/mode": "wrapper"}, [container(
        command=["web"], args=["--port", "8080"], env=[{"name": "A", "value": "1"}],
        volumeMounts=[{"name": "data", "mountPath": "/data"}])],
        volumes=[{"name": "data", "emptyDir": {}}]),
    "wrapper-httpget": pod({"registrar.io/mode": "wrapper", "registrar.io/hook": "httpGet"},
                           [container(command=["web"])]),
    "service-only": pod(config=None),
    "two-held": pod({"registrar.io/container": "web,proxy", "registrar.io/mode": "sidecar"},
                    [container(), container("proxy", ports=(15001,), env=[
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {
                            "fieldPath": "status.podIP"}}}])]),
    "no-grace-with-hook": {
        "metadata": {"annotations": {"registrar.io/inject": "true"}},
        "spec": {"containers": [container(lifecycle={"preStop": {"exec": {
            "command": ["sleep", "5"]}}})], "initContainers": [container("init", ports=())]}},
    "with-prometheus": pod({"prometheus.io/scrape": "true", "prometheus.io/port": "8080"}),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_uninject_gives_the_input_back_exactly(name):
    before = VARIANTS[name]
    result = injected(before)
    assert result.changed and result.pod != before
    back = uninject_pod(result.pod)
    assert back.changed and back.warnings == []
    assert back.pod == before
    # Through YAML, as the command line does.
    text, _ = inject_stream(yaml.safe_dump({"kind": "Pod", "apiVersion": "v1", **result.pod}),
                            uninject=True)
    assert {k: v for k, v in yaml.safe_load(text).items() if k in before} == before


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_injecting_an_injected_pod_changes_nothing(name):
    once = injected(VARIANTS[name]).pod
    again = inject_pod(once, Options(), config_map=config_map())
    assert (again.pod, again.changed, again.warnings) == (once, False, [])


def test_an_injected_pod_whose_annotations_changed_says_so():
    once = injected(pod()).pod
    once["metadata"]["annotations"]["registrar.io/mode"] = "sidecar"
    again = injected(once)
    assert not again.changed and again.pod == once
    assert again.warnings == ["registrar.io/mode changed since the pod was injected: not "
                              "injected again (--uninject, then inject, to apply them)"]
    once["metadata"]["annotations"]["registrar.io/injected"] = "0.0.1"
    assert injected(once).warnings[0] == (f"injected by registrar 0.0.1, this is {__version__}: "
                                          "not injected again (--uninject, then inject, to "
                                          "update it)")


def test_uninject_after_an_edit_restores_what_it_can_and_says_the_rest():
    result = injected(VARIANTS["sidecar"]).pod
    result["spec"]["containers"] = [c for c in result["spec"]["containers"]
                                    if c["name"] != "registrar"]  # edited out by hand
    back = uninject_pod(result)
    assert back.pod == VARIANTS["sidecar"]
    assert back.warnings == ["spec.containers.name=registrar: not restored (name=registrar is "
                             "gone): edited since it was injected?"]


def test_uninject_refuses_a_record_it_cannot_read():
    result = injected(pod()).pod
    result["metadata"]["annotations"]["registrar.io/uninject"] = "{not json"
    with pytest.raises(InjectError, match=r"^registrar.io/uninject is missing or not the record"):
        uninject_pod(result)


# -- streams ---------------------------------------------------------------------------------


def _workload(kind: str, name: str, template: dict) -> dict:
    if kind == "CronJob":
        return {"apiVersion": "batch/v1", "kind": kind, "metadata": {"name": name},
                "spec": {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": template}}}}
    if kind == "Pod":
        return {"apiVersion": "v1", "kind": kind,
                "metadata": {"name": name, **template["metadata"]}, "spec": template["spec"]}
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name},
            "spec": {"template": template}}


def test_a_stream_keeps_its_order_and_passes_other_kinds_through():
    job = pod(restartPolicy="Never")
    docs = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}},
        _workload("Deployment", "web", pod()),
        config_map(),
        {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
         "spec": {"template": pod()}},  # not a pod template's kind: untouched
        _workload("StatefulSet", "db", pod()),
        _workload("DaemonSet", "agent", pod()),
        _workload("Job", "once", copy.deepcopy(job)),
        _workload("CronJob", "often", copy.deepcopy(job)),
        _workload("Pod", "bare", pod()),
        {"apiVersion": "v1", "kind": "List", "items": [_workload("ReplicaSet", "rs", pod())]},
        _workload("Deployment", "plain", pod(inject_value="false")),
    ]
    text, warnings = inject_stream(yaml.safe_dump_all(docs), Options(token=TOKEN))
    out = list(yaml.safe_load_all(text))
    assert [d["kind"] for d in out] == [d["kind"] for d in docs]
    assert warnings == []
    for before, after in zip(docs, out, strict=True):
        changed = before != after
        assert changed == (before["kind"] not in ("Service", "ConfigMap", "Widget") and
                           before.get("metadata", {}).get("name") != "plain"), before["kind"]
    templates = [out[1]["spec"]["template"], out[4]["spec"]["template"],
                 out[5]["spec"]["template"], out[6]["spec"]["template"],
                 out[7]["spec"]["jobTemplate"]["spec"]["template"], out[8],
                 out[9]["items"][0]["spec"]["template"]]
    for template in templates:
        assert template["spec"]["initContainers"][0]["name"] == "registrar"
        assert template["metadata"]["annotations"]["registrar.io/token"] == TOKEN
    # Uninjected, the stream is the input again.
    back, _ = inject_stream(text, uninject=True)
    assert list(yaml.safe_load_all(back)) == docs


def test_a_stream_finds_the_config_map_by_name_and_says_when_it_is_not_there():
    deployment = _workload("Deployment", "web", pod())
    text = yaml.safe_dump_all([deployment, config_map({**AGENT_YAML, "stop": {"grace": 1}})])
    with pytest.raises(InjectError) as info:
        inject_stream(text)
    assert str(info.value) == ("Deployment/web: ConfigMap web-registrar: agent.yaml with the "
                               "derived settings: stop.grace: unknown key (did you mean "
                               "'grace_period'?)")
    _, warnings = inject_stream(yaml.safe_dump(deployment))
    assert warnings == ["Deployment/web: ConfigMap web-registrar is not in the input: its "
                        "agent.yaml was not checked"]
    # A ConfigMap of another namespace is another ConfigMap.
    elsewhere = config_map()
    elsewhere["metadata"]["namespace"] = "prod"
    deployment["metadata"]["namespace"] = "staging"
    _, warnings = inject_stream(yaml.safe_dump_all([elsewhere, deployment]))
    assert warnings == ["Deployment/web: ConfigMap web-registrar is not in the input: its "
                        "agent.yaml was not checked"]


def test_a_regular_sidecar_in_a_job_is_said():
    job = _workload("Job", "once", pod({"registrar.io/mode": "sidecar"}, restartPolicy="Never"))
    _, warnings = inject_stream(yaml.safe_dump_all([job, config_map()]))
    assert warnings == ["Job/once: a regular sidecar never exits, so a Job's pod would never "
                        "complete: use registrar.io/mode: native-sidecar"]


def test_multi_line_text_stays_readable():
    text, _ = inject_stream(yaml.safe_dump_all([config_map(), _workload("Deployment", "web",
                                                                        pod())]))
    assert "agent.yaml: |\n" in text  # a literal block, not a quoted string of \n


# -- the command line ------------------------------------------------------------------------


def run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRAR_")}
    return subprocess.run([REGISTRAR, "inject", *argv], input=stdin, capture_output=True,
                          text=True, timeout=60, env=env)


@pytest.fixture
def stream(tmp_path) -> Path:
    path = tmp_path / "in.yaml"
    path.write_text("# a comment PyYAML drops\n" + yaml.safe_dump_all(
        [config_map(), _workload("Deployment", "web", pod())]))
    return path


def test_the_command_injects_a_file_and_standard_input_alike(stream):
    by_file = run(str(stream))
    assert by_file.returncode == 0 and by_file.stderr == "", by_file.stderr
    docs = list(yaml.safe_load_all(by_file.stdout))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Deployment"]
    assert docs[1]["spec"]["template"]["spec"]["initContainers"][0]["name"] == "registrar"

    def first(text):
        return list(yaml.safe_load_all(text))[0]

    for argv in ([], ["-"]):
        by_stdin = run(*argv, stdin=stream.read_text())
        assert by_stdin.returncode == 0, by_stdin.stderr
        # The same but for the token, drawn for each run.
        assert first(by_stdin.stdout) == first(by_file.stdout)
    assert "# a comment" not in by_file.stdout  # said in --help


def test_the_command_writes_the_output_file_and_uninjects(stream, tmp_path):
    out = tmp_path / "out.yaml"
    done = run(str(stream), "-o", str(out), "--image", "mirror.example/registrar:2")
    assert done.returncode == 0 and done.stdout == "", done.stderr
    injected_docs = list(yaml.safe_load_all(out.read_text()))
    assert injected_docs[1]["spec"]["template"]["spec"]["initContainers"][0]["image"] == \
        "mirror.example/registrar:2"
    back = run("--uninject", str(out))
    assert back.returncode == 0
    assert list(yaml.safe_load_all(back.stdout)) == list(yaml.safe_load_all(stream.read_text()))
    assert run(str(out)).stdout == out.read_text()  # injected already: unchanged


def test_a_pod_that_cannot_be_injected_is_one_line_exit_2_and_nothing_written(tmp_path):
    path = tmp_path / "in.yaml"
    path.write_text(yaml.safe_dump_all([config_map(), _workload(
        "Deployment", "web", pod({"registrar.io/mode": "wrapper"}))]))
    out = tmp_path / "out.yaml"
    done = run(str(path), "-o", str(out))
    assert done.returncode == 2 and done.stdout == "" and not out.exists()
    assert done.stderr == ("registrar inject: Deployment/web: container web: wrapper mode needs "
                           "its command (the image's ENTRYPOINT is not known here): write "
                           "command: [...] in the container\n")
    assert list(tmp_path.iterdir()) == [path]  # no partial file either


@pytest.mark.parametrize("text,argv,expected", [
    ("kind: [\n", [], "registrar inject: standard input: invalid YAML (line 2, column 1): "
                      "expected the node content, but found '<stream end>'\n"),
    (None, ["/no/such/file.yaml"], "registrar inject: cannot read /no/such/file.yaml: "
                                   "No such file or directory\n"),
    (None, ["--set", "a=1"], "registrar: unrecognized arguments: --set (see registrar "
                             "--help)"),
])
def test_the_command_refuses_in_one_line(text, argv, expected):
    done = run(*argv, stdin=text or "")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(expected.rstrip("\n")) and done.stderr.count("\n") == 1, \
        done.stderr


def test_warnings_go_to_stderr_one_line_each(tmp_path):
    app = container()
    del app["securityContext"]
    path = tmp_path / "in.yaml"
    path.write_text(yaml.safe_dump(_workload("Deployment", "web", pod(None, [app]))))
    done = run(str(path))
    assert done.returncode == 0 and done.stdout
    assert done.stderr.splitlines() == [
        "registrar inject: warning: Deployment/web: ConfigMap web-registrar is not in the "
        "input: its agent.yaml was not checked",
        'registrar inject: warning: Deployment/web: container web would fail Pod Security '
        '"restricted" (allowPrivilegeEscalation is not false; capabilities.drop lacks ALL; '
        "runAsNonRoot is not true; seccompProfile is not RuntimeDefault or Localhost): not "
        "changed"]


def test_inject_is_imported_only_when_used():
    """The core starts fast: `registrar --help` and `prestop` never import it."""
    code = ("import sys; from registrar import cli; cli._parser(); "
            "print('registrar.inject' in sys.modules, 'yaml' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.split() == ["False", "False"]


def test_every_annotation_is_in_the_help():
    text = cli._parser()._subparsers._group_actions[0].choices["inject"].format_help()
    for key in (inject.INJECT, inject.CONFIG, inject.MODE, inject.CONTAINER, inject.PORT,
                inject.HOOK, inject.IMAGE, inject.TOKEN):
        assert key in text
    assert "PyYAML" in text and "comments" in text


def test_many_variants_through_the_stream_round_trip():
    """Every mode and hook, with and without the ConfigMap, a grace period or
    not: injected, valid YAML; uninjected, the input."""
    for mode, hook, with_config, grace in itertools.product(
            inject.MODES, (None, *inject.HOOKS), (True, False), (None, 45)):
        notes = {"registrar.io/mode": mode, **({"registrar.io/hook": hook} if hook else {})}
        p = pod(notes, [container(command=["web"])], config="web-registrar" if with_config
                else None)
        p["spec"]["terminationGracePeriodSeconds"] = grace
        if grace is None:
            del p["spec"]["terminationGracePeriodSeconds"]
        docs = [_workload("Deployment", "web", p)] + ([config_map()] if with_config else [])
        text, _ = inject_stream(yaml.safe_dump_all(docs))
        out = list(yaml.safe_load_all(text))
        spec = out[0]["spec"]["template"]["spec"]
        assert spec["terminationGracePeriodSeconds"] == (30 if grace is None else grace)
        back, _ = inject_stream(text, uninject=True)
        assert list(yaml.safe_load_all(back)) == docs, (mode, hook, with_config, grace)


# -- docs/kubernetes.md, under test -----------------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "kubernetes.md"


def _doc_blocks(lang: str) -> list[str]:
    """The page's fenced blocks of one language ("" for none), in order."""
    import re

    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", DOC.read_text(), re.S | re.M)
    return [body for tag, body in blocks if tag == lang]


def _table_keys(heading: str) -> list[str]:
    section = DOC.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return [line.split("|")[1].strip().strip("`") for line in section.splitlines()
            if line.startswith("| `")]


def test_the_docs_annotation_table_is_the_codes():
    assert _table_keys("Annotations") == [inject.INJECT, inject.CONFIG, inject.MODE,
                                          inject.CONTAINER, inject.PORT, inject.HOOK,
                                          inject.IMAGE, inject.TOKEN]


def test_the_docs_derived_table_is_what_inject_sets():
    p = pod(config=None)
    args = injected(p).pod["spec"]["initContainers"][0]["args"]
    assert sorted(_table_keys("What is derived")) == sorted(sets(args))
    assert {k: v for k, v in sets(args).items() if k in DERIVED} == DERIVED


def test_the_docs_example_injects_and_its_error_line_is_the_real_one(tmp_path):
    (example,) = _doc_blocks("yaml")
    path = tmp_path / "web.yaml"
    path.write_text(example)
    done = run(str(path))
    assert done.returncode == 0, done.stderr
    docs = list(yaml.safe_load_all(done.stdout))
    assert docs[1]["spec"]["template"]["spec"]["initContainers"][0]["name"] == "registrar"
    # The refusal the page shows, from the same example made to disagree.
    docs = list(yaml.safe_load_all(example))
    docs[0]["data"]["agent.yaml"] += "stop: {grace_period: 45s}\n"
    docs[1]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30
    path.write_text(yaml.safe_dump_all(docs))
    done = run(str(path))
    (shown,) = [b for b in _doc_blocks("") if b.startswith("registrar inject: ")]
    assert done.returncode == 2 and done.stderr == shown


def test_the_docs_set_example_runs():
    (command,) = [b for b in _doc_blocks("sh") if "--set" in b and "check" in b]
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRAR_")}
    # `registrar` as the docs write it: this Python's, whether or not its venv is on PATH.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=60,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert "--set: valid: web/" in done.stderr and "at 10.0.0.7:8080 with no registry" in \
        done.stderr
