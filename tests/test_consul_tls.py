"""Consul over TLS with ACLs, on a real cluster: three servers and a client
agent serving HTTPS only, requiring client certificates (verify_incoming),
RPC verified both ways, ACLs denying by default; certificates from the
testing kit's CA. The backend registers at the client agent with a token
from a file; the observers read the servers over the same TLS."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from urllib.parse import urlsplit

import pytest
import requests
import yaml

from registrar import Instance, Registrar
from registrar.config import StopConfig
from registrar.errors import ConfigError, MemberDown, RegistrationRejected, RegistryUnavailable
from registrar_consul import ConsulBackend, ConsulConfig
from registrar_testing import free_port, wait_until
from registrar_testing.certs import CertificateAuthority
from registrar_testing.conformance import BackendConformance, Harness, registration_refusal
from registrar_testing.consul import ConsulCluster, passing_ids

#: What the pod's token may do: register any service, read back the entry
#: (node:read), read the agent (its node name and datacenter).
POLICY = ('service_prefix "" { policy = "write" }\n'
          'node_prefix "" { policy = "read" }\n'
          'agent_prefix "" { policy = "read" }')


class Secure:
    """The module's cluster, its CA, a client certificate for the pod and a
    token file; plus another CA that the cluster does not trust."""

    def __init__(self, tmp, cluster: ConsulCluster, ca: CertificateAuthority):
        self.cluster, self.ca, self.tmp = cluster, ca, tmp
        self.client = ca.client("registrar")
        self.other_ca = CertificateAuthority(tmp / "other-ca", name="another CA")
        self.token = cluster.create_token(POLICY, "registrar test pods")
        self.token_file = tmp / "consul-token"
        self.token_file.write_text(self.token + "\n")

    def tls(self, **overrides):
        return {"ca_file": self.ca.ca_file, "cert_file": self.client.cert_file,
                "key_file": self.client.key_file, **overrides}

    def section(self, **overrides):
        return {"type": "consul", "address": self.cluster.client_addr,
                "observers": self.cluster.server_addrs, "ttl": "2s", "timeout": "1s",
                "token_file": str(self.token_file), "tls": self.tls(), **overrides}

    def backend(self, instance, **overrides) -> ConsulBackend:
        return ConsulBackend(instance, ConsulConfig.parse(self.section(**overrides)),
                             environ={})

    def views(self, instance) -> list[bool]:
        """Each server's own replica, read with the management token."""
        return [instance.id in passing_ids(a, instance.service, self.cluster.management_token,
                                           **self.cluster.tls_args)
                for a in self.cluster.server_addrs]


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("consul-tls-acl")
    ca = CertificateAuthority(tmp / "ca")
    with ConsulCluster(tmp / "cluster", servers=3, clients=1, acl=True, tls=ca) as cluster:
        yield Secure(tmp, cluster, ca)


@pytest.fixture
def instance():
    tag = uuid.uuid4().hex[:8]
    return Instance(f"svc-{tag}", f"pod-{tag}", "10.1.2.3", 8443, tags=["tls"])


def test_the_cluster_refuses_plain_http_and_clients_without_a_certificate(secure):
    # What the rest of the module relies on: TLS and ACLs are really on.
    addr = secure.cluster.client_addr
    assert addr.startswith("https://")
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{addr}/v1/status/leader", verify=secure.ca.ca_file, timeout=2)
    plain = requests.get(f"http://{urlsplit(addr).netloc}/v1/status/leader", timeout=2)
    assert plain.status_code == 400  # "Client sent an HTTP request to an HTTPS server"
    r = requests.get(f"{addr}/v1/agent/self", timeout=2, **secure.cluster.tls_args)
    assert r.status_code == 403  # no token: default deny


def test_register_heartbeat_drain_deregister_over_https_with_a_token_file(secure, instance):
    backend = secure.backend(instance)
    try:
        backend.register()
        wait_until(lambda: all(secure.views(instance)), 5, "every server lists it")
        assert all(o.sees(instance) for o in backend.observers())
        assert backend._node == secure.cluster.clients[0].name  # agent:read over HTTPS
        assert backend.heartbeat() is False
        backend.drain("test")
        wait_until(lambda: not any(secure.views(instance)), 5, "drained from ?passing")
        removal = backend.deregister()
        assert isinstance(removal.removed_index, int)
        wait_until(lambda: not any(o.sees(instance, since=removal) for o in backend.observers()),
                   5, "every observer confirms the removal")
    finally:
        backend.close()


