"""`registrar inject`: wire registrar into pod templates annotated
``registrar.io/inject: "true"``, so that what must agree is written once,
by a tool (docs/kubernetes.md has the user's side of it).

What a user writes: the annotations below on the pod template, and in the
ConfigMap named by ``registrar.io/config`` an ``agent.yaml`` with the
``service`` and ``backends`` (without one: a pod behind a Kubernetes Service
only, with no registry). Everything else is derived here and given to the
agent on its command line (``--set``), so it cannot disagree with the pod:

- ``stop.grace_period`` = ``terminationGracePeriodSeconds`` (30 when the pod
  leaves it out: then written in the pod too; derived from agent.yaml's
  stop.grace_period when only that one says it);
- ``control.listen`` = ``${POD_IP}:9901``, where the kubelet's probes and
  httpGet hooks go, ``control.metrics_listen`` = ``${POD_IP}:9902``, which the
  ``prometheus.io/*`` annotations name, ``control.token_file`` = the token
  mounted from the pod's own ``registrar.io/token`` annotation;
- ``service.port`` whenever the pod says it: ``registrar.io/port``, or the
  serving container's one containerPort (agent.yaml may leave it out; when
  it says another port, inject refuses: the webhook, which sees no
  ConfigMap, would not notice). Only when the pod does not say it does
  agent.yaml's come into play.

The token: off loopback every control endpoint but /healthz and /readyz
needs a bearer token, and an httpGet hook's header is literal text. So the
token lives in one place, the pod's ``registrar.io/token`` annotation
(drawn at random when absent, kept when present), and reaches the agent and
the exec hooks as a Downward API file and the httpGet hook as its header.
Whoever can read the pod (or its Deployment) can read the token, as with a
header written by hand: it keeps the rest of the network away from
/prestop, not the cluster's users.

What was added and what it replaced is recorded in the pod's
``registrar.io/uninject`` annotation, so that uninject_pod() gives the
input back exactly; ``registrar.io/injected`` says which version did it,
and a pod that has it is not injected again.

The standard library and PyYAML, imported lazily; registrar's own config
code only to check the configuration the agent will read (a known
ConfigMap's agent.yaml, or the Service-only settings). Checking an
agent.yaml with backends loads their plugins for their config models, and
a plugin module may import its registry client; the webhook, which knows
no ConfigMap, never does.
"""
from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import __version__

PREFIX = "registrar.io/"
#: The annotations a user writes (docs/kubernetes.md has the table).
INJECT = PREFIX + "inject"          # "true", or "required" (the webhook refuses on failure)
CONFIG = PREFIX + "config"          # the ConfigMap holding agent.yaml
MODE = PREFIX + "mode"              # native-sidecar (default), sidecar, wrapper
CONTAINER = PREFIX + "container"    # the serving container, then others to hold (a,b)
PORT = PREFIX + "port"              # service.port: a number or a port name
HOOK = PREFIX + "hook"              # exec or httpGet (default: per mode)
IMAGE = PREFIX + "image"            # the agent's image
TOKEN = PREFIX + "token"            # the control token (drawn when absent)
#: The annotations inject writes about itself.
INJECTED = PREFIX + "injected"      # the version that injected the pod
UNDO = PREFIX + "uninject"          # JSON: what --uninject undoes

