"""etcd specifics on real clusters: the wire format gRPC resolvers read,
take-over by a new incarnation, endpoint failover, and real faults."""
from __future__ import annotations

import base64
import json
import time
import urllib.request
import uuid
from urllib.parse import urlsplit

import pytest

from registrar import Instance, Registrar
from registrar_etcd import EtcdBackend, EtcdConfig
from registrar_testing import wait_until
from registrar_testing.etcd import EtcdCluster, kv_get_serializable
from registrar_testing.faults import Blackhole

needs_nft = pytest.mark.skipif(not Blackhole.available(), reason="nftables is not usable here")


def _post(endpoint, path, body):
    req = urllib.request.Request(endpoint + path, data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=2) as resp:
        return json.loads(resp.read())


def raw_get(endpoint, key):
    kvs = _post(endpoint, "/v3/kv/range",
                {"key": base64.b64encode(key.encode()).decode()}).get("kvs")
    if not kvs:
        return None
    return json.loads(base64.b64decode(kvs[0]["value"])), int(kvs[0].get("lease", 0))


@pytest.fixture
def instance():
    tag = uuid.uuid4().hex[:8]
    return Instance(f"svc-{tag}", f"pod-{tag}", "10.1.2.3", 8443, tags=["grpc"], meta={"zone": "a"})


def make(cluster, instance, **kw):
    return EtcdBackend(instance, EtcdConfig(type="etcd", endpoints=cluster.endpoints,
                                            **{"ttl": 2, "timeout": 1, **kw}))


def test_entry_is_in_the_grpc_naming_format(etcd_cluster, instance):
    backend = make(etcd_cluster, instance, prefix="/svc/")
    backend.register()
    key = f"/svc/{instance.service}/10.1.2.3:8443"
    assert backend.key == key
    value, lease = raw_get(etcd_cluster.endpoints[0], key)
    # What go.etcd.io/etcd/client/v3/naming/endpoints unmarshals: Op 0 = Add,
    # Metadata a string (hashable: gRPC-go's round_robin takes it).
    assert value == {"Op": 0, "Addr": "10.1.2.3:8443",
                     "Metadata": f'{{"id":"{instance.id}","tags":["grpc"],"meta":{{"zone":"a"}}}}'}
    ttl = _post(etcd_cluster.endpoints[0], "/v3/kv/lease/timetolive", {"ID": lease})
    assert int(ttl["grantedTTL"]) == 2
    backend.deregister()
    backend.close()


def test_ipv6_addresses_are_bracketed(etcd_cluster):
    inst = Instance("v6", uuid.uuid4().hex[:6], "fd00::5", 80)
    backend = make(etcd_cluster, inst)
    backend.register()
    value, _ = raw_get(etcd_cluster.endpoints[0], "services/v6/[fd00::5]:80")
    assert value["Addr"] == "[fd00::5]:80"
    backend.deregister()
    backend.close()


@pytest.mark.parametrize("prefix, key", [("services", "services/{}/10.1.2.3:8443"),
                                         ("/services", "/services/{}/10.1.2.3:8443"),
                                         ("apps/", "apps/{}/10.1.2.3:8443"),
                                         ("", "{}/10.1.2.3:8443")])
def test_the_prefix_is_kept_as_written(etcd_cluster, instance, prefix, key):
    """etcd:/// + prefix + / + service is the gRPC dial target: a leading
    slash stays (etcd:////services/web), none is added."""
    backend = make(etcd_cluster, instance, prefix=prefix)
    assert backend.key == key.format(instance.service)
    backend.register()
    assert raw_get(etcd_cluster.endpoints[0], backend.key)[0]["Addr"] == "10.1.2.3:8443"
    backend.deregister()
    backend.close()


def test_default_prefix_and_metadata(etcd_cluster, instance):
    backend = make(etcd_cluster, instance)
    assert backend.key == f"services/{instance.service}/10.1.2.3:8443"
    assert backend.config.metadata == "string"
    backend.close()


@pytest.mark.parametrize("metadata, expected", [
    ("object", lambda i: {"id": i.id, "tags": ["grpc"], "meta": {"zone": "a"}}),
    ("none", lambda i: None)])
def test_metadata_forms(etcd_cluster, instance, metadata, expected):
    backend = make(etcd_cluster, instance, metadata=metadata)
    backend.register()
    value, _ = raw_get(etcd_cluster.endpoints[0], backend.key)
    assert value.get("Metadata") == expected(instance) and value["Addr"] == "10.1.2.3:8443"
    assert ("Metadata" in value) == (metadata != "none")
    backend.deregister()
    backend.close()


def test_drain_leaves_a_string_value_as_it_is(etcd_cluster, instance):
    """A changed Metadata is a new address to gRPC-go: every client would
    connect to the leaving pod again. The delete is the signal."""
    backend = make(etcd_cluster, instance)
    backend.register()
    before = raw_get(etcd_cluster.endpoints[0], backend.key)
    backend.drain("test")
    assert raw_get(etcd_cluster.endpoints[0], backend.key) == before
    backend.deregister()
    assert raw_get(etcd_cluster.endpoints[0], backend.key) is None
    backend.close()


def test_drain_marks_an_object_value_draining(etcd_cluster, instance):
    backend = make(etcd_cluster, instance, metadata="object")
    backend.register()
    backend.drain("test")
    value, lease = raw_get(etcd_cluster.endpoints[0], backend.key)
    assert value["Metadata"]["status"] == "draining" and lease == backend._lease
    backend.deregister()
    assert raw_get(etcd_cluster.endpoints[0], backend.key) is None
    backend.close()


