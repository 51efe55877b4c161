"""ZooKeeper specifics on real servers: the Curator document Java clients
read, ACLs, sessions lost and taken over, servers killed or frozen."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError
from kazoo.handlers.threading import KazooTimeoutError, SequentialThreadingHandler

from registrar import Instance, Registrar, config
from registrar.errors import ConfigError, RegistryUnavailable
from registrar_testing import wait_until
from registrar_testing.curator import CURATOR_FIELDS, probe_list
from registrar_testing.faults import Blackhole
from registrar_testing.zookeeper import ServerViews, ZooKeeperEnsemble, expire_session
from registrar_zookeeper import (Superseded, ZooKeeperBackend, ZooKeeperConfig, parse_acl,
                                 split_hosts, uri_spec)
from registrar_zookeeper._kazoo import NUDGE_AFTER, wait

SECRET = "s3cr3t-Pa55"


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """An ensemble of this module's own, for tests that kill or freeze servers."""
    with ZooKeeperEnsemble(3, tmp_path_factory.mktemp("zk-faults")) as zk:
        yield zk


@pytest.fixture
def instance():
    tag = uuid.uuid4().hex[:8]
    return Instance(f"svc-{tag}", f"pod-{tag}", "10.9.8.7", 8080, tags=["http"],
                    meta={"zone": "a"})


@pytest.fixture
def make():
    """Build backends; every one is closed at teardown."""
    made = []

    def build(hosts, instance, **kw):
        backend = ZooKeeperBackend(instance, ZooKeeperConfig.parse(
            {"type": "zookeeper", "hosts": hosts, "session_timeout": "2s", "timeout": "1s", **kw}))
        made.append(backend)
        return backend

    yield build
    for backend in made:
        backend.close()


@pytest.fixture
def client(zk_standalone):
    c = KazooClient(hosts=zk_standalone.connect_string, timeout=10)
    c.start(timeout=10)
    yield c
    c.stop()
    c.close()


def agent_on(hosts, instance, **section):
    return Registrar.from_config({
        "service": {"name": instance.service, "id": instance.id, "address": instance.address,
                    "port": instance.port},
        "backends": [{"type": "zookeeper", "hosts": hosts, "session_timeout": "2s",
                      "timeout": "1s", **section}],
        "stop": {"grace_period": "10s", "propagation_timeout": "5s"},
        "health": False})  # no app listens: register at once


# -- what is written ----------------------------------------------------------

def test_node_is_an_ephemeral_curator_service_instance(zk_standalone, make, client, instance):
    backend = make(zk_standalone.hosts, instance, base_path="/svc/")
    before = int(time.time() * 1000)
    backend.register()
    path = f"/svc/{instance.service}/{instance.id}"
    assert backend.path == path
    data, stat = client.get(path)
    doc = json.loads(data)
    assert set(doc) == CURATOR_FIELDS
    assert doc == {"name": instance.service, "id": instance.id, "address": "10.9.8.7",
                   "port": 8080, "sslPort": None,
                   "payload": {"tags": ["http"], "meta": {"zone": "a"}},
                   "registrationTimeUTC": doc["registrationTimeUTC"], "serviceType": "DYNAMIC",
                   "uriSpec": None}
    assert before <= doc["registrationTimeUTC"] <= int(time.time() * 1000)
    assert stat.ephemeralOwner == backend._client.client_id[0]
    # Parents are persistent; without auth everyone may do everything.
    assert client.exists(f"/svc/{instance.service}").ephemeralOwner == 0
    assert [(a.perms, a.id.scheme) for a in client.get_acls(path)[0]] == [(31, "world")]
    backend.drain("test")
    drained = json.loads(client.get(path)[0])
    assert drained["payload"]["status"] == "draining"
    assert drained["registrationTimeUTC"] == doc["registrationTimeUTC"]
    backend.deregister()
    assert client.exists(path) is None