MODES = ("native-sidecar", "sidecar", "wrapper")
HOOKS = ("exec", "httpGet")
#: The agent container's name (native-sidecar and sidecar modes).
AGENT = "registrar"
CONTROL_PORT, METRICS_PORT = 9901, 9902
#: Container port names (IANA service names: at most 15 characters, so not
#: "registrar-metrics"; not "metrics", which apps often name their own).
CONTROL_PORT_NAME, METRICS_PORT_NAME = "reg-control", "reg-metrics"
CONFIG_DIR = "/etc/registrar"
CONFIG_FILE = f"{CONFIG_DIR}/agent.yaml"
TOKEN_DIR = "/var/run/registrar"
TOKEN_FILE = f"{TOKEN_DIR}/token"
CONFIG_VOLUME, TOKEN_VOLUME = "registrar-config", "registrar-token"
#: Kubernetes' default terminationGracePeriodSeconds.
DEFAULT_GRACE = 30
#: The agent's resources. Measured with the etcd backend: ~36 MB RSS (p50,
#: /metrics scraped), ~2 millicores idle. No CPU limit: throttling would
#: stretch the stop, whose deadline is the grace period.
RESOURCES = {"requests": {"cpu": "20m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}}
#: Pod Security "restricted" for what inject adds (the image runs as uid
#: 10001, numeric, so runAsNonRoot can be checked).
SECURITY_CONTEXT = {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
                    "seccompProfile": {"type": "RuntimeDefault"}}
#: The Downward API variables the agent reads: the instance id, its address,
#: and the node, whose kubelet's probes are no consumer (stop.ignore_peers).
DOWNWARD = (("POD_NAME", "metadata.name"), ("POD_IP", "status.podIP"),
            ("HOST_IP", "status.hostIP"))
PROMETHEUS = {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
              "prometheus.io/path": "/metrics"}
#: Where each kind keeps its pod template.
TEMPLATES = {"Deployment": ("spec", "template"), "StatefulSet": ("spec", "template"),
             "DaemonSet": ("spec", "template"), "ReplicaSet": ("spec", "template"),
             "ReplicationController": ("spec", "template"), "Job": ("spec", "template"),
             "CronJob": ("spec", "jobTemplate", "spec", "template")}
#: What the checks of a known agent.yaml put in the environment for the
#: Downward API's values (documentation addresses, RFC 5737).
CHECK_ENV = {"POD_NAME": "inject-check-0", "POD_IP": "192.0.2.1", "HOST_IP": "192.0.2.2"}
#: Pod Security "restricted": the volume types it allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}


class InjectError(Exception):
    """A pod that cannot be injected as annotated; ``str()`` is one line
    saying what to change."""


@dataclass(frozen=True)
class Options:
    """What the command line (or the webhook's configuration) decides."""
    #: The agent's image (a pod's registrar.io/image wins).
    image: str = f"registry.example/registrar:{__version__}"
    #: The token for a pod without registrar.io/token (None: a random one,
    #: secrets.token_urlsafe(32)).
    token: str | None = None
    #: --log-format of the agent.
    log_format: str = "json"


@dataclass
class Injected:
    #: {"metadata": ..., "spec": ...} after the change (a deep copy).
    pod: dict
    #: One line each: what the user should know and nothing changed.
    warnings: list[str] = field(default_factory=list)
    changed: bool = False


def inject_pod(pod: dict, options: Options = Options(), *,
               config_map: dict | None = None) -> Injected:
    """Wire registrar into ``pod`` (a Pod's or a pod template's
    ``{"metadata", "spec"}``) as its annotations say. A pod not annotated
    ``registrar.io/inject: "true"`` (or ``"required"``), or already injected,
    comes back unchanged. ``config_map``: the ConfigMap that
    ``registrar.io/config`` names, when known: its agent.yaml is then
    validated with the derived settings, and a value there that disagrees
    with the pod is refused. Raises InjectError."""
    pod = copy.deepcopy(pod)
    annotations = _annotations(pod)
    want = annotations.get(INJECT)
    for key, value in annotations.items():
        if isinstance(key, str) and key.startswith(PREFIX) and not isinstance(value, str) \
                and (want is not None or key == INJECT):
            raise InjectError(f"{key} is {_quote(value)}, not text: quote it (annotation values "
                              "are strings)")
    if want not in ("true", "required"):
        warnings = []
        if want not in (None, "false", ""):
            warnings.append(f'{INJECT} is {_quote(want)}: not "true", "required" or "false": '
                            "not injected")
        return Injected(pod, warnings, False)
    if INJECTED in annotations:
        return Injected(pod, _stale(annotations), False)
    return _Injection(pod, options, config_map).run()


def uninject_pod(pod: dict) -> Injected:
    """``pod`` as it was before inject_pod(), from the record it left
    (registrar.io/uninject); a pod that was not injected comes back
    unchanged. What the record names and is no longer there (edited out
    since) is a warning. Raises InjectError when the record is unreadable."""
    pod = copy.deepcopy(pod)
    annotations = _annotations(pod)
    if INJECTED not in annotations:
        return Injected(pod, [], False)
    try:
        record = json.loads(annotations[UNDO])
        undo = record["undo"]
        if not isinstance(undo, list):
            raise TypeError
    except (KeyError, TypeError, ValueError):
        raise InjectError(f"{UNDO} is missing or not the record inject wrote: cannot uninject "
                          f"(remove {INJECTED} to inject again over it)") from None
    warnings: list[str] = []
    for entry in reversed(undo):
        try:
            op, path = entry[0], entry[1]
            parent = _find(pod, path[:-1])
            key = path[-1]
            if op == "+":
                _remove(parent, key)
            elif op in ("=", "-"):
                _put(parent, key, entry[2])
            else:
                raise LookupError(f"unknown operation {op!r}")
        except (LookupError, TypeError, IndexError) as exc:
            warnings.append(f"{_where(entry)}: not restored ({exc}): edited since it was "
                            "injected?")
    annotations = pod["metadata"]["annotations"]
    for key in (INJECTED, UNDO):
        annotations.pop(key, None)
    return Injected(pod, warnings, True)


def inject_stream(text: str, options: Options = Options(), *,
                  uninject: bool = False) -> tuple[str, list[str]]:
    """Kubernetes YAML in (one or more documents), the same out with every
    annotated pod template injected (or uninjected), in the same order;
    other kinds pass through. Comments are lost (PyYAML keeps none).
    Returns (YAML, warnings: one line each, naming the object). Raises
    InjectError naming the object."""
    docs, warnings = inject_documents(load_documents(text), options, uninject=uninject)
    return dump_documents(docs), warnings


def load_documents(text: str, name: str = "") -> list[Any]:
    """The YAML documents of ``text`` (empty ones left out); InjectError
    with the line when it does not parse."""
    import yaml

    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InjectError(f"{name + ': ' if name else ''}invalid YAML{where}: {problem}") \
            from None


def dump_documents(docs: list[Any]) -> str:
    """YAML as kubectl writes it, multi-line text as literal blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, data: str) -> Any:
        style = "|" if "\n" in data.rstrip("\n") or data.endswith("\n") else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    Dumper.add_representer(str, text)
    return yaml.dump_all(docs, Dumper=Dumper, sort_keys=False, default_flow_style=False,
                         allow_unicode=True, width=10_000, explicit_start=len(docs) > 1)


def inject_documents(docs: list[Any], options: Options = Options(), *,
                     uninject: bool = False) -> tuple[list[Any], list[str]]:
    """inject_stream() on parsed documents: (documents, warnings). The
    ConfigMaps among them are what registrar.io/config names."""
    config_maps = {}
    for doc in _objects(docs):
        if doc.get("kind") == "ConfigMap" and isinstance(doc.get("metadata"), Mapping):
            meta = doc["metadata"]
            config_maps[(meta.get("namespace"), meta.get("name"))] = doc
    warnings: list[str] = []
    out = []
    for doc in docs:
        out.append(_document(doc, options, uninject, config_maps, warnings))
    return out, warnings


# -- documents -------------------------------------------------------------------------


def _objects(docs: list[Any]):
    """Every object, the items of a List too."""
    for doc in docs:
        if isinstance(doc, dict):
            if doc.get("kind") == "List" and isinstance(doc.get("items"), list):
                yield from _objects(doc["items"])
            else:
                yield doc


def _document(doc: Any, options: Options, uninject: bool, config_maps: dict,
              warnings: list[str]) -> Any:
    if not isinstance(doc, dict):
        return doc
    kind = doc.get("kind")
    if kind == "List" and isinstance(doc.get("items"), list):
        doc = dict(doc)
        doc["items"] = [_document(d, options, uninject, config_maps, warnings)
                        for d in doc["items"]]
        return doc
    if kind != "Pod" and kind not in TEMPLATES:
        return doc
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), Mapping) else {}
    name = f"{kind}/{meta.get('name') or meta.get('generateName') or '?'}"
    if kind == "Pod":
        template: Any = {"metadata": doc.get("metadata") or {}, "spec": doc.get("spec")}
    else:
        template = doc
        for step in TEMPLATES[kind]:
            template = template.get(step) if isinstance(template, Mapping) else None
        if not isinstance(template, dict):
            return doc
    try:
        if uninject:
            result = uninject_pod(template)
        else:
            config_map = None
            wanted = _annotations(template).get(CONFIG)
            if _annotations(template).get(INJECT) in ("true", "required") and wanted \
                    and isinstance(wanted, str):
                config_map = _find_config_map(config_maps, meta.get("namespace"), wanted)
                if config_map is None and INJECTED not in _annotations(template):
                    warnings.append(f"{name}: ConfigMap {wanted} is not in the input: its "
                                    "agent.yaml was not checked")
            result = inject_pod(template, options, config_map=config_map)
    except InjectError as exc:
        raise InjectError(f"{name}: {exc}") from None
    warnings += [f"{name}: {w}" for w in result.warnings]
    if not result.changed:
        return doc
    doc = copy.deepcopy(doc)
    if kind == "Pod":
        doc["metadata"], doc["spec"] = result.pod["metadata"], result.pod["spec"]
        return doc
    holder = doc
    for step in TEMPLATES[kind][:-1]:
        holder = holder[step]
    holder[TEMPLATES[kind][-1]] = result.pod
    return doc


def _find_config_map(config_maps: dict, namespace: str | None, name: str) -> dict | None:
    if (namespace, name) in config_maps:
        return config_maps[(namespace, name)]
    # One side without a namespace: both go wherever `kubectl -n` sends them.
    for (ns, cm_name), doc in config_maps.items():
        if cm_name == name and (ns is None or namespace is None):
            return doc
    return None


# -- one pod ---------------------------------------------------------------------------


class _Injection:
    """One pod being injected: the annotations read, the checks, the edits
    (recorded for uninject)."""

    def __init__(self, pod: dict, options: Options, config_map: dict | None):
        self.pod = pod
        self.options = options
        self.config_map = config_map
        self.annotations = pod["metadata"]["annotations"]
        self.warnings: list[str] = []
        self.edits = _Edits(pod)

    def run(self) -> Injected:
        spec = self.pod.get("spec")
        if not isinstance(spec, dict) or not isinstance(spec.get("containers"), list) \
                or not spec["containers"] or not all(
                    isinstance(c, dict) and isinstance(c.get("name"), str)
                    for c in spec["containers"] + (spec.get("initContainers") or [])):
            raise InjectError("no spec.containers with names: not a pod template")
        self.spec = spec
        recorded = {k: v for k, v in self.annotations.items()
                    if isinstance(k, str) and k.startswith(PREFIX) and k != TOKEN}
        self.mode = self._choice(MODE, MODES, "native-sidecar")
        self.hook = self._choice(HOOK, HOOKS, "httpGet" if self.mode == "native-sidecar"
                                 else "exec")
        self.image = self.annotations.get(IMAGE) or self.options.image
        self.config_name = self.annotations.get(CONFIG) or None
        self.apps = self._apps()
        self.serving = self.apps[0]
        self._check_names()
        self.file = self._agent_yaml()
        self.token = self._token()
        grace = self._grace()
        settings = self._settings(grace)
        self._check_config(settings)
        self.args = self._config_args() + ["--log-format", self.options.log_format] + [
            arg for key, value in settings for arg in ("--set", f"{key}={value}")]
        hook_keys = ("control.listen", "control.token_file", "stop.grace_period")
        self.hook_args = [arg for key, value in settings if key in hook_keys
                          for arg in ("--set", f"{key}={value}")]

        self._security_warnings()
        if self.mode == "wrapper":
            self._wrap()
        else:
            self._add_agent()
        for i, app in enumerate(self.apps):
            self._hold(app, serving=i == 0)
        self._volumes()
        self._annotate()
        self.annotations[INJECTED] = __version__
        self.annotations[UNDO] = json.dumps({"annotations": recorded, "undo": self.edits.log},
                                            separators=(",", ":"), sort_keys=True)
        return Injected(self.pod, self.warnings, True)

    # -- reading the annotations ---------------------------------------------------------

    def _choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.annotations.get(key)
        if value in (None, ""):
            return default
        for choice in choices:
            if isinstance(value, str) and value.lower() == choice.lower():
                return choice
        raise InjectError(f"{key} is {_quote(value)}: expected {_or(choices)}")

    def _apps(self) -> list[dict]:
        """The containers registrar holds: the serving one first."""
        containers = self.spec["containers"]
        names = [c["name"] for c in containers]
        given = self.annotations.get(CONTAINER)
        if given in (None, ""):
            if len(containers) > 1:
                raise InjectError(f"{len(containers)} containers ({', '.join(names)}): name the "
                                  f"one that serves in {CONTAINER} (then, comma-separated, any "
                                  "other that must keep running until the pod is out of the "
                                  "registries)")
            return [containers[0]]
        wanted = [n.strip() for n in str(given).split(",") if n.strip()]
        unknown = [n for n in wanted if n not in names]
        if unknown or not wanted or len(set(wanted)) != len(wanted):
            raise InjectError(f"{CONTAINER} is {_quote(given)}: expected one or more of "
                              f"{', '.join(names)}, comma-separated, each once")
        return [containers[names.index(n)] for n in wanted]

    def _check_names(self) -> None:
        everything = self.spec["containers"] + (self.spec.get("initContainers") or [])
        if self.mode != "wrapper" and any(c["name"] == AGENT for c in everything):
            raise InjectError(f"a container is already named {AGENT!r}, the agent's name: "
                              "rename it")
        for c in everything:
            for port in c.get("ports") or []:
                if isinstance(port, dict) and port.get("containerPort") in (CONTROL_PORT,
                                                                           METRICS_PORT):
                    raise InjectError(f"container {c['name']} uses port "
                                      f"{port['containerPort']}, which registrar's control "
                                      f"server needs ({CONTROL_PORT} and {METRICS_PORT})")
        volumes = [v.get("name") for v in self.spec.get("volumes") or [] if isinstance(v, dict)]
        for name in (CONFIG_VOLUME, TOKEN_VOLUME):
            if name in volumes:
                raise InjectError(f"a volume is already named {name!r}, which registrar "
                                  "mounts: rename it")

    def _agent_yaml(self) -> dict | None:
        """agent.yaml of the known ConfigMap, parsed (not interpolated)."""
        if self.config_map is None or not self.config_name:
            return None
        from .errors import ConfigError
        from .source import parse_text

        data = self.config_map.get("data") or {}
        where = f"ConfigMap {self.config_name}"
        if not isinstance(data, Mapping) or not isinstance(data.get("agent.yaml"), str):
            raise InjectError(f"{where} has no agent.yaml (data: agent.yaml: with the service "
                              "and backends)")
        try:
            doc = parse_text(data["agent.yaml"], f"{where}: agent.yaml")
        except ConfigError as exc:
            raise InjectError(str(exc)) from None
        if not isinstance(doc, dict):
            raise InjectError(f"{where}: agent.yaml: the configuration must be a mapping")
        return doc

    def _token(self) -> str:
        token = self.annotations.get(TOKEN)
        if token is not None:
            if not isinstance(token, str) or not _TOKEN.fullmatch(token):
                raise InjectError(f"{TOKEN} must be 16 or more printable ASCII characters, no "
                                  "spaces (it goes into an HTTP header); remove it to have one "
                                  "drawn")
            return token
        import secrets

        token = self.options.token or secrets.token_urlsafe(32)
        if not _TOKEN.fullmatch(token):
            raise InjectError("the token given must be 16 or more printable ASCII characters, "
                              "no spaces")
        self.edits.put(["metadata", "annotations", TOKEN], token)
        return token

    # -- what is derived -----------------------------------------------------------------

    def _expanded(self, section: str, key: str) -> Any:
        """A value of the known agent.yaml, ${VAR} expanded as the agent
        would; _MISSING when absent or not a mapping on the way."""
        from .errors import ConfigError
        from .source import expand

        value = (self.file or {}).get(section)
        if not isinstance(value, Mapping) or value.get(key) is None:
            return _MISSING
        try:
            return expand({"v": value[key]}, self._environ())["v"]
        except ConfigError as exc:
            raise InjectError(f"ConfigMap {self.config_name}: agent.yaml: {section}.{key}: "
                              f"{exc.message}") from None

    def _environ(self) -> dict[str, str]:
        """The agent's environment as far as it is known: the Downward API
        (documentation values), and in wrapper mode the container's own
        literal values."""
        env: dict[str, str] = {}
        if self.mode == "wrapper":
            for entry in self.serving.get("env") or []:
                if isinstance(entry, dict) and isinstance(entry.get("value"), str):
                    env[entry["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                                lambda m: env.get(m[1], m[0]), entry["value"])
        return {**env, **CHECK_ENV}

    def _grace(self) -> int:
        """terminationGracePeriodSeconds, which stop.grace_period repeats."""
        from .fields import format_duration, parse_duration

        pod_grace = self.spec.get("terminationGracePeriodSeconds")
        if pod_grace is not None and (not isinstance(pod_grace, int) or
                                      isinstance(pod_grace, bool) or pod_grace < 0):
            raise InjectError(f"terminationGracePeriodSeconds is {_quote(pod_grace)}: expected "
                              "a whole number of seconds")
        said = self._expanded("stop", "grace_period")
        if said is not _MISSING:
            try:
                seconds = parse_duration(said)
            except ValueError as exc:
                raise InjectError(f"ConfigMap {self.config_name}: agent.yaml: "
                                  f"stop.grace_period: {exc}") from None
            if pod_grace is None:
                if seconds != int(seconds):
                    raise InjectError(f"agent.yaml says stop.grace_period "
                                      f"{format_duration(seconds)}, and "
                                      "terminationGracePeriodSeconds takes whole seconds: "
                                      "write it in the pod instead")
                pod_grace = int(seconds)
            elif seconds != pod_grace:
                raise InjectError(f"agent.yaml says stop.grace_period {format_duration(seconds)} "
                                  f"but terminationGracePeriodSeconds is {pod_grace}; remove one "
                                  "(registrar derives the other)")
        if self.spec.get("terminationGracePeriodSeconds") is None:
            pod_grace = DEFAULT_GRACE if pod_grace is None else pod_grace
            self.edits.put(["spec", "terminationGracePeriodSeconds"], pod_grace)
            _before(self.spec, "terminationGracePeriodSeconds", "containers")
        return pod_grace

    def _settings(self, grace: int) -> list[tuple[str, Any]]:
        """The --set the agent gets (and the exec hooks, in part)."""
        from .fields import format_duration

        settings: list[tuple[str, Any]] = []
        if not self.config_name:  # Service-only: no file at all
            settings.append(("service.name", self._service_name()))
        port = self._port()
        if port is not None:
            settings.append(("service.port", port))
        settings.append(("stop.grace_period", format_duration(grace)))
        ours = {"listen": f"${{POD_IP}}:{CONTROL_PORT}",
                "metrics_listen": f"${{POD_IP}}:{METRICS_PORT}", "token_file": TOKEN_FILE}
        why = {"listen": "where the kubelet's probes and hooks go",
               "metrics_listen": "what the prometheus.io/port annotation names",
               "token_file": f"the {TOKEN} annotation, mounted"}
        from .source import expand

        for key, value in ours.items():
            said = self._expanded("control", key)
            if said is not _MISSING and said != expand({"v": value}, self._environ())["v"]:
                written = (self.file or {})["control"][key]
                raise InjectError(f"agent.yaml says control.{key} {_quote(written)} but the "
                                  f"injected pod needs {value} ({why[key]}); remove it from "
                                  "agent.yaml")
            settings.append((f"control.{key}", value))
        return settings

    def _service_name(self) -> str:
        labels = self.pod["metadata"].get("labels") or {}
        for key in ("app.kubernetes.io/name", "app"):
            if isinstance(labels.get(key), str) and labels[key]:
                return labels[key]
        return self.serving["name"]

    def _port(self) -> int | None:
        """service.port to set: what the pod says (registrar.io/port, or the
        serving container's one port), else None when agent.yaml has it or
        may have it (the ConfigMap is unknown)."""
        ports = [p for p in self.serving.get("ports") or [] if isinstance(p, dict)]
        given = self.annotations.get(PORT)
        port = None
        if given not in (None, ""):
            named = {p.get("name"): p.get("containerPort") for p in ports if p.get("name")}
            text = str(given).strip()
            if text in named:
                port = named[text]
            elif text.isdigit() and 1 <= int(text) <= 65535:
                port = int(text)
            else:
                raise InjectError(f"{PORT} is {_quote(given)}: expected a port number or one of "
                                  f"the container {self.serving['name']}'s port names "
                                  f"({', '.join(map(str, named)) or 'it names none'})")
        if port is None and len(ports) == 1 and isinstance(ports[0].get("containerPort"), int):
            port = ports[0]["containerPort"]
        said = self._expanded("service", "port")
        if said is not _MISSING:
            # Set whenever the pod says it, so that the webhook (which sees no
            # ConfigMap) and inject write the same pod; a disagreement, which
            # only inject can see, is refused.
            if port is not None and said != port:
                source = PORT if self.annotations.get(PORT) not in (None, "") \
                    else f"the container {self.serving['name']}'s one port"
                raise InjectError(f"{source} is {port} but agent.yaml says service.port "
                                  f"{_quote(said)}; remove service.port from agent.yaml "
                                  f"(registrar derives it) or give {PORT}")
            declared = [p.get("containerPort") for p in ports]
            if declared and said not in declared:
                self.warnings.append(f"agent.yaml says service.port {_quote(said)} but the "
                                     f"container {self.serving['name']} declares "
                                     f"{', '.join(map(str, declared))}")
            return port
        if port is not None:
            return port
        if self.config_name and self.file is None:
            return None  # the ConfigMap is not here: its agent.yaml may say it
        has = f"declares {', '.join(str(p.get('containerPort')) for p in ports)}" if ports \
            else "declares no containerPort"
        raise InjectError(f"which port does the app serve? The container "
                          f"{self.serving['name']} {has}: give {PORT}"
                          + (" (or service.port in agent.yaml)" if self.config_name else ""))

    def _check_config(self, settings: list[tuple[str, Any]]) -> None:
        """The configuration the agent will read, validated as it will be:
        the known agent.yaml (or nothing, Service-only) with the settings."""
        if self.config_name and self.file is None:
            return
        from .config import load
        from .errors import BackendNotFound, ConfigError
        from .fields import secrets_unread

        where = f"ConfigMap {self.config_name}: agent.yaml with the derived settings" \
            if self.config_name else "the derived configuration (no registrar.io/config)"
        try:
            with secrets_unread():
                load(self.file or None, environ=self._environ(), settings=settings)
        except BackendNotFound as exc:
            self.warnings.append(f"{where}: not checked: {exc}")
        except ConfigError as exc:
            raise InjectError(f"{where}: {exc}") from None

    def _config_args(self) -> list[str]:
        return ["--config", CONFIG_FILE] if self.config_name else []

    # -- what is added -------------------------------------------------------------------

    def _mounts(self, config: bool) -> list[dict]:
        mounts = [{"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True}] \
            if config and self.config_name else []
        return mounts + [{"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True}]

    @staticmethod
    def _downward(name: str, path: str) -> dict:
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}

    def _ports(self) -> list[dict]:
        return [{"name": CONTROL_PORT_NAME, "containerPort": CONTROL_PORT},
                {"name": METRICS_PORT_NAME, "containerPort": METRICS_PORT}]

    def _add_agent(self) -> None:
        agent: dict[str, Any] = {"name": AGENT, "image": self.image}
        native = self.mode == "native-sidecar"
        if native:
            agent["restartPolicy"] = "Always"  # a native sidecar: it runs beside the app
        agent["args"] = ["agent", *self.args]
        agent["env"] = [self._downward(n, p) for n, p in DOWNWARD]
        agent["ports"] = self._ports()
        if native:
            # The app starts once this passes: its hook always finds the agent.
            agent["startupProbe"] = {"httpGet": {"path": "/healthz", "port": CONTROL_PORT},
                                     "periodSeconds": 1, "failureThreshold": 30}
        agent["resources"] = copy.deepcopy(RESOURCES)
        agent["securityContext"] = copy.deepcopy(SECURITY_CONTEXT)
        agent["volumeMounts"] = self._mounts(config=True)
        where = "initContainers" if native else "containers"
        self.edits.append(["spec", where], agent)
        _before(self.spec, "initContainers", "containers")
        if not native and self.spec.get("restartPolicy") in ("Never", "OnFailure"):
            self.warnings.append("a regular sidecar never exits, so a Job's pod would never "
                                 "complete: use registrar.io/mode: native-sidecar")

    def _wrap(self) -> None:
        c = self.serving
        name = c["name"]
        if not isinstance(c.get("command"), list) or not c["command"]:
            raise InjectError(f"container {name}: wrapper mode needs its command (the image's "
                              "ENTRYPOINT is not known here): write command: [...] in the "
                              "container")
        path = ["spec", "containers", f"name={name}"]
        argv = ["registrar", "run", *self.args, "--", *c["command"], *(c.get("args") or [])]
        self.edits.put(path + ["command"], argv)
        if "args" in c:
            self.edits.drop(path + ["args"])
        for env_name, field_path in DOWNWARD:
            self._env(c, env_name, field_path)
        for port in self._ports():
            self.edits.append(path + ["ports"], port)
        for mount in self._mounts(config=True):
            self.edits.append(path + ["volumeMounts"], mount)

    def _env(self, c: dict, env_name: str, field_path: str) -> None:
        """Add a Downward API variable unless the container has it already."""
        for entry in c.get("env") or []:
            if isinstance(entry, dict) and entry.get("name") == env_name:
                ref = ((entry.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
                if ref != field_path:
                    raise InjectError(f"container {c['name']}: env {env_name} is not the "
                                      f"Downward API's {field_path}, which registrar reads: "
                                      "rename yours")
                return
        self.edits.append(["spec", "containers", f"name={c['name']}", "env"],
                          self._downward(env_name, field_path))

    def _hold(self, c: dict, serving: bool) -> None:
        """The preStop hook that holds the container until the pod is out
        of every registry; the readiness probe on /readyz on the serving one."""
        path = ["spec", "containers", f"name={c['name']}"]
        wrapper = self.mode == "wrapper" and serving
        if self.hook == "exec":
            # The hook beside the wrapper reads what the wrapper reads: its fallback
            # (no wrapper answering: deregister itself) needs all of it.
            args = self.args if wrapper and self.config_name else self.hook_args
            handler: dict[str, Any] = {"exec": {"command": ["registrar", "prestop", *args]}}
            if not wrapper:
                self._env(c, "POD_IP", "status.podIP")  # ${POD_IP} in the hook's --set
                self.edits.append(path + ["volumeMounts"], self._mounts(config=False)[0])
        else:
            handler = {"httpGet": {"path": "/prestop", "port": CONTROL_PORT, "httpHeaders": [
                {"name": "Authorization", "value": f"Bearer {self.token}"}]}}
        old = (c.get("lifecycle") or {}).get("preStop")
        if old is not None:
            self.warnings.append(f"container {c['name']}: its preStop hook ({_summary(old)}) is "
                                 "replaced by registrar's (--uninject restores it)")
        self.edits.put(path + ["lifecycle", "preStop"], handler)
        if not serving:
            return
        if c.get("readinessProbe") is not None:
            self.warnings.append(f"container {c['name']}: its own readinessProbe is kept, so "
                                 f"registrar's /readyz (port {CONTROL_PORT}: registered "
                                 "everywhere and not stopping) is not probed; the Service may "
                                 "list the pod while a registry does not")
        else:
            self.edits.put(path + ["readinessProbe"], {
                "httpGet": {"path": "/readyz", "port": CONTROL_PORT}, "periodSeconds": 2})

    def _volumes(self) -> None:
        if self.config_name:
            self.edits.append(["spec", "volumes"], {"name": CONFIG_VOLUME, "configMap": {
                "name": self.config_name, "items": [{"key": "agent.yaml",
                                                     "path": "agent.yaml"}]}})
        self.edits.append(["spec", "volumes"], {"name": TOKEN_VOLUME, "downwardAPI": {"items": [
            {"path": "token", "fieldRef": {"fieldPath": f"metadata.annotations['{TOKEN}']"}}]}})

    def _annotate(self) -> None:
        for key, value in PROMETHEUS.items():
            if key not in self.annotations:
                self.edits.put(["metadata", "annotations", key], value)
        port = self.annotations.get("prometheus.io/port")
        if port != str(METRICS_PORT):
            self.warnings.append(f"prometheus.io/port is {_quote(port)}: kept, so registrar's "
                                 f"metrics (port {METRICS_PORT}, {METRICS_PORT_NAME}) are not "
                                 "scraped through the annotations; use a PodMonitor for both")

    # -- what is only reported -----------------------------------------------------------

    def _security_warnings(self) -> None:
        """Pod Security "restricted": the user's containers and pod-level
        settings that fail it, one line each, unchanged."""
        spec = self.spec
        pod_context = spec.get("securityContext") or {}
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(key):
                self.warnings.append(f"{key}: true fails Pod Security \"restricted\""
                                     + (f" (and puts ports {CONTROL_PORT}/{METRICS_PORT} on "
                                        "the node)" if key == "hostNetwork" else ""))
        bad_volumes = [v.get("name", "?") for v in spec.get("volumes") or [] if
                       isinstance(v, dict) and not set(v) - {"name"} <= RESTRICTED_VOLUMES]
        if bad_volumes:
            self.warnings.append(f"volumes {', '.join(bad_volumes)}: a type Pod Security "
                                 "\"restricted\" does not allow")
        if pod_context.get("runAsUser") == 0 or pod_context.get("runAsNonRoot") is False:
            self.warnings.append("the pod's securityContext runs as root: registrar's "
                                 "container (runAsNonRoot) would not start; not changed")
        for c in spec.get("initContainers", []) + spec["containers"]:
            problems = _restricted_problems(c, pod_context)
            if problems:
                self.warnings.append(f"container {c['name']} would fail Pod Security "
                                     f"\"restricted\" ({'; '.join(problems)}): not changed")


def _restricted_problems(c: dict, pod_context: Mapping[str, Any]) -> list[str]:
    """How a container fails Pod Security "restricted" (the Kubernetes
    docs' fields), with the pod-level settings it inherits."""
    sc = c.get("securityContext") or {}
    problems = []
    if sc.get("privileged"):
        problems.append("privileged")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    caps = sc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        problems.append("capabilities.drop lacks ALL")
    added = sorted(set(caps.get("add") or []) - {"NET_BIND_SERVICE"})
    if added:
        problems.append(f"capabilities.add has {', '.join(added)}")
    if sc.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
        problems.append("runAsNonRoot is not true")
    if sc.get("runAsUser", pod_context.get("runAsUser")) == 0:
        problems.append("runAsUser is 0")
    seccomp = sc.get("seccompProfile") or pod_context.get("seccompProfile") or {}
    if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append("seccompProfile is not RuntimeDefault or Localhost")
    if any(isinstance(p, dict) and p.get("hostPort") for p in c.get("ports") or []):
        problems.append("hostPort")
    return problems


# -- the record --------------------------------------------------------------------------


class _Edits:
    """Changes to the pod, each recorded so that it can be undone: ``["+",
    path]`` (added), ``["=", path, old]`` (replaced), ``["-", path, old]``
    (removed). A path's steps are keys, and ``name=X`` for the item named X
    of a list (containers, env, ports, volumes, volumeMounts)."""

    def __init__(self, root: dict):
        self.root = root
        self.log: list[list[Any]] = []
        self._added: set[tuple[str, ...]] = set()

    def _record(self, entry: list[Any]) -> None:
        """Log an edit, unless it is inside something added (it goes with it)."""
        path = tuple(entry[1])
        if any(path[:i] in self._added for i in range(1, len(path))):
            return
        if entry[0] == "+":
            self._added.add(path)
        self.log.append(entry)

    def put(self, path: list[str], value: Any) -> None:
        """Set ``path`` to ``value``, creating what is missing on the way
        (one record: the first missing step)."""
        node: Any = self.root
        for i, step in enumerate(path[:-1]):
            child = _child(node, step)
            if child is None:
                for inner in reversed(path[i + 1:]):
                    value = {inner: value}
                path = path[:i + 1]
                break
            node = child
        parent = _find(self.root, path[:-1])
        key = path[-1]
        if key in parent:
            self._record(["=", path, copy.deepcopy(parent[key])])
        else:
            self._record(["+", path])
        parent[key] = value

    def drop(self, path: list[str]) -> None:
        parent = _find(self.root, path[:-1])
        self._record(["-", path, parent.pop(path[-1])])

    def append(self, path: list[str], item: dict) -> None:
        """Add a named item to the list at ``path`` (made when absent)."""
        parent = _find(self.root, path[:-1])
        if not isinstance(parent.get(path[-1]), list):
            self.put(path, [item])
            return
        parent[path[-1]].append(item)
        self._record(["+", [*path, f"name={item['name']}"]])


def _child(node: Any, step: str) -> Any:
    if isinstance(node, list):
        if not step.startswith("name="):
            raise LookupError(f"{step}: not a named item")
        for item in node:
            if isinstance(item, dict) and item.get("name") == step[len("name="):]:
                return item
        return None
    if not isinstance(node, dict):
        raise LookupError(f"{step}: not a mapping")
    return node.get(step)


def _find(root: Any, path: list[str]) -> Any:
    node = root
    for step in path:
        node = _child(node, step)
        if node is None:
            raise LookupError(f"{step} is gone")
    return node


def _remove(parent: Any, key: str) -> None:
    if isinstance(parent, list):
        item = _child(parent, key)
        if item is None:
            raise LookupError(f"{key} is gone")
        parent.remove(item)
    elif key in parent:
        del parent[key]
    else:
        raise LookupError(f"{key} is gone")


def _put(parent: Any, key: str, value: Any) -> None:
    if not isinstance(parent, dict):
        raise LookupError(f"{key}: not a mapping")
    parent[key] = value


def _where(entry: Any) -> str:
    try:
        return ".".join(str(step) for step in entry[1])
    except (TypeError, IndexError):
        return "?"


# -- small things ------------------------------------------------------------------------

_MISSING = object()
#: A token: it goes into an HTTP header, and is no secret when short.
_TOKEN = re.compile(r"[\x21-\x7e]{16,4096}")


def _before(mapping: dict, key: str, other: str) -> None:
    """Move ``key`` just before ``other`` (for the reader: the order of a
    mapping means nothing to Kubernetes)."""
    if key not in mapping or other not in mapping:
        return
    items = [(k, v) for k, v in mapping.items() if k != key]
    at = [k for k, _ in items].index(other)
    items.insert(at, (key, mapping[key]))
    mapping.clear()
    mapping.update(items)


def _annotations(pod: Any) -> dict:
    """The pod's annotations (a new empty mapping when it has none)."""
    if not isinstance(pod, dict):
        raise InjectError("not a pod: expected a mapping with metadata and spec")
    meta = pod.get("metadata")
    if not isinstance(meta, dict):
        return {}
    annotations = meta.get("annotations")
    return annotations if isinstance(annotations, dict) else {}


def _stale(annotations: Mapping[str, Any]) -> list[str]:
    """Warnings for an injected pod whose annotations or injector changed."""
    warnings = []
    if annotations.get(INJECTED) != __version__:
        warnings.append(f"injected by registrar {annotations.get(INJECTED)}, this is "
                        f"{__version__}: not injected again (--uninject, then inject, to "
                        "update it)")
    try:
        recorded = json.loads(annotations.get(UNDO) or "")["annotations"]
    except (TypeError, ValueError, KeyError):
        return warnings
    now = {k: v for k, v in annotations.items()
           if isinstance(k, str) and k.startswith(PREFIX) and k not in (TOKEN, INJECTED, UNDO)}
    if isinstance(recorded, dict) and now != recorded:
        changed = sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))
        warnings.append(f"{', '.join(changed)} changed since the pod was injected: not injected "
                        "again (--uninject, then inject, to apply them)")
    return warnings


def _summary(handler: Any) -> str:
    if isinstance(handler, dict):
        if "exec" in handler:
            return "exec " + " ".join(map(str, (handler["exec"] or {}).get("command") or []))
        if "httpGet" in handler:
            return f"httpGet {(handler['httpGet'] or {}).get('path', '/')}"
        if "sleep" in handler:
            return f"sleep {(handler['sleep'] or {}).get('seconds')}s"
    return "?"


def _quote(value: Any) -> str:
    from .text import show

    return show(value)


def _or(choices: tuple[str, ...]) -> str:
    return ", ".join(choices[:-1]) + f" or {choices[-1]}"
