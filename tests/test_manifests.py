"""The Kubernetes manifests in config/k8s/, one per way of use: valid Kubernetes
(``kubernetes-validate --strict``) for 1.29, where native sidecars begin, and for
the newest version the installed kubernetes-validate knows; the configuration
each pod mounts passes registrar's own validation and the real `registrar
check`, with the pod's own environment; and the probes, hooks, ports, token,
metrics annotations and grace period agree with it. The library manifest's app
runs for real against etcd. Everything here works offline: the API schemas
ship inside kubernetes-validate."""
from __future__ import annotations

import copy
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml
from registrar_testing import http_get, wait_until

from registrar import cli, config
from registrar.fields import format_duration
from registrar.source import parse_listen
from registrar.traffic import default_ignored

K8S = Path(__file__).resolve().parent.parent / "config" / "k8s"
REGISTRAR = str(Path(sys.executable).with_name("registrar"))

#: Every manifest and its way of use; a manifest added or removed must show here.
MODES = {"sidecar.yaml": "sidecar", "native-sidecar.yaml": "native-sidecar",
         "wrapper.yaml": "wrapper", "wrapper-httpget.yaml": "wrapper",
         "library.yaml": "library",
         "service-wrapper.yaml": "wrapper", "service-native-sidecar.yaml": "native-sidecar"}
#: No registry: a pod behind a Kubernetes Service only (issue 28).
SERVICE_ONLY = {"service-wrapper.yaml", "service-native-sidecar.yaml"}
#: The kinds each file holds: a Secret wherever a control server needs a token.
KINDS = {"library.yaml": ["ConfigMap", "Deployment"],
         **{name: ["Secret", "ConfigMap", "Service", "Deployment"] for name in SERVICE_ONLY}}
#: What the Downward API gives in the tests (fieldPath -> value).
FIELDS = {"metadata.name": "web-5d8f7c6b9-x2x7q", "status.podIP": "10.244.0.9",
          "status.hostIP": "192.0.2.10"}
#: Resident memory of `registrar agent` / `run` with the etcd backend once
#: /metrics was scraped (measured 2026-11-26): a request below it is an OOM risk.
MEASURED_RSS = 48.5 * 2**20
#: Kubernetes' first version with native sidecars on by default.
OLDEST = "1.29"


def _documents(path: Path) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert [d["kind"] for d in docs] == KINDS.get(path.name, ["Secret", "ConfigMap", "Deployment"])
    return {d["kind"]: d for d in docs}


def _kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed (pip install kubernetes-validate; "
                    "it is in the test extra)")
    return kubernetes_validate


def test_every_manifest_is_covered():
    assert sorted(p.name for p in K8S.glob("*.y*ml")) == sorted(MODES)


@pytest.mark.parametrize("name", sorted(MODES))
def test_manifest_is_valid_kubernetes(name):
    """--strict: an unknown or misplaced field (a typo, restartPolicy on an init
    container before 1.29) is an error, not silently dropped by the API server."""
    kv = _kubernetes_validate()
    newest = kv.latest_version()
    for version in (OLDEST, newest):
        for doc in _documents(K8S / name).values():
            try:
                used = kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{name}: {doc['kind']} is not valid for Kubernetes {version}: "
                            f"{where}: {exc.message}")
            # The schemas of that version, not an older fallback.
            assert used == ".".join(version.split(".")[:2]), (name, version, used)


def test_strict_validation_refuses_an_unknown_field():
    """The check above can fail: a misspelt field is refused."""
    kv = _kubernetes_validate()
    deployment = copy.deepcopy(_documents(K8S / "wrapper.yaml")["Deployment"])
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30  # ...Seconds
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, OLDEST, strict=True)


# -- the pod as the kubelet would run it ----------------------------------------


def _env(container: dict) -> dict[str, str]:
    """The container's environment: literal values with $(VAR) expanded from
    earlier entries, as Kubernetes does, and the Downward API's fields."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]),
                                        entry["value"])
        else:
            env[entry["name"]] = FIELDS[entry["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def _files(container: dict, pod: dict, docs: dict) -> dict[str, str]:
    """Path -> content of every file the container gets from the ConfigMap and
    the Secret of this manifest."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    files = {}
    for mount in container.get("volumeMounts", []):
        assert mount["name"] in volumes, f"{container['name']}: no volume {mount['name']!r}"
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            source, data = volume["configMap"], docs["ConfigMap"]["data"]
            assert source["name"] == docs["ConfigMap"]["metadata"]["name"]
        else:
            source, data = volume["secret"], docs["Secret"]["stringData"]
            assert source["secretName"] == docs["Secret"]["metadata"]["name"]
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            files[str(PurePosixPath(mount["mountPath"]) / item["path"])] = data[item["key"]]
    return files