def test_curator_lists_what_we_register(zk_standalone, make, instance, curator_probe):
    plain = make(zk_standalone.hosts, instance)
    typed_instance = Instance(instance.service, instance.id + "-b", "10.9.8.8", 8081,
                              meta={"version": "2"})
    typed = make(zk_standalone.hosts, typed_instance, ssl_port=8443,
                 uri_spec="{scheme}://{address}:{ssl-port}/api",
                 payload_class="java.util.LinkedHashMap")
    plain.register()
    typed.register()
    typed.drain("test")
    seen = {i["id"]: i for i in probe_list(curator_probe, zk_standalone.connect_string,
                                           "/services", instance.service)}
    assert set(seen) == {instance.id, typed_instance.id}
    a, b = seen[instance.id], seen[typed_instance.id]
    assert (a["name"], a["address"], a["port"], a["sslPort"]) == (
        instance.service, "10.9.8.7", 8080, None)
    assert a["payload"] == {"tags": ["http"], "meta": {"zone": "a"}}
    assert a["serviceType"] == "DYNAMIC" and a["enabled"] is True and a["uri"] is None
    assert a["registrationTimeUTC"] > 0
    assert (b["port"], b["sslPort"], b["uri"]) == (8081, 8443, "https://10.9.8.8:8443/api")
    assert b["payload"] == {"tags": [], "meta": {"version": "2"}, "status": "draining"}
    plain.deregister()
    typed.deregister()
    assert probe_list(curator_probe, zk_standalone.connect_string, "/services",
                      instance.service) == []


def test_payload_none_writes_null_and_the_drain_leaves_the_node(zk_standalone, make, client,
                                                                 instance, curator_probe):
    """For Curator readers typed Void.class: a null payload, so no status to
    mark at the drain; the removal is what they see."""
    backend = make(zk_standalone.hosts, instance, payload="none")
    backend.register()
    data, stat = client.get(backend.path)
    assert set(json.loads(data)) == CURATOR_FIELDS
    assert json.loads(data)["payload"] is None
    [seen] = probe_list(curator_probe, zk_standalone.connect_string, "/services",
                        instance.service)
    assert (seen["id"], seen["payload"]) == (instance.id, None)
    backend.drain("test")
    assert client.get(backend.path) == (data, stat)  # not even rewritten
    backend.deregister()
    assert client.exists(backend.path) is None


# -- ACLs and secrets ---------------------------------------------------------

def test_other_clients_cannot_delete_our_node_when_acls_are_on(zk_standalone, make, client,
                                                                instance, monkeypatch):
    monkeypatch.setenv("ZK_TEST_AUTH", f"registrar:{SECRET}")
    backend = make(zk_standalone.hosts, instance, auth={"env": "ZK_TEST_AUTH"})
    backend.register()
    acl = sorted((a.id.scheme, a.id.id, a.perms) for a in client.get_acls(backend.path)[0])
    # The creator's digest id (ZooKeeper 3.8 hides the hash from non-admins).
    assert acl == [("digest", "registrar:x", 31), ("world", "anyone", 1)]
    parent = backend.path.rsplit("/", 1)[0]
    assert client.get_acls(parent)[0] == client.get_acls(backend.path)[0]
    assert json.loads(client.get(backend.path)[0])["id"] == instance.id  # world can read
    intruder = KazooClient(hosts=zk_standalone.connect_string, auth_data=[("digest", "eve:guess")])
    intruder.start(timeout=10)
    try:
        for c in (client, intruder):
            with pytest.raises(NoAuthError):
                c.delete(backend.path)
            with pytest.raises(NoAuthError):
                c.set(backend.path, b"{}")
    finally:
        intruder.stop()
        intruder.close()
    assert backend.heartbeat() is False
    # The same credentials elsewhere (the `deregister` command) may remove it.
    other = make(zk_standalone.hosts, instance, auth={"env": "ZK_TEST_AUTH"})
    other.deregister()
    assert client.exists(backend.path) is None


