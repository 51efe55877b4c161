"""etcd over TLS with client certificates and etcd's own auth, against one
real etcd member started with --client-cert-auth, auth enabled, and simple
tokens that expire after 2 s (so every test also crosses token expiries).

etcd's JSON gateway (what etcd3gw speaks) cannot take the user from a client
certificate's Common Name: with auth on, etcd 3.4 refuses a gateway request
whose certificate has a CN. Mutual TLS therefore pairs a CN-less client
certificate with username + password, and a certificate with a CN is a
clear rejection, tested here."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import uuid

import pytest
import yaml

from registrar import Instance, Registrar
from registrar.errors import ConfigError, RegistryUnavailable
from registrar.plugin import MemberDown
from registrar_etcd import EtcdBackend, EtcdConfig
from registrar_testing import free_port, wait_until
from registrar_testing.certs import CertificateAuthority
from registrar_testing.conformance import BackendConformance, Harness, registration_refusal
from registrar_testing.etcd import EtcdCluster, ServerTLS, kv_get_serializable

ROOT_PASSWORD = "root-" + uuid.uuid4().hex
PASSWORD = "pw-" + uuid.uuid4().hex
TOKEN_TTL = 2  # seconds: --auth-token-ttl


class Server:
    """The module's etcd member, its certificates and an admin (root) view
    that reads what etcd holds independently of the code under test."""

    def __init__(self, tmp):
        self.ca = CertificateAuthority(tmp / "ca")
        self.other_ca = CertificateAuthority(tmp / "other-ca", name="some other CA")
        server = self.ca.server("etcd-server")
        admin = self.ca.client("admin", common_name=False)
        self.client = self.ca.client("registrar", common_name=False)
        self.cn_client = self.ca.client("registrar-cn")  # CN=registrar-cn
        self.foreign_client = self.other_ca.client("registrar", common_name=False)
        self.password_file = tmp / "etcd-password"
        self.password_file.write_text(PASSWORD + "\n")
        self.cluster = EtcdCluster(1, tmp / "etcd", tls=ServerTLS(
            self.ca.ca_file, server.cert_file, server.key_file, client_cert_auth=True,
            client_cert_file=admin.cert_file, client_key_file=admin.key_file),
            extra_args=["--auth-token=simple", f"--auth-token-ttl={TOKEN_TTL}"])
        self._root_token: str | None = None

    def start(self) -> None:
        self.cluster.start()
        self.cluster.enable_auth(ROOT_PASSWORD)
        token = self.root_token()
        self.cluster.add_user("registrar", PASSWORD, "services/", token)
        self.cluster.call("/v3/auth/role/grant", {"name": "registrar", "perm": {
            "permType": "READWRITE", "key": _b64("/conformance/"),
            "range_end": _b64("/conformance0")}}, token=token)

    def root_token(self, fresh: bool = False) -> str:
        if fresh or self._root_token is None:
            self._root_token = self.cluster.authenticate("root", ROOT_PASSWORD)
        return self._root_token

    def admin(self, fn):
        """``fn(token)`` with root's token, authenticating again once it expired."""
        try:
            return fn(self.root_token())
        except urllib.error.HTTPError as exc:
            if exc.code != 401:
                raise
            return fn(self.root_token(fresh=True))

    def holds(self, key: str) -> bool:
        return self.admin(lambda token: kv_get_serializable(
            self.cluster.endpoints[0], key, context=self.cluster.context, token=token)[1])

    def lease_of(self, key: str) -> int | None:
        return self.admin(lambda token: kv_get_serializable(
            self.cluster.endpoints[0], key, context=self.cluster.context, token=token)[2])

    def token_valid(self, token: str) -> bool:
        try:
            self.cluster.call("/v3/kv/range", {"key": _b64("services/probe")}, token=token)
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                return False
            raise
        return True

    def section(self, **overrides):
        return {"type": "etcd", "endpoints": self.cluster.endpoints, "ttl": "2s",
                "timeout": "1s", "username": "registrar",
                "password_file": str(self.password_file),
                "tls": {"ca_file": self.ca.ca_file, "cert_file": self.client.cert_file,
                        "key_file": self.client.key_file}, **overrides}