def _argv(container: dict) -> list[str] | None:
    """What the container runs: its command and args, or the registrar image's
    ENTRYPOINT and the args; None for another image's own entrypoint."""
    if "command" in container:
        return container["command"] + container.get("args", [])
    if container["image"].rsplit("/", 1)[-1].split(":")[0] == "registrar":
        return ["registrar"] + container.get("args", [])
    return None


def _registrar_args(container: dict):
    """The registrar command line the container runs, parsed; None for another."""
    argv = _argv(container) or []
    return cli._parser().parse_args(argv[1:]) if argv[:1] == ["registrar"] else None


class Pod:
    """One manifest: its documents, the pod spec, which container runs what."""

    def __init__(self, name: str):
        self.name = name
        self.mode = MODES[name]
        self.docs = _documents(K8S / name)
        self.deployment = self.docs["Deployment"]
        self.spec = self.deployment["spec"]["template"]["spec"]
        self.init = self.spec.get("initContainers", [])
        self.containers = self.init + self.spec["containers"]
        runs = [(c, _registrar_args(c)) for c in self.containers]
        runs = [(c, args) for c, args in runs if args is not None]
        assert len(runs) == (0 if self.mode == "library" else 1), "one registrar process"
        self.registrar, self.args = runs[0] if runs else (self.spec["containers"][0], None)
        apps = [c for c in self.spec["containers"] if c is not self.registrar]
        self.app = apps[0] if apps else self.registrar
        self.env = _env(self.registrar)
        self.files = _files(self.registrar, self.spec, self.docs)
        self.config_path = self.args.config if self.args else self.env["REGISTRAR_CONFIG"]

    @property
    def token(self) -> str | None:
        return self.docs["Secret"]["stringData"]["token"] if "Secret" in self.docs else None


@pytest.fixture(scope="module", params=sorted(MODES), ids=lambda n: n)
def loaded(request, tmp_path_factory):
    """(Pod, its config as registrar's validation loads it, the effective
    configuration `registrar check` prints): the mounted configuration with
    the mounted token, as files here, the pod's environment around them."""
    pod = Pod(request.param)
    tmp_path = tmp_path_factory.mktemp(pod.mode)
    assert pod.config_path in pod.files, f"{pod.config_path} is not mounted"
    raw = yaml.safe_load(pod.files[pod.config_path])
    token_file = (raw.get("control") or {}).get("token_file")
    if token_file is not None:
        assert pod.files.get(token_file) == pod.token, f"{token_file}: not the Secret's token"
        (tmp_path / "token").write_text(pod.token)
        raw["control"]["token_file"] = str(tmp_path / "token")
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = config.load(path, environ=pod.env)
    done = subprocess.run([REGISTRAR, "check", "--effective", "--config", str(path)], check=False,
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], **pod.env})
    assert done.returncode == 0, done.stderr
    assert "valid" in done.stderr
    return pod, cfg, yaml.safe_load(done.stdout)