def test_the_password_is_never_logged_nor_echoed(zk_standalone, make, instance, tmp_path, caplog):
    secret_file = tmp_path / "zk-auth"
    secret_file.write_text(f"registrar:{SECRET}\n")
    caplog.set_level(1)
    caplog.set_level(1, logger="registrar_zookeeper.kazoo")
    backend = make(zk_standalone.hosts, instance, auth={"file": str(secret_file)})
    backend.register()
    backend.deregister()
    assert "Auth(scheme='digest', auth=<redacted>)" in caplog.text  # kazoo did log the packet
    assert SECRET not in caplog.text
    secret_file.write_text(SECRET)  # no user: rejected without showing it
    with pytest.raises(ConfigError) as err:
        make(zk_standalone.hosts, instance, auth={"file": str(secret_file)})
    assert str(err.value) == "auth.file: expected user:password (the value is not shown)"
    with pytest.raises(ConfigError, match=r"auth.file: cannot read .*/nope: No such file"):
        make(zk_standalone.hosts, instance, auth={"file": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="auth.env: environment variable ZK_NOT_SET_ANYWHERE"):
        make(zk_standalone.hosts, instance, auth={"env": "ZK_NOT_SET_ANYWHERE"})


# -- config -------------------------------------------------------------------

def test_config_parsing():
    assert split_hosts(["a:1", "b", "[::1]:3/apps/x/"]) == (["a:1", "b:2181", "[::1]:3"], "/apps/x")
    assert split_hosts(["a:1/"]) == (["a:1"], "")
    for bad in (["a:1/x", "b:2"], ["a:b"], ["a:70000"], ["http://a:1"]):
        with pytest.raises(ValueError):
            split_hosts(bad)
    assert parse_acl("digest:u:h4sh=:rwa").id.id == "u:h4sh="
    assert parse_acl("world:anyone:all").perms == 31
    assert parse_acl("auth::cd").perms == 12
    for bad in ("world:anyone", "nope:x:r", "world:anyone:rx"):
        with pytest.raises(ValueError):
            parse_acl(bad)
    assert uri_spec("{scheme}://{address}:{port}") == {"parts": [
        {"value": "scheme", "variable": True}, {"value": "://", "variable": False},
        {"value": "address", "variable": True}, {"value": ":", "variable": False},
        {"value": "port", "variable": True}]}
    with pytest.raises(ValueError):
        uri_spec("{scheme://x")


@pytest.mark.parametrize("section,expected", [
    ({"hosts": "a:1/x,b:2"}, "backends[0].hosts: only the last host may end with a chroot"),
    ({"acl": ["auth::all"]}, "backends[0].acl: 'auth::all' grants the authenticated creator"),
    ({"acl": ["world:anyone:rx"]}, 'backends[0].acl: expected "scheme:id:perms"'),
    ({"auth": {"file": "/f", "env": "E"}}, "backends[0].auth: give exactly one of file or env"),
    ({"session_timeout": "500ms"},
     'backends[0].session_timeout: should be from 1s to 24h, got 500ms'),
    ({"base_path": "services"},
     "backends[0].base_path: should match the pattern '^/', got \"services\""),
    ({"uri_spec": "{a"}, "backends[0].uri_spec: unbalanced braces"),
    ({"tls": {"verfy": False}}, "backends[0].tls.verfy: unknown key"),
    ({"payload": "null"}, "backends[0].payload: expected one of \"map\", \"none\", got \"null\""),
    ({"payload": "none", "payload_class": "x.Y"},
     "backends[0].payload_class: a payload class needs a payload"),
])
def test_config_errors_name_the_field(section, expected):
    with pytest.raises(ConfigError) as err:
        config.load({"service": {"name": "web", "port": 80},
                     "backends": [{"type": "zookeeper", **section}]})
    assert str(err.value).startswith(expected), str(err.value)


def test_tls_settings_reach_kazoo(instance, tmp_path):
    from registrar_testing.certs import CertificateAuthority  # files the backend can load

    authority = CertificateAuthority(tmp_path)
    pair = authority.client()
    ca, cert, key = authority.ca_file, pair.cert_file, pair.key_file
    backend = ZooKeeperBackend(instance, ZooKeeperConfig.parse(
        {"type": "zookeeper", "tls": {"ca_file": ca, "cert_file": cert, "key_file": key}}))
    client = backend.new_client("127.0.0.1:2281")
    assert (client.use_ssl, client.ca, client.certfile, client.keyfile, client.verify_certs) == (
        True, ca, cert, key, True)
    client.close()


def test_a_held_back_reply_is_nudged_out():
    # ZooKeeper 3.8.0 followers sometimes hold a reply until the session
    # sends something else (about one write in 5,000 here, too rare to wait
    # for in a test): wait() sends a nudge while it waits.
    handler = SequentialThreadingHandler()
    held, nudges = handler.async_result(), []
    began = time.monotonic()
    assert wait(held, began + 2, nudge=lambda: (nudges.append(1), held.set("reply"))) == "reply"
    assert len(nudges) == 1 and time.monotonic() - began < 2 * NUDGE_AFTER + 0.1
    never = handler.async_result()
    with pytest.raises(KazooTimeoutError):
        wait(never, time.monotonic() + 0.2, nudge=lambda: nudges.append(1))
    assert 2 <= len(nudges) <= 5


def test_a_chroot_in_hosts_is_honoured(zk_standalone, make, client, instance):
    client.ensure_path("/apps/blue")
    backend = make([zk_standalone.hosts[0] + "/apps/blue"], instance)
    backend.register()
    assert client.exists(f"/apps/blue/services/{instance.service}/{instance.id}") is not None
    assert [o.sees(instance) for o in backend.observers()] == [True]
    backend.deregister()
    assert [o.sees(instance) for o in backend.observers()] == [False]
    fresh = make([zk_standalone.hosts[0] + "/apps/green"], instance)
    fresh.register()  # a chroot that does not exist yet is created like the other parents
    assert client.exists(f"/apps/green/services/{instance.service}/{instance.id}") is not None


# -- sessions and take-overs ------------------------------------------------------

def test_heartbeat_rewrites_a_node_deleted_by_hand(zk_standalone, make, client, instance):
    backend = make(zk_standalone.hosts, instance)
    backend.register()
    client.delete(backend.path)
    assert backend.heartbeat() is True
    assert client.exists(backend.path).ephemeralOwner == backend._client.client_id[0]
    assert backend.heartbeat() is False


def test_deregister_returns_a_zxid_that_covers_the_removal(zk_ensemble, make, instance):
    backend = make(zk_ensemble.hosts, instance)
    backend.register()
    views = ServerViews(zk_ensemble.hosts)
    try:
        created = views.stat(0, backend.path).czxid
        token = backend.deregister()
        assert backend.deregister() == token  # idempotent
        parent = views.stat(0, backend.path.rsplit("/", 1)[0])
        assert created < parent.pzxid <= token  # the delete's zxid is the parent's pzxid
        # Every server's own view (the observers' sees() is the conformance
        # suite's; a first session of theirs can take past 1 s on a loaded CI).
        assert views.exists(backend.path) == [False] * 3
    finally:
        views.close()


def test_forced_session_expiry_is_repaired_within_one_heartbeat(zk_ensemble, instance):
    registrar = agent_on(zk_ensemble.hosts, instance)
    registrar.start(wait=True, timeout=10)
    backend = registrar.backends[0]
    views = ServerViews(zk_ensemble.hosts)
    try:
        old = views.stat(0, backend.path).ephemeralOwner
        interval = backend.ttl / 3
        expired_at = time.monotonic()
        expire_session(zk_ensemble.connect_string, backend._client)
        wait_until(lambda: views.stat(0, backend.path) is None, 5, "the session's node to go")

        def back():
            stat = views.stat(0, backend.path)
            if stat is None and backend._client._session_id != old:
                # Gone, and the client has heard its session expired: the
                # agent must not claim otherwise. (Before it hears, it cannot
                # know; the TTL rule covers that window.)
                if registrar.registered:  # unless the repair landed meanwhile
                    views.clients[0].sync(backend.path)
                    assert views.stat(0, backend.path) is not None, \
                        "registered while the node is gone"
            return stat is not None and stat.ephemeralOwner != old

        wait_until(back, interval * 1.1 + 1.0, "the node back with a new session")
        assert time.monotonic() - expired_at <= interval * 1.1 + 1.0
        wait_until(lambda: registrar.status(observe=False)["backends"][0]["repairs"] == 1, 2,
                 "the repair counted")
        wait_until(lambda: registrar.registered, 2, "registered again once the repair landed")
    finally:
        views.close()
    report = registrar.stop()
    assert report.ok, report.summary()


def test_a_previous_incarnations_node_is_replaced_and_never_fought_over(zk_ensemble, make,
                                                                         instance):
    old, new = make(zk_ensemble.hosts, instance), make(zk_ensemble.hosts, instance)
    old.register()
    views = ServerViews(zk_ensemble.hosts)
    try:
        new.register()  # the pod restarted faster than its old session expired
        owner = new._client.client_id[0]
        # Server 0 may not have applied the take-over yet: read until it has.
        wait_until(lambda: getattr(views.stat(0, new.path), "ephemeralOwner", None) == owner, 5,
                 "server 0 sees the new owner")
        assert new.heartbeat() is False
        with pytest.raises(Superseded):  # the old one (thawed, say) leaves it alone
            old.heartbeat()
        old.drain("test")
        removed = old.deregister()
        assert not any(o.sees(instance, since=removed) for o in old.observers())
        old.close()  # its session ends: the node is not its own
        assert views.stat(0, new.path).ephemeralOwner == owner
        assert new.heartbeat() is False
        assert "status" not in json.loads(views.clients[0].get(new.path)[0])["payload"]
        new.deregister()
        wait_until(lambda: views.exists(new.path) == [False] * 3, 5, "the node gone everywhere")
    finally:
        views.close()


def test_registered_again_after_a_deregistration(zk_standalone, make, client, instance):
    backend = make(zk_standalone.hosts, instance)  # the core's pause() and resume()
    backend.register()
    first = backend.deregister()
    assert client.exists(backend.path) is None
    backend.register()
    assert client.exists(backend.path).ephemeralOwner == backend._client.client_id[0]
    assert [o.sees(instance) for o in backend.observers()] == [True]
    assert backend.deregister() > first
    assert client.exists(backend.path) is None
    assert [o.sees(instance) for o in backend.observers()] == [False]


def test_deregister_command_removes_a_node_registered_elsewhere(zk_ensemble, make, instance):
    agent, command = make(zk_ensemble.hosts, instance), make(zk_ensemble.hosts, instance)
    agent.register()
    command.drain("test")  # knows no node of its own: marks nothing
    command.deregister()
    assert not any(o.sees(instance) for o in command.observers())


# -- bounded calls --------------------------------------------------------------

def test_a_frozen_server_never_hangs_connect_close_or_exit(zk_standalone, make, instance):
    server = zk_standalone.servers[0]
    registered = make(zk_standalone.hosts, instance)
    registered.register()
    script = textwrap.dedent("""
        import sys, time
        from registrar import Instance
        from registrar.errors import RegistryUnavailable
        from registrar_zookeeper import ZooKeeperBackend, ZooKeeperConfig
        backend = ZooKeeperBackend(Instance("s", "i", "10.0.0.1", 80), ZooKeeperConfig(
            type="zookeeper", hosts=[sys.argv[1]], timeout="1s"))
        try:
            backend.register()
        except RegistryUnavailable as exc:
            print("unavailable:", exc, flush=True)
        # exits without close(): kazoo's threads must not keep it alive
    """)
    server.freeze()
    try:
        began = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", script, server.host], capture_output=True,
                              text=True, timeout=20)
        took = time.monotonic() - began
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("unavailable: zookeeper: no session with"), proc.stdout
        assert took < 8, f"took {took:.1f}s"  # hung, it would take the 10 s session timeout
        began = time.monotonic()
        with pytest.raises(RegistryUnavailable):
            registered.heartbeat()
        registered.close()
        assert time.monotonic() - began < 2 * 1.0 + 1.0  # two timeouts and some slack
    finally:
        server.thaw()