def _b64(text: str) -> str:
    import base64
    return base64.b64encode(text.encode()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("etcd-tls"))
    try:
        srv.start()
        yield srv
    finally:
        srv.cluster.stop()


@pytest.fixture
def instance():
    tag = uuid.uuid4().hex[:8]
    return Instance(f"svc-{tag}", f"pod-{tag}", "10.9.8.7", 8080)


def backend_for(server, instance, environ=None, **overrides) -> EtcdBackend:
    config = EtcdConfig.parse(server.section(**overrides))
    return EtcdBackend(instance, config, environ={} if environ is None else environ)


def key_of(instance, prefix="services"):
    return f"{prefix}/{instance.service}/{instance.hostport}"


def tokens_of(backend: EtcdBackend) -> set[str]:
    members = backend._cluster.members + [o._member for o in backend.observers()]
    return {m._token for m in members if m._token}


def let_tokens_expire() -> None:
    """Wait until etcd has dropped every token idle since now. Nothing shows
    it without using a token, and a use extends it: etcd drops a simple
    token --auth-token-ttl after its last use, checking every second."""
    time.sleep(TOKEN_TTL + 2)


def rejection(backend: EtcdBackend) -> str:
    """The one line a rejected registration gives (the backend is closed)."""
    return registration_refusal(backend, (PASSWORD, ROOT_PASSWORD))


# -- the conformance suite over TLS, mutual TLS and password auth ----------------------


class TLSHarness(Harness):
    ttl = 2.0

    def __init__(self, server: Server):
        self.server = server

    def section(self, **overrides):
        return self.server.section(prefix="/conformance", ttl=f"{self.ttl}s", **overrides)

    def views(self, instance):
        return [self.server.holds(key_of(instance, "/conformance"))]

    def lose_registration(self, backend):
        lease = self.server.lease_of(key_of(backend.instance, "/conformance"))
        self.server.admin(lambda token: self.server.cluster.call(
            "/v3/kv/lease/revoke", {"ID": lease}, token=token))

    def crash(self, backend):
        pass  # the lease simply stops being renewed

    def member_ports(self):
        return [m.client_port for m in self.server.cluster.members]


class TestEtcdTLSConformance(BackendConformance):
    @pytest.fixture
    def harness(self, server):
        return TLSHarness(server)


# -- what works --------------------------------------------------------------------------


def test_register_heartbeat_deregister_with_the_password_from_the_environment(server, instance):
    backend = backend_for(server, instance, environ={"ETCD_PASSWORD": PASSWORD},
                          password_file=None)
    try:
        backend.register()
        assert server.holds(key_of(instance))
        assert backend.heartbeat() is False
        position = backend.deregister()
        assert not server.holds(key_of(instance))
        assert not backend.observers()[0].sees(instance, since=position)
    finally:
        backend.close()


def test_an_expired_token_is_renewed_and_the_call_goes_through(server, instance):
    backend = backend_for(server, instance, ttl="10s")  # outlives the tokens
    observer = backend.observers()[0]
    try:
        backend.register()
        assert observer.sees(instance)
        (first,) = {m._token for m in backend._cluster.members}
        let_tokens_expire()
        assert not server.token_valid(first)
        assert backend.heartbeat() is False  # the entry is intact: nothing to repair
        (second,) = {m._token for m in backend._cluster.members}
        assert second != first and server.token_valid(second)
        assert observer.sees(instance)  # the observer's token had expired too
        position = backend.deregister()
        assert not observer.sees(instance, since=position)
        assert not server.holds(key_of(instance))
    finally:
        backend.close()


