"""ZooKeeper over TLS and with digest auth, against a real server: ZooKeeper
3.8 with Netty on its secureClientPort, mutual TLS (ssl.clientAuth=need),
certificates made here. The plaintext clientPort stays open for the test's
own views (ServerViews) and four-letter words."""
from __future__ import annotations

import logging
import os
import signal
import ssl
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from kazoo.exceptions import NoAuthError

from registrar import Instance
from registrar.errors import ConfigError, RegistrationRejected
from registrar_testing import wait_until
from registrar_testing.certs import CertificateAuthority
from registrar_testing.zookeeper import ServerTLS, ServerViews, ZooKeeperEnsemble
from registrar_zookeeper import ZooKeeperBackend, ZooKeeperConfig

PASSWORD = "Zk-d1gest-s3cret"
OTHER_PASSWORD = "n0t-the-Same-0ne"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The server's CA with a server and a client certificate, and a second
    CA nobody trusts with a client certificate of its own."""
    base = tmp_path_factory.mktemp("zk-pki")
    ca = CertificateAuthority(base / "ca")
    rogue = CertificateAuthority(base / "rogue", name="rogue CA")
    return {"ca": ca, "server": ca.server("zk"), "client": ca.client("agent"),
            "other_client": ca.client("other-app"),
            "rogue": rogue, "rogue_client": rogue.client("intruder")}


@pytest.fixture(scope="module")
def zk_tls(pki, tmp_path_factory):
    base = tmp_path_factory.mktemp("zk-tls")
    ca = pki["ca"]
    tls = ServerTLS(keystore=ca.keystore(pki["server"], base / "keystore.p12"),
                    truststore=ca.truststore(base / "truststore.p12"), client_auth="need")
    with ZooKeeperEnsemble(1, base / "zk", tls=tls) as zk:
        yield zk


@pytest.fixture
def instance():
    tag = uuid.uuid4().hex[:8]
    return Instance(f"svc-{tag}", f"pod-{tag}", "10.9.8.7", 8080)


@pytest.fixture
def views(zk_tls):
    views = ServerViews(zk_tls.hosts)  # the plaintext port
    yield views
    views.close()


@pytest.fixture
def secrets(tmp_path):
    """Digest credentials in files, as a mounted Secret would hold them."""
    paths = {}
    for name, password in (("right", PASSWORD), ("wrong", OTHER_PASSWORD)):
        paths[name] = tmp_path / f"zk-auth-{name}"
        paths[name].write_text(f"registrar:{password}\n")
    return {k: str(v) for k, v in paths.items()}


def tls_section(pki, **override) -> dict:
    return {"ca_file": pki["ca"].ca_file, "cert_file": pki["client"].cert_file,
            "key_file": pki["client"].key_file, **override}


@pytest.fixture
def make(zk_tls, pki):
    """Build TLS backends on the server's secure port; closed at teardown."""
    made = []

    def build(instance, tls=None, **section):
        backend = ZooKeeperBackend(instance, ZooKeeperConfig.parse({
            "type": "zookeeper", "hosts": zk_tls.secure_hosts, "session_timeout": "3s",
            "timeout": "2s", "tls": tls or tls_section(pki), **section}))
        made.append(backend)
        return backend

    yield build
    for backend in made:
        backend.close()


def test_register_heartbeat_deregister_over_mutual_tls(make, views, instance):
    backend = make(instance)
    backend.register()
    assert isinstance(backend._client._connection._socket, ssl.SSLSocket)
    assert views.exists(backend.path) == [True]
    assert views.stat(0, backend.path).ephemeralOwner == backend._client.client_id[0]
    assert backend.heartbeat() is False  # there and ours: nothing written
    views.clients[0].delete(backend.path)
    assert backend.heartbeat() is True  # written again, over TLS
    observer = backend.observers()[0]
    assert observer.sees(instance) is True
    # The observer's own session goes over TLS too (the server offers nothing else).
    assert isinstance(observer._client._connection._socket, ssl.SSLSocket)
    zxid = backend.deregister()
    assert views.exists(backend.path) == [False]
    assert observer.sees(instance, since=zxid) is False


def test_digest_auth_over_tls_keeps_other_identities_out(make, views, instance, secrets, pki):
    backend = make(instance, auth={"file": secrets["right"]})
    backend.register()
    assert views.exists(backend.path) == [True]  # world:anyone:r
    # With mutual TLS the server authenticates the certificate too: auth::all
    # grants every identity of the creating session, its x509 one included.
    acl = {(a.id.scheme, a.id.id) for a in views.clients[0].get_acls(backend.path)[0]}
    assert ("x509", "CN=agent") in acl and ("world", "anyone") in acl
    assert any(scheme == "digest" and ident.startswith("registrar:") for scheme, ident in acl)
    # Another identity (its own certificate, another password): it may read,
    # not delete.
    other = pki["other_client"]
    intruder = make(instance, auth={"file": secrets["wrong"]},
                    tls=tls_section(pki, cert_file=other.cert_file, key_file=other.key_file))
    client = intruder.new_client(intruder.servers[0])
    client.start(timeout=10)
    try:
        assert client.exists(backend.path) is not None
        with pytest.raises(NoAuthError):
            client.delete(backend.path)
    finally:
        client.stop()
        client.close()
    # Nor take the node over, nor register beside it under the parent we made.
    with pytest.raises(RegistrationRejected, match=r"replacing .*: NoAuthError$"):
        intruder.register()
    sibling = Instance(instance.service, f"{instance.id}-2", "10.9.8.8", 8080)
    with pytest.raises(RegistrationRejected, match=r"register: NoAuthError$") as err:
        make(sibling, auth={"file": secrets["wrong"]},
             tls=tls_section(pki, cert_file=other.cert_file, key_file=other.key_file)).register()
    assert "\n" not in str(err.value) and OTHER_PASSWORD not in str(err.value)
    assert views.exists(backend.path) == [True]
    backend.deregister()
    assert views.exists(backend.path) == [False]