def test_no_session_outlives_close(zk_ensemble, instance):
    def connection_threads():
        return sum("zk_loop" in t.name for t in threading.enumerate())

    before = connection_threads()
    for _ in range(5):  # stop() at once races the observers' warm-up after registering
        registrar = agent_on(zk_ensemble.hosts, instance).start(wait=True, timeout=10)
        assert registrar.stop().ok
    wait_until(lambda: connection_threads() <= before, 5, "every kazoo connection to end")


# -- servers killed (an ensemble of this module's own) -------------------------------

def _peer_port(backend: ZooKeeperBackend) -> int:
    return backend._client._connection._socket.getpeername()[1]


@pytest.mark.parametrize("role", ["leader", "follower"])
def test_registration_survives_a_killed_server(faulty, instance, role):
    registrar = agent_on(faulty.hosts, instance).start(wait=True, timeout=10)
    backend = registrar.backends[0]
    session = backend._client.client_id[0]
    leader = faulty.wait_leader(timeout=15)
    if role == "leader":
        victim = leader
    else:  # preferably the follower our session is connected to
        followers = [i for i in range(3) if i != leader]
        ours = [i for i in followers if faulty.servers[i].client_port == _peer_port(backend)]
        victim = (ours or followers)[0]
    beats = []  # when each heartbeat came back
    heartbeat = backend.heartbeat
    backend.heartbeat = lambda: (heartbeat(), beats.append(time.monotonic()))[0]
    survivors = [i for i in range(3) if i != victim]
    views = ServerViews([faulty.hosts[i] for i in survivors])
    try:
        faulty.servers[victim].kill()
        killed_at = time.monotonic()
        end = killed_at + 3 * backend.ttl / 3 + 0.5  # three heartbeats
        while time.monotonic() < end:
            assert views.exists(backend.path, servers=[0, 1]) == [True, True], "lapsed"
            time.sleep(0.1)
        wait_until(lambda: len([t for t in beats if t > killed_at]) >= 2, 3,
                 "two heartbeats after the kill")
        assert backend._client.client_id[0] == session  # the same session: nothing repaired
        status = registrar.status(observe=False)["backends"][0]
        assert status["repairs"] == 0 and registrar.registered
    finally:
        views.close()
        faulty.servers[victim].restart(timeout=30)
        faulty.wait_leader(timeout=15)
    report = registrar.stop()
    assert report.ok, report.summary()
    assert "3/3 observers" in report.summary()