def test_check_offline_passes_the_shipped_config_as_ci_has_it(loaded, tmp_path):
    # In CI the ConfigMap's agent.yaml is at hand, its Secrets are not
    # mounted: --offline checks the rest, in one line, and prints nothing else.
    pod = loaded[0]
    path = tmp_path / "agent.yaml"
    path.write_text(pod.files[pod.config_path])
    raw = yaml.safe_load(path.read_text())
    token_file = (raw.get("control") or {}).get("token_file")
    assert token_file is None or not Path(token_file).exists()  # really not mounted here
    env = {"PATH": os.environ["PATH"], **pod.env}
    done = subprocess.run([REGISTRAR, "check", "--offline", "-c", str(path)], check=False,
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.endswith("(secret files not read: --offline)\n"), done.stderr
    if token_file is not None:  # without --offline it says which Secret is missing
        online = subprocess.run([REGISTRAR, "check", "-c", str(path)], check=False,
                                capture_output=True, text=True, timeout=60, env=env)
        assert online.returncode == 2 and f"cannot read {token_file}" in online.stderr


def test_config_is_valid_and_agrees_with_the_pod(loaded):
    pod, cfg, effective = loaded
    # The pod's identity and address come from the Downward API.
    assert {"POD_NAME", "POD_IP"} <= set(pod.env)
    assert effective["service"]["id"] == FIELDS["metadata.name"]
    assert effective["service"]["address"] == FIELDS["status.podIP"]
    assert pod.spec["terminationGracePeriodSeconds"] == cfg.stop.grace_period
    assert effective["stop"]["grace_period"] == format_duration(cfg.stop.grace_period)
    # The kubelet's probes come from the node: not a consumer the stop waits for.
    assert cfg.stop.quiesce and cfg.stop.ignore_peers is None
    assert FIELDS["status.hostIP"] in default_ignored(pod.env)

    # The readiness probe reaches /readyz: on the control server, or in library
    # mode on the app's own port. The kubelet connects to the pod IP: a probe or
    # hook with a `host` goes elsewhere (127.0.0.1 would be the node).
    readiness = [c["readinessProbe"]["httpGet"] for c in pod.containers if "readinessProbe" in c]
    assert len(readiness) == 1 and readiness[0]["path"] == "/readyz"
    for c in pod.containers:
        handlers = [c.get(p, {}) for p in ("readinessProbe", "livenessProbe", "startupProbe")]
        handlers.append(c.get("lifecycle", {}).get("preStop", {}))
        assert all("host" not in h.get("httpGet", {}) for h in handlers), c["name"]

    annotations = pod.deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    if pod.mode == "library":
        assert readiness[0]["port"] == cfg.service.port
        assert int(annotations["prometheus.io/port"]) == cfg.service.port
        return
    control = parse_listen(effective["control"]["listen"])
    assert control[0] == FIELDS["status.podIP"], "the kubelet's probes and hooks go to the pod IP"
    assert readiness[0]["port"] == control[1]
    assert cfg.control.token_file is not None, "a control server off loopback needs a token"
    # Prometheus scrapes the pod IP at the annotated port, with no token.
    metrics = parse_listen(effective["control"]["metrics_listen"])
    assert metrics[0] == FIELDS["status.podIP"]
    assert int(annotations["prometheus.io/port"]) == metrics[1]
    ports = {p.get("name"): p["containerPort"] for p in pod.registrar.get("ports", [])}
    assert ports.get("metrics") == metrics[1], "a named port, for a PodMonitor"


def test_hooks_and_commands_fit_the_mode(loaded, tmp_path, monkeypatch):
    pod, _, effective = loaded
    hook = pod.app.get("lifecycle", {}).get("preStop")
    if pod.mode == "library":
        # The app imports registrar and runs the stop on SIGTERM: no hook, no sidecar.
        assert hook is None and not pod.init and len(pod.spec["containers"]) == 1
        argv = _argv(pod.app)
        assert argv[0] == "python" and argv[1] in _files(pod.app, pod.spec, pod.docs)
        assert "from registrar import Registrar" in pod.files[argv[1]]
        return
    expected = {"sidecar": "agent", "native-sidecar": "agent", "wrapper": "run"}[pod.mode]
    assert pod.args.command == expected
    if pod.mode == "wrapper":
        assert pod.app is pod.registrar and pod.args.argv[:1] == ["--"] and pod.args.argv[1:]
    else:
        assert pod.app is not pod.registrar and _registrar_args(pod.app) is None
    # Native sidecar: an init container that keeps running (restartPolicy
    # Always), whose start the app waits for; its SIGTERM comes after the app
    # has exited, so the app's hook is what stops it.
    assert (pod.registrar in pod.init) == (pod.mode == "native-sidecar")
    if pod.mode == "native-sidecar":
        assert pod.registrar["restartPolicy"] == "Always"
        startup = pod.registrar["startupProbe"]["httpGet"]
        assert startup["path"] == "/healthz" and startup["port"] == parse_listen(
            effective["control"]["listen"])[1]
    else:
        assert "restartPolicy" not in pod.registrar

    control = effective["control"]["listen"]
    if "httpGet" in hook:
        get = hook["httpGet"]
        assert (get["path"], get["port"]) == ("/prestop", parse_listen(control)[1])
        headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
        assert headers.get("Authorization") == f"Bearer {pod.token}"
        assert pod.name.endswith("httpget.yaml") or pod.mode == "native-sidecar"
        return
    # An exec hook: `registrar prestop` in the app container, finding the
    # control address and the token as the real command line would.
    argv = hook["exec"]["command"]
    assert argv[:2] == ["registrar", "prestop"]
    env, files = _env(pod.app), _files(pod.app, pod.spec, pod.docs)
    for name in list(os.environ):
        if name.startswith("REGISTRAR_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = cli._parser().parse_args(argv[1:])
    token_file = args.token_file or env.get("REGISTRAR_CONTROL_TOKEN_FILE")
    if getattr(args, "config", None):
        assert args.config == pod.config_path and args.config in files
        token_file = token_file or yaml.safe_load(files[args.config])["control"]["token_file"]
        (tmp_path / "hook.yaml").write_text(files[args.config])
        args.config = str(tmp_path / "hook.yaml")
    cli._resolve(args, os.environ)
    assert args.control == control, "the hook calls the control server"
    assert files.get(token_file) == pod.token, "the hook has the Secret's token"


def test_registries_or_a_service_and_never_a_sleep(loaded):
    """A Service-only manifest has no backends and a Service whose selector and
    target port reach the app; every other one names a registry. No hook of
    any manifest sleeps: that guess is what registrar replaces."""
    pod, cfg, effective = loaded
    if pod.name not in SERVICE_ONLY:
        assert cfg.backends and effective["backends"], pod.name
        assert "Service" not in pod.docs
    else:
        assert cfg.backends == () and effective["backends"] == []
        service = pod.docs["Service"]["spec"]
        labels = pod.deployment["spec"]["template"]["metadata"]["labels"]
        assert service["selector"].items() <= labels.items()
        named = {p["name"]: p["containerPort"] for c in pod.containers
                 for p in c.get("ports", []) if "name" in p}
        (port,) = service["ports"]
        target = port["targetPort"]
        assert named.get(target, target) == cfg.service.port, "the Service reaches service.port"
    for c in pod.containers:
        hook = c.get("lifecycle", {}).get("preStop", {})
        assert "sleep" not in hook and "sleep" not in (hook.get("exec") or {}).get(
            "command", []), c["name"]


def test_resources(loaded):
    pod = loaded[0]
    for c in pod.containers:
        resources = c["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), c["name"]
        assert "cpu" not in resources.get("limits", {}), "a CPU limit throttles the stop"
        request = _bytes(resources["requests"]["memory"])
        assert _bytes(resources["limits"]["memory"]) >= request
    registrar = pod.registrar["resources"]["requests"]["memory"]
    assert _bytes(registrar) >= MEASURED_RSS, f"{registrar}: less than registrar measured"


def _bytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", quantity).groups()
    return float(number) * units.get(unit, 1)


# -- the library manifest's app, for real ---------------------------------------


def test_library_app_serves_readyz_and_metrics_and_stops(etcd_cluster, tmp_path):
    """The app in library.yaml, run as its Deployment says (its config, its
    environment, another port): /readyz turns 200 once registered, /metrics has
    registrar's metrics, SIGTERM takes it out of etcd and it exits 0."""
    from registrar_testing.etcd import kv_get_serializable

    pod = Pod("library.yaml")
    raw = yaml.safe_load(pod.files[pod.config_path])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raw["service"]["port"] = port
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(raw))
    app = _argv(pod.app)[1]
    (tmp_path / "app.py").write_text(pod.files[app])
    env = {**os.environ, **pod.env, "POD_IP": "127.0.0.1", "POD_NAME": f"lib-{port}",
           "ETCD_ENDPOINTS": ",".join(etcd_cluster.endpoints),
           "REGISTRAR_CONFIG": str(tmp_path / "agent.yaml")}
    key = f"services/web/127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, str(tmp_path / "app.py")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_get(f"{url}/readyz", 2) == (200, "registered\n"), 20,
                   "the library app's /readyz: 200 registered")
        assert all(kv_get_serializable(e, key)[1] for e in etcd_cluster.endpoints)
        status, body = http_get(f"{url}/metrics", 2)
        assert status == 200 and 'registrar_registered{backend="etcd"} 1.0' in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        assert not any(kv_get_serializable(e, key)[1] for e in etcd_cluster.endpoints)
        assert "confirmed 3/3 observers" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