def test_deregister_leaves_an_entry_a_new_incarnation_took_over(etcd_cluster, instance):
    old, new = make(etcd_cluster, instance), make(etcd_cluster, instance)
    old.register()
    new.register()  # the pod restarted faster than the old lease expired
    removed = old.deregister()
    value, lease = raw_get(etcd_cluster.endpoints[0], new.key)
    assert lease == new._lease
    # The old one's observers confirm its own removal without waiting forever.
    assert not any(o.sees(instance, since=removed) for o in old.observers())
    assert new.heartbeat() is False
    new.deregister()
    old.close(), new.close()


def test_deregister_command_removes_an_entry_registered_elsewhere(etcd_cluster, instance):
    agent = make(etcd_cluster, instance)
    agent.register()
    other = make(etcd_cluster, instance)  # knows no lease
    other.deregister()
    wait_until(lambda: not any(kv_get_serializable(ep, agent.key)[1]
                               for ep in etcd_cluster.endpoints),
               5, "every member dropped the key")
    assert not any(o.sees(instance) for o in other.observers())
    agent.close(), other.close()


def test_heartbeat_rewrites_a_deleted_key(etcd_cluster, instance):
    backend = make(etcd_cluster, instance)
    backend.register()
    _post(etcd_cluster.endpoints[1], "/v3/kv/deleterange",
          {"key": base64.b64encode(backend.key.encode()).decode()})
    assert backend.heartbeat() is True
    assert raw_get(etcd_cluster.endpoints[0], backend.key)[1] == backend._lease
    backend.deregister()
    backend.close()


def test_first_endpoint_down_fails_over(etcd_cluster, instance):
    dead = "http://127.0.0.1:1"  # nothing listens on port 1
    backend = EtcdBackend(instance, EtcdConfig(type="etcd", ttl=2, timeout=1,
                                               endpoints=[dead, *etcd_cluster.endpoints]))
    backend._cluster.current = 0  # as if the random start had picked the dead one
    backend.register()
    assert backend.heartbeat() is False
    assert backend._cluster.current == 1
    backend.deregister()
    backend.close()


@needs_nft
def test_blackholed_member_fails_over_within_the_request_timeout(etcd_cluster, instance):
    backend = make(etcd_cluster, instance, timeout=0.5)
    backend.register()
    used = backend._cluster.current  # a member chosen at random
    with Blackhole(urlsplit(etcd_cluster.endpoints[used]).port, mode="drop"):
        began = time.monotonic()
        assert backend.heartbeat() is False
        assert time.monotonic() - began < 1.5
        assert backend._cluster.current == (used + 1) % 3
    backend.deregister()
    backend.close()


# -- faults on a cluster of this module's own --------------------------------

@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    with EtcdCluster(3, tmp_path_factory.mktemp("etcd-faults")) as cluster:
        yield cluster


def agent_on(cluster, instance, ttl="2s"):
    return Registrar.from_config({
        "service": {"name": instance.service, "id": instance.id, "address": instance.address,
                    "port": instance.port},
        "backends": [{"type": "etcd", "endpoints": cluster.endpoints, "ttl": ttl,
                      "timeout": "500ms"}],
        "stop": {"grace_period": "10s", "propagation_timeout": "5s"},
        "health": False})  # no app listens: register at once


def present_on(cluster, key, members):
    return [kv_get_serializable(cluster.members[i].endpoint, key)[1] for i in members]


@pytest.mark.slow
def test_leader_killed_while_registered(faulty, instance):
    registrar = agent_on(faulty, instance).start(wait=True, timeout=10)
    key = registrar.backends[0].key
    leader = wait_until(lambda: faulty.leader_index() is not None and (faulty.leader_index(),), 10,
                      "a leader")[0]
    survivors = [i for i in range(3) if i != leader]
    faulty.members[leader].kill()
    try:
        end = time.monotonic() + 3 * 2.0  # three TTLs without the old leader
        while time.monotonic() < end:
            assert all(present_on(faulty, key, survivors)), "registration lapsed after leader loss"
            time.sleep(0.1)
        assert registrar.status(observe=False)["backends"][0]["repairs"] == 0
    finally:
        faulty.members[leader].restart()
    report = registrar.stop()
    assert report.ok, report.summary()
    assert not any(present_on(faulty, key, range(3)))


@needs_nft
@pytest.mark.slow
def test_registration_comes_back_after_an_outage_longer_than_its_ttl(faulty, instance):
    registrar = agent_on(faulty, instance).start(wait=True, timeout=10)
    backend = registrar.backends[0]
    old_lease = backend._lease
    # Cut this host off every member's client port for longer than the TTL;
    # the members still talk to each other, so the lease expires server-side.
    with Blackhole([m.client_port for m in faulty.members], mode="reject"):
        time.sleep(2 + 1.5)  # the outage itself: TTL plus the expiry sweep
    # etcd's gateway reaches its own member through the client port too, and
    # answers 503 until its connection is back: an error counts as "not yet".
    wait_until(lambda: _quietly(present_on, faulty, backend.key, range(3)), 10,
               "the heartbeat repairs it")
    status = registrar.status(observe=False)["backends"][0]
    assert status["repairs"] == 1 and status["heartbeat_failures"] >= 1
    assert backend._lease != old_lease
    assert registrar.stop().ok


def _quietly(fn, *args):
    try:
        return all(fn(*args))
    except OSError:
        return False


def test_a_fleet_sharing_one_config_spreads_over_the_members():
    """Each backend starts at a member of its own choosing: 200 pods with
    the same endpoints list used to send every call to the first one."""
    from registrar_etcd._gateway import Cluster

    endpoints = ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"]
    firsts = [Cluster("etcd", endpoints, 1.0) for _ in range(60)]
    try:
        assert {c.current for c in firsts} == {0, 1, 2}  # all three: 3 * (2/3)**60 ~ 1e-10
    finally:
        for c in firsts:
            c.close()