def test_ca_file_wins_over_requests_ca_bundle_in_the_environment(server, instance, monkeypatch):
    # requests would otherwise verify against $REQUESTS_CA_BUNDLE, not tls.ca_file.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", server.other_ca.ca_file)
    monkeypatch.setenv("CURL_CA_BUNDLE", server.other_ca.ca_file)
    backend = backend_for(server, instance)
    try:
        backend.register()
        assert server.holds(key_of(instance))
        backend.deregister()
    finally:
        backend.close()


def test_no_secret_in_logs_errors_or_status(server, instance, caplog):
    caplog.set_level(logging.DEBUG)
    registrar = Registrar.from_config({
        "service": {"name": instance.service, "id": instance.id, "address": instance.address,
                    "port": instance.port},
        "backends": [server.section()],
        "stop": {"grace_period": "10s", "propagation_timeout": "5s"},
        "health": False})  # no app listens: register at once
    tokens: set[str] = set()
    registrar.start(wait=True, timeout=10)
    try:
        (backend,) = registrar.backends
        tokens |= tokens_of(backend)
        # The observer's token expires while it is idle (heartbeats keep the
        # backend's alive): its renewal is logged too.
        observer = backend.observers()[0]
        let_tokens_expire()
        assert not server.token_valid(observer._member._token)
        assert observer.sees(instance)
        tokens |= tokens_of(backend)
        status = json.dumps(registrar.status())
    finally:
        report = registrar.stop("test")
    assert report.ok, report.summary()
    errors = []
    for overrides in ({"password_file": None}, {"username": "nobody"}):
        environ = {"ETCD_PASSWORD": "not-" + PASSWORD}
        errors.append(rejection(backend_for(server, instance, environ=environ, **overrides)))
    assert len(tokens) >= 2
    secrets = [PASSWORD, ROOT_PASSWORD, "not-" + PASSWORD, *tokens]
    for text in (caplog.text, status, report.summary(), *errors):
        for secret in secrets:
            assert secret not in text
    assert "authenticating again" in caplog.text  # the renewal was logged (at DEBUG)


@pytest.fixture(scope="module")
def plain_tls(tmp_path_factory, server):
    """A second member: TLS with no client certificates and no auth."""
    srv = server.ca.server("etcd-plain")
    cluster = EtcdCluster(1, tmp_path_factory.mktemp("etcd-plain-tls"), tls=ServerTLS(
        server.ca.ca_file, srv.cert_file, srv.key_file))
    with cluster:
        yield cluster


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
@pytest.mark.parametrize("section", [
    {"tls": "ca_file"},
    {"tls": {"verify": False}},
    # Credentials given before `etcdctl auth enable`: no token until etcd asks.
    {"tls": "ca_file", "username": "registrar", "password_file": "file"},
], ids=["ca_file", "verify-false", "auth-not-enabled-yet"])
def test_tls_without_client_certificates_or_auth(server, plain_tls, instance, section, caplog):
    caplog.set_level(logging.INFO)
    section = dict(section, endpoints=plain_tls.endpoints)
    if section["tls"] == "ca_file":
        section["tls"] = {"ca_file": server.ca.ca_file}
    section.setdefault("username", None)
    section["password_file"] = str(server.password_file) if "password_file" in section else None
    backend = backend_for(server, instance, **section)
    key = key_of(instance)
    try:
        backend.register()
        assert kv_get_serializable(plain_tls.endpoints[0], key, context=plain_tls.context)[1]
        assert backend.observers()[0].sees(instance)
        backend.deregister()
        assert not kv_get_serializable(plain_tls.endpoints[0], key, context=plain_tls.context)[1]
    finally:
        backend.close()
    if section["username"]:
        assert "auth is not enabled" in caplog.text


# -- what is refused, in one line ------------------------------------------------------


def test_a_wrong_password_is_a_one_line_rejection(server, instance):
    message = rejection(backend_for(server, instance, environ={"ETCD_PASSWORD": "wrong"},
                                    password_file=None))
    assert "authentication failed for user 'registrar'" in message
    assert "$ETCD_PASSWORD" in message


