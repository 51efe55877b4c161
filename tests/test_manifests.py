"""The Kubernetes manifests in config/k8s/ hold configs that load, and their
hooks, probes and grace periods agree with those configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from registrar import config
from registrar.source import parse_listen

K8S = Path(__file__).resolve().parent.parent / "config" / "k8s"
ENV = {"POD_NAME": "web-0", "POD_IP": "10.244.0.9",
       "ETCD_ENDPOINTS": "http://etcd-0.etcd:2379,http://etcd-1.etcd:2379"}


def documents(path):
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text())}


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_manifest_config_loads_and_matches_the_pod(path, tmp_path):
    docs = documents(path)
    raw = yaml.safe_load(docs["ConfigMap"]["data"]["agent.yaml"])
    control = raw.get("control", {})
    token = None
    if "token_file" in control:  # mounted from the Secret in the pod
        token = docs["Secret"]["stringData"]["token"]
        (tmp_path / "token").write_text(token)
        control["token_file"] = str(tmp_path / "token")
    cfg = config.load(raw, environ=ENV)

    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == cfg.stop.grace_period
    _, port = parse_listen(config.expand({"l": cfg.control.listen}, environ=ENV)["l"])
    app = pod["containers"][0]
    assert app["readinessProbe"]["httpGet"]["port"] == port
    # httpGet's `host` is where the kubelet connects: 127.0.0.1 would probe the node.
    for container in pod.get("initContainers", []) + pod["containers"]:
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert "host" not in container.get(probe, {}).get("httpGet", {}), (container["name"],
                                                                                 probe)
    listen_host, _ = parse_listen(config.expand({"l": cfg.control.listen}, environ=ENV)["l"])
    assert listen_host == ENV["POD_IP"], "the kubelet's probes and hooks go to the pod IP"
    hook = app["lifecycle"]["preStop"]
    if "httpGet" in hook:
        assert hook["httpGet"]["port"] == port and hook["httpGet"]["path"] == "/prestop"
        headers = {h["name"]: h["value"] for h in hook["httpGet"].get("httpHeaders", [])}
        assert headers.get("Authorization") == f"Bearer {token}"
    else:
        assert hook["exec"]["command"][:2] == ["registrar", "prestop"]
    for container in pod.get("initContainers", []) + pod["containers"]:
        env = {e["name"] for e in container.get("env", [])}
        if "registrar" in " ".join(container.get("command", []) + container.get("args", [])):
            assert {"POD_NAME", "POD_IP"} <= env