@pytest.mark.skipif(not Blackhole.available(), reason="nftables is not usable here")
def test_registration_comes_back_after_an_outage_longer_than_the_session(faulty, instance):
    registrar = agent_on(faulty.hosts, instance).start(wait=True, timeout=10)
    backend = registrar.backends[0]
    session = backend._client.client_id[0]
    # Cut this host off every server's client port for longer than the
    # session timeout; the servers still talk to each other and expire it.
    with Blackhole([s.client_port for s in faulty.servers], mode="reject"):
        time.sleep(backend.ttl + 1.0)  # the outage itself: the session timeout plus a tick
        # Nothing has landed for longer than the session timeout: the node
        # may be gone (it is), and the agent says so.
        assert not registrar.registered
        assert "lost" in registrar.readiness()[1]
    views = ServerViews(faulty.hosts)
    try:
        wait_until(lambda: all(views.exists(backend.path)), backend.ttl / 3 + 3,
                 "the heartbeat to write it again with a new session")
        assert views.stat(0, backend.path).ephemeralOwner not in (session, 0)
        assert registrar.status(observe=False)["backends"][0]["repairs"] == 1
    finally:
        views.close()
    assert registrar.stop().ok


def test_an_observer_on_a_frozen_server_answers_within_its_timeout(faulty, make, instance):
    backend = make(faulty.hosts, instance)
    backend.register()
    observer = backend.observers()[0]
    assert observer.sees(instance) is True
    faulty.servers[0].freeze()
    try:
        began = time.monotonic()
        with pytest.raises(RegistryUnavailable):
            observer.sees(instance)
        assert time.monotonic() - began < 2.0  # timeout 1 s; kazoo alone would wait 6.7 s
    finally:
        faulty.servers[0].thaw()
    faulty.wait_leader(timeout=15)