def test_an_unknown_user_is_a_one_line_rejection(server, instance):
    message = rejection(backend_for(server, instance, username="nobody"))
    assert "authentication failed for user 'nobody'" in message


def test_no_credentials_while_auth_is_on_says_what_to_configure(server, instance):
    message = rejection(backend_for(server, instance, username=None, password_file=None))
    assert "etcd requires authentication" in message and "password_file" in message


def test_a_prefix_the_user_may_not_write_is_a_rejection(server, instance):
    message = rejection(backend_for(server, instance, prefix="/elsewhere"))
    assert "permission denied" in message and "'registrar'" in message


def test_a_client_certificate_with_a_common_name_is_refused_clearly(server, instance):
    tls = {"ca_file": server.ca.ca_file, "cert_file": server.cn_client.cert_file,
           "key_file": server.cn_client.key_file}
    message = rejection(backend_for(server, instance, tls=tls))
    assert "Common Name" in message and "without CN" in message


@pytest.mark.parametrize("cert", ["foreign", "none"])
def test_a_client_certificate_the_server_does_not_trust_is_a_tls_rejection(server, instance,
                                                                           cert):
    tls = {"ca_file": server.ca.ca_file}
    if cert == "foreign":
        tls |= {"cert_file": server.foreign_client.cert_file,
                "key_file": server.foreign_client.key_file}
    message = rejection(backend_for(server, instance, tls=tls))
    assert "TLS handshake failed: the server refused our client certificate" in message


@pytest.mark.parametrize("tls", ["other CA", "system bundle"])
def test_a_server_certificate_we_do_not_trust_is_certificate_verify_failed(server, instance, tls,
                                                                           monkeypatch):
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    section = None if tls == "system bundle" else {
        "ca_file": server.other_ca.ca_file, "cert_file": server.client.cert_file,
        "key_file": server.client.key_file}
    message = rejection(backend_for(server, instance, tls=section))
    assert "TLS: certificate verify failed" in message


def test_observers_report_tls_failures_as_unavailable(server, instance):
    backend = backend_for(server, instance, tls={"ca_file": server.other_ca.ca_file})
    try:
        with pytest.raises(RegistryUnavailable) as info:
            backend.observers()[0].sees(instance)
        assert not isinstance(info.value, MemberDown)
        assert "certificate verify failed" in str(info.value)
    finally:
        backend.close()


# -- the config -------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"endpoints": ["http://127.0.0.1:2379"]}, "tls is for https:// endpoints"),
    ({"username": None}, "password_file needs username"),
    ({"password_file": "/nonexistent/etcd-password"}, "cannot read"),
    ({"tls": {"key_file": "/etc/hostname"}}, "key_file needs cert_file"),
])
def test_config_errors(server, overrides, message):
    with pytest.raises(ConfigError, match=message):
        EtcdConfig.parse(server.section(**overrides))


def test_a_username_without_a_password_is_a_config_error_naming_the_field(server, instance):
    config = EtcdConfig.parse(server.section(password_file=None))
    with pytest.raises(ConfigError) as info:
        EtcdBackend(instance, config, environ={})
    assert info.value.path == "password_file" and "ETCD_PASSWORD" in str(info.value)


# -- end to end: the real `registrar agent` --------------------------------------------