def test_stop_confirms_on_every_server(secure, instance):
    backend = secure.backend(instance)
    registrar = Registrar(instance, [backend], stop=StopConfig(grace_period=10,
                                                               propagation_timeout=5))
    registrar.start(wait=True, timeout=10)
    wait_until(lambda: all(secure.views(instance)), 5, "every server lists it")
    report = registrar.stop("test")
    assert secure.views(instance) == [False, False, False]
    assert report.ok, report.summary()
    assert len(report.backends[0].observers_confirmed) == 3


def rejected(secure, instance, **overrides) -> str:
    """register() refused: its message, checked to be one line."""
    return registration_refusal(secure.backend(instance, **overrides), (secure.token,))


def test_a_token_consul_does_not_know_is_rejected_naming_the_file(secure, instance, tmp_path):
    wrong = tmp_path / "wrong-token"
    wrong.write_text(str(uuid.uuid4()))
    message = rejected(secure, instance, token_file=str(wrong))
    assert f"Consul does not know the ACL token from {wrong} (ACL not found)" in message
    assert wrong.read_text() not in message


def test_a_token_without_the_right_policy_is_rejected(secure, instance, tmp_path):
    weak = tmp_path / "weak-token"
    weak.write_text(secure.cluster.create_token('service "someone-else" { policy = "write" }'))
    message = rejected(secure, instance, token_file=str(weak))
    assert f"the ACL token from {weak} may not do this (Permission denied" in message
    assert weak.read_text() not in message


@pytest.mark.parametrize("which", ["another CA's", "none"])
def test_a_client_certificate_the_agent_does_not_trust_is_a_clear_tls_error(
        secure, instance, which):
    if which == "none":
        tls = secure.tls(cert_file=None, key_file=None)
    else:
        pair = secure.other_ca.client("intruder")
        tls = secure.tls(cert_file=pair.cert_file, key_file=pair.key_file)
    message = rejected(secure, instance, tls=tls)
    assert message.startswith(f"read the agent's config at {secure.cluster.client_addr}: "
                              f"TLS: the agent refused our client certificate ("), message
    assert "tls.cert_file" in message


@pytest.mark.parametrize("ca", ["another CA", "the system CAs"])
def test_a_server_certificate_the_ca_did_not_sign_fails_verification(secure, instance, ca):
    tls = secure.tls(ca_file=secure.other_ca.ca_file if ca == "another CA" else None)
    message = rejected(secure, instance, tls=tls)
    assert "TLS: certificate verify failed (unable to get local issuer certificate)" in message
    assert "tls.ca_file" in message


def test_the_observers_report_tls_errors_as_transient(secure, instance):
    # A server whose certificate we cannot verify cannot confirm anything;
    # sees() raises the kind the stop sequence retries until its deadline.
    backend = secure.backend(instance)
    try:
        backend.register()
        other = secure.backend(instance, tls=secure.tls(ca_file=secure.other_ca.ca_file))
        try:
            with pytest.raises(RegistryUnavailable, match="TLS: certificate verify failed") as e:
                other.observers()[0].sees(instance)
            assert not isinstance(e.value, (RegistrationRejected, MemberDown))
        finally:
            other.close()
    finally:
        backend.deregister()
        backend.close()


def test_verify_false_skips_the_check_and_says_so(secure, instance, caplog):
    with caplog.at_level(logging.WARNING, logger="registrar_consul"):
        backend = secure.backend(instance, tls=secure.tls(ca_file=None, verify=False))
    try:
        backend.register()
        backend.deregister()
    finally:
        backend.close()
    assert "tls.verify is false" in caplog.text


@pytest.mark.parametrize("tls, expected", [
    ("mismatched key", "its unencrypted private key (key values mismatch)"),
    ("CA file is a key", "ca_file"),
    ("http address", "tls: set, but the agent's address http://127.0.0.1:8500 is http://"),
])
def test_tls_files_and_addresses_that_cannot_work_are_config_errors(secure, instance, tls,
                                                                   expected):
    other = secure.other_ca.client("other")
    overrides = {
        "mismatched key": {"tls": secure.tls(key_file=other.key_file)},
        "CA file is a key": {"tls": secure.tls(ca_file=secure.client.key_file)},
        "http address": {"address": "http://127.0.0.1:8500"},
    }[tls]
    with pytest.raises((ConfigError, ValueError)) as caught:
        secure.backend(instance, **overrides).close()
    assert expected in str(caught.value)


def test_scheme_less_addresses_default_to_https_with_tls(secure, instance):
    host = urlsplit(secure.cluster.client_addr).netloc
    backend = secure.backend(instance, address=host,
                             observers=[urlsplit(a).netloc for a in secure.cluster.server_addrs])
    try:
        backend.register()
        wait_until(lambda: all(o.sees(instance) for o in backend.observers()), 5,
                   "every observer (https by default) lists it")
    finally:
        backend.deregister()
        backend.close()