@pytest.mark.parametrize("case", ["client cert of another CA", "server cert of another CA"])
def test_a_refused_certificate_is_one_clear_line_not_a_retry_forever(make, pki, instance, case):
    rogue = pki["rogue"]
    if case == "client cert of another CA":  # the server refuses us
        tls = tls_section(pki, cert_file=pki["rogue_client"].cert_file,
                          key_file=pki["rogue_client"].key_file)
    else:  # we refuse the server
        tls = tls_section(pki, ca_file=rogue.ca_file)
    backend = make(instance, tls=tls)
    with pytest.raises(RegistrationRejected) as err:
        backend.register()
    message = str(err.value)
    assert message.startswith(f"zookeeper: TLS handshake with {backend.servers[0]} failed: "
                              + ("the server refused it: " if "client" in case
                                 else "certificate verify failed: ")), message
    assert "\n" not in message


def test_unusable_tls_files_are_a_config_error(pki, instance, tmp_path):
    wrong_key = pki["rogue_client"].key_file  # a key, not the certificate's
    with pytest.raises(ConfigError, match=r"^tls: cannot use these files: "):
        ZooKeeperBackend(instance, ZooKeeperConfig.parse({
            "type": "zookeeper", "tls": tls_section(pki, key_file=wrong_key)}))
    with pytest.raises(ConfigError, match="check_hostname needs verify"):
        ZooKeeperConfig.parse({"type": "zookeeper",
                                        "tls": {"verify": False, "check_hostname": True}})


def test_no_secret_in_logs_at_debug(make, pki, instance, secrets, caplog):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(1, logger="registrar_zookeeper.kazoo")  # kazoo's BLATHER too
    backend = make(instance, auth={"file": secrets["right"]})
    backend.register()
    session_password = backend._client._session_passwd  # the session's own secret
    backend.heartbeat()
    backend.observers()[0].sees(instance)
    backend.deregister()
    other = pki["other_client"]  # (the same certificate would be let in: see above)
    with pytest.raises(RegistrationRejected):
        make(Instance(instance.service, "x", "10.0.0.1", 1), auth={"file": secrets["wrong"]},
             tls=tls_section(pki, cert_file=other.cert_file, key_file=other.key_file)).register()
    assert "Auth(scheme='digest', auth=<redacted>)" in caplog.text  # kazoo did log the packet
    assert "use_ssl: True" in caplog.text and "session_passwd: <redacted>" in caplog.text
    for secret in (PASSWORD, OTHER_PASSWORD, session_password.hex(), repr(session_password)):
        assert secret not in caplog.text


def _agent(tmp_path, zk_tls, instance, auth, tls, env=None) -> tuple[subprocess.Popen, str]:
    """`registrar agent` with a YAML config, logging at debug, in the background."""
    config = {
        "service": {"name": instance.service, "id": instance.id, "address": "10.4.4.4",
                    "port": 8080},
        "backends": [{"type": "zookeeper", "hosts": zk_tls.secure_hosts,
                      "session_timeout": "3s", "timeout": "2s", "tls": tls,
                      "auth": auth}],
        "stop": {"grace_period": "10s", "propagation_timeout": "5s"},
        "control": {"listen": None}, "health": False}
    path = tmp_path / f"agent-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / f"{path.stem}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "registrar", "--log-level", "debug", "agent",
             "--config", str(path)], stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    return proc, str(log)


def test_the_agent_cli_over_tls_with_auth(zk_tls, pki, views, instance, secrets, tmp_path):
    # The password from the environment this time (the other run: a file).
    proc, log = _agent(tmp_path, zk_tls, instance, {"env": "ZK_TEST_DIGEST"}, tls_section(pki),
                       env={"ZK_TEST_DIGEST": f"registrar:{PASSWORD}"})
    path = f"/services/{instance.service}/{instance.id}"
    try:
        wait_until(lambda: views.exists(path) == [True] or proc.poll() is not None, 15,
                   "the agent to register")
        assert proc.poll() is None, Path(log).read_text()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = Path(log).read_text()
    assert code == 0, text
    assert views.exists(path) == [False]
    assert PASSWORD not in text and "Traceback" not in text


def test_the_agent_cli_exits_1_on_a_refused_certificate(zk_tls, pki, views, instance, secrets,
                                                        tmp_path):
    rogue = pki["rogue_client"]
    proc, log = _agent(tmp_path, zk_tls, instance, {"file": secrets["right"]},
                       tls_section(pki, cert_file=rogue.cert_file, key_file=rogue.key_file))
    try:
        code = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = Path(log).read_text()
    assert code == 1, text
    assert "Traceback" not in text and PASSWORD not in text
    failed = [line for line in text.splitlines() if "TLS handshake with" in line]
    assert failed, text
    assert views.exists(f"/services/{instance.service}/{instance.id}") == [False]