def agent(tmp_path, server, service, **section):
    control = f"127.0.0.1:{free_port()}"
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({
        "service": {"name": service, "port": 8080},
        "backends": [{k: v for k, v in server.section(ttl="3s", **section).items()
                      if v is not None}],
        "stop": {"grace_period": "10s", "safety_margin": "1s"},
        "control": {"listen": control},
        "health": False,  # no app listens here: register at once
    }))
    env = {k: v for k, v in os.environ.items() if k != "ETCD_PASSWORD"}
    env |= {"POD_NAME": "tls-pod", "POD_IP": "10.20.30.40"}
    return subprocess.Popen([sys.executable, "-m", "registrar", "agent", "--config", str(path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_agent_registers_over_tls_with_a_password_file_and_leaves_on_sigterm(tmp_path, server):
    service = f"e2e-{uuid.uuid4().hex[:8]}"
    key = f"services/{service}/10.20.30.40:8080"
    proc = agent(tmp_path, server, service)
    try:
        wait_until(lambda: server.holds(key), 15, "the agent's key is in etcd")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        assert not server.holds(key)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=5)
    assert proc.returncode == 0, err
    assert "deregistered after SIGTERM" in err and "confirmed 1/1 observers" in err
    assert PASSWORD not in err


def test_agent_with_a_wrong_password_exits_1_with_one_line(tmp_path, server):
    (tmp_path / "wrong").write_text("wrong-password\n")
    proc = agent(tmp_path, server, f"e2e-{uuid.uuid4().hex[:8]}",
                 password_file=str(tmp_path / "wrong"))
    try:
        proc.wait(timeout=15)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=5)
    assert proc.returncode == 1, err
    assert "Traceback" not in err and "wrong-password" not in err
    lines = [line for line in err.splitlines() if "authentication failed" in line]
    assert lines and "user 'registrar'" in lines[0], err


def test_verify_false_warns_once_through_the_log(plain_tls, tmp_path):
    """Issue 24 (6): with tls.verify: false urllib3 printed its warning raw,
    two lines per request, into JSON logs. It is one log line, once per host."""
    port = free_port()
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({
        "service": {"name": "warned", "port": port, "id": "w-1", "address": "127.0.0.1"},
        "backends": [{"type": "etcd", "endpoints": plain_tls.endpoints, "ttl": "3s",
                      "tls": {"verify": False}}],
        "health": False}))
    done = subprocess.run([sys.executable, "-m", "registrar", "register", "-c", str(path),
                           "--timeout", "15", "--log-format", "json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    warned = [r for r in records if "Unverified HTTPS request" in r["msg"]]
    assert len(warned) == 1, lines
    assert warned[0]["level"] == "warning" and warned[0]["logger"] == "py.warnings"
    assert warned[0]["msg"].startswith("InsecureRequestWarning: Unverified HTTPS request")


@pytest.mark.parametrize("case,expected", [
    ("expired", "(certificate has expired): the server's certificate has expired: renew it"),
    ("other CA", "(unable to get local issuer certificate): the server's certificate is not "
                 "signed by the CA in tls.ca_file"),
    ("wrong host", "mismatch"),
])
def test_a_certificate_failure_names_its_own_cause(server, tmp_path, case, expected):
    """Issue 24 (7): an expired certificate was reported as "not signed by
    the CA in tls.ca_file … or does not name this host". A real handshake
    (requests, as the etcd and Consul backends make it) with a server whose
    certificate has that one fault: the message says what the TLS library said."""
    import socket
    import ssl
    import threading

    import requests

    from registrar_consul._client import tls_error
    from registrar_etcd._gateway import _tls_reason

    pair = (server.ca.server("expired", expired=True) if case == "expired"
            else server.other_ca.server("other") if case == "other CA"
            else server.ca.server("elsewhere", hosts=("10.9.9.9", "elsewhere.example")))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pair.cert_file, pair.key_file)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept() -> None:
        try:
            conn, _ = listener.accept()
            with conn:
                try:
                    context.wrap_socket(conn, server_side=True).close()
                except (ssl.SSLError, OSError):
                    pass  # the client hangs up: that is the point
        except OSError:
            pass

    threading.Thread(target=accept, daemon=True).start()
    try:
        with pytest.raises(requests.exceptions.SSLError) as info:
            requests.get(f"https://127.0.0.1:{port}/health", verify=server.ca.ca_file, timeout=5)
    finally:
        listener.close()
    text = str(info.value)
    for message in (_tls_reason(text), tls_error(text)[1]):
        assert message.startswith("TLS: certificate verify failed (") and expected in message, \
            message
        if case == "expired":
            assert "not signed" not in message and "name this host" not in message