def test_the_token_is_never_in_debug_logs_status_or_errors(secure, instance, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)  # urllib3's request lines too
    backend = secure.backend(instance)
    registrar = Registrar(instance, [backend], stop=StopConfig(grace_period=10,
                                                               propagation_timeout=5))
    registrar.start(wait=True, timeout=10)
    status = json.dumps(registrar.status())
    report = registrar.stop("test")
    assert report.ok, report.summary()
    wrong = tmp_path / "wrong-token"
    wrong.write_text(str(uuid.uuid4()))
    errors = [rejected(secure, instance, token_file=str(wrong)),
              rejected(secure, instance, tls=secure.tls(ca_file=secure.other_ca.ca_file))]
    assert '"sees": true' in status and "/v1/agent/service/register" in caplog.text
    everything = "\n".join([caplog.text, status, report.summary(), *errors])
    assert secure.token not in everything
    assert wrong.read_text() not in everything


# -- the real CLI ---------------------------------------------------------------

def agent_yaml(secure, tmp_path, service, **control):
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({
        "service": {"name": service, "port": 8080},
        "backends": [{"type": "consul", "address": secure.cluster.client_addr,
                      "observers": secure.cluster.server_addrs, "ttl": "3s", "timeout": "1s",
                      "token_file": str(secure.token_file), "tls": secure.tls()}],
        "control": {"listen": None, **control},
        "stop": {"grace_period": "10s", "safety_margin": "1s"},
        "health": False,  # no app listens here: register at once
    }))
    return path


def spawn(*args, pod="tls-pod", **env):
    env = {**os.environ, "POD_NAME": pod, "POD_IP": "10.20.30.40", **env}
    for var in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE"):
        env.pop(var, None)
    return subprocess.Popen([sys.executable, "-m", "registrar", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_agent_cli_registers_over_tls_and_leaves_on_sigterm(secure, tmp_path):
    service = f"e2e-{uuid.uuid4().hex[:8]}"
    port = free_port()
    path = agent_yaml(secure, tmp_path, service, listen=f"127.0.0.1:{port}")
    pod = Instance(service, "tls-pod", "10.20.30.40", 8080)
    agent = spawn("agent", "--config", str(path), "--log-level", "debug")
    try:
        wait_until(lambda: all(secure.views(pod)), 15, "every server lists the agent")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as r:
            status = r.read().decode()
        assert '"sees": true' in status
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=15)
        assert secure.views(pod) == [False, False, False]
    finally:
        agent.kill()
        out, err = agent.communicate(timeout=5)
    assert agent.returncode == 0, err
    assert "consul: confirmed 3/3 observers" in err, err
    assert secure.token not in out + err + status


def test_agent_cli_with_a_wrong_token_exits_1_with_one_line(secure, tmp_path):
    service = f"e2e-{uuid.uuid4().hex[:8]}"
    path = agent_yaml(secure, tmp_path, service)
    wrong = tmp_path / "wrong-token"
    wrong.write_text(str(uuid.uuid4()))
    doc = yaml.safe_load(path.read_text())
    doc["backends"][0]["token_file"] = str(wrong)
    path.write_text(yaml.safe_dump(doc))
    agent = spawn("agent", "--config", str(path))
    try:
        out, err = agent.communicate(timeout=30)
    finally:
        agent.kill()
    assert agent.returncode == 1, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "registration rejected" in ln]
    assert len(lines) == 1, err
    assert f"Consul does not know the ACL token from {wrong} (ACL not found)" in lines[0], err
    assert wrong.read_text() not in out + err


# -- the conformance suite, over TLS with ACLs -----------------------------------

class SecureHarness(Harness):
    ttl = 2.0

    def __init__(self, secure: Secure):
        self.secure = secure

    def section(self, **overrides):
        return self.secure.section(ttl=f"{self.ttl}s", **overrides)

    def views(self, instance):
        return self.secure.views(instance)

    def lose_registration(self, backend):
        # What a wiped agent does: it no longer knows the service.
        self.secure.cluster.clients[0].request(
            "PUT", f"/v1/agent/service/deregister/{backend.instance.id}")

    def crash(self, backend):
        pass  # the TTL check simply stops being passed

    def member_ports(self):
        c = self.secure.cluster
        return [urlsplit(a).port for a in [c.client_addr, *c.server_addrs]]


class TestConsulTLSConformance(BackendConformance):
    @pytest.fixture
    def harness(self, secure):
        return SecureHarness(secure)
