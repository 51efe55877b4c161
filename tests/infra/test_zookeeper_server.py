"""Smoke tests of the real ZooKeeper launcher and of the Curator probe.

Needs scripts/install-zookeeper.sh to have run (ZooKeeper, Curator, a JDK).
"""
from __future__ import annotations

import json
import subprocess
import time

import pytest
from kazoo.client import KazooClient

from registrar_testing import wait_until
from registrar_testing.curator import CURATOR_FIELDS, probe_list
from registrar_testing.zookeeper import ZooKeeperEnsemble, four_letter


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    with ZooKeeperEnsemble(3, tmp_path_factory.mktemp("zk3")) as zk:
        yield zk


def kazoo(connect_string: str) -> KazooClient:
    client = KazooClient(hosts=connect_string, timeout=10.0)
    client.start(timeout=10)
    return client


def test_standalone_answers_srvr(zk_standalone):
    server = zk_standalone.servers[0]
    assert zk_standalone.hosts == [f"127.0.0.1:{server.client_port}"]
    assert zk_standalone.connect_string == zk_standalone.hosts[0]
    assert server.mode() == "standalone"
    assert "Zookeeper version: 3.8" in four_letter("127.0.0.1", server.client_port, "srvr")
    assert four_letter("127.0.0.1", server.client_port, "ruok") == "imok"
    assert zk_standalone.leader_index() == 0


def test_ensemble_has_exactly_one_leader(ensemble):
    assert len(ensemble.hosts) == 3
    assert sorted(ensemble.modes()) == ["follower", "follower", "leader"]
    assert ensemble.servers[ensemble.leader_index()].mode() == "leader"


def test_kazoo_creates_ephemeral_node(ensemble):
    owner, observer = kazoo(ensemble.connect_string), kazoo(ensemble.connect_string)
    try:
        path = owner.create("/smoke/ephemeral", b"pod-1", ephemeral=True, makepath=True)
        # Another session's server may not have applied the write yet.
        observer.sync(path)
        data, stat = observer.get(path)
        assert data == b"pod-1"
        assert stat.ephemeralOwner == owner.client_id[0]
        owner.stop()
        wait_until(lambda: observer.exists(path) is None, 10, "the ephemeral node is gone")
    finally:
        for client in (owner, observer):
            client.stop()
            client.close()


def test_frozen_follower_answers_nothing_then_recovers(ensemble):
    follower = next(s for s in ensemble.servers if s.mode() == "follower")
    follower.freeze()
    try:
        began = time.monotonic()
        assert follower.mode(timeout=0.5) is None
        assert time.monotonic() - began < 2
    finally:
        follower.thaw()
    wait_until(lambda: follower.mode() == "follower", 15, "the thawed follower serves")


def test_leader_killed_new_leader_elected(ensemble):
    old = ensemble.wait_leader(timeout=15)
    client = kazoo(ensemble.connect_string)
    try:
        session = client.client_id
        path = client.create("/smoke/survivor", ephemeral=True, makepath=True)
        ensemble.servers[old].kill()
        began = time.monotonic()
        new = ensemble.wait_leader(timeout=15)
        assert new != old
        assert time.monotonic() - began < 15
        # The session and its ephemeral node survive the leader's death.
        wait_until(lambda: client.exists(path) is not None, 15, "the client reconnects",
                   ignore=Exception)
        assert client.client_id == session
    finally:
        client.stop()
        client.close()
        if not ensemble.servers[old].process.running:
            assert ensemble.servers[old].restart(timeout=30) == "follower"
    ensemble.wait_leader(timeout=15)


def test_curator_registration_seen_by_probe(zk_standalone, curator_probe):
    """Curator registers an instance itself; the probe lists it back."""
    connect = zk_standalone.connect_string
    register = subprocess.Popen(
        [*curator_probe, "register", connect, "/curator", "web", "pod-1", "10.0.0.7", "8080",
         '{"pod": "web-abc"}', "60"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = register.stdout.readline()  # bounded by the probe's own connect timeout
        assert line, register.stderr.read()
        written = json.loads(line)
        assert written["path"] == "/curator/web/pod-1"
        assert set(written["znode"]) == CURATOR_FIELDS
        assert written["znode"]["payload"] == {"@class": "java.util.LinkedHashMap",
                                               "pod": "web-abc"}
        [seen] = probe_list(curator_probe, connect, "/curator", "web")
        assert (seen["id"], seen["address"], seen["port"]) == ("pod-1", "10.0.0.7", 8080)
        assert seen["serviceType"] == "DYNAMIC" and seen["enabled"] is True
        assert seen["uri"] == "http://10.0.0.7:8080"
        client = kazoo(connect)
        try:
            assert client.get("/curator/web/pod-1")[1].ephemeralOwner != 0
        finally:
            client.stop()
            client.close()
        register.stdin.close()  # the probe unregisters and exits
        assert register.wait(timeout=30) == 0
        assert probe_list(curator_probe, connect, "/curator", "web") == []
    finally:
        if register.poll() is None:
            register.kill()
            register.wait(timeout=10)


def test_probe_reads_kazoo_written_instance(zk_standalone, curator_probe):
    """The shape a Python registrar would write is readable by Curator."""
    client = kazoo(zk_standalone.connect_string)
    try:
        doc = {"name": "api", "id": "pod-2", "address": "10.0.0.8", "port": 9090,
               "sslPort": None, "payload": {"namespace": "default"},
               "registrationTimeUTC": 1_700_000_000_000, "serviceType": "DYNAMIC",
               "uriSpec": None}
        client.create("/kazoo/api/pod-2", json.dumps(doc).encode(), ephemeral=True, makepath=True)
        [seen] = probe_list(curator_probe, zk_standalone.connect_string, "/kazoo", "api")
        assert seen["payload"] == {"namespace": "default"}
        assert (seen["id"], seen["port"], seen["enabled"]) == ("pod-2", 9090, True)
    finally:
        client.stop()
        client.close()
