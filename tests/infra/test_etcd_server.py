"""Smoke tests of the real-etcd test infrastructure itself."""
from __future__ import annotations

import base64
import subprocess
import time
import urllib.error

import pytest
import requests

from registrar_testing import wait_until
from registrar_testing.etcd import EtcdCluster, etcd_version, kv_get_serializable
from registrar_testing.faults import Blackhole


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def put(endpoint: str, key: str, value: str, lease: int | None = None,
        timeout: float = 2.0) -> dict:
    body = {"key": b64(key), "value": b64(value)}
    if lease:
        body["lease"] = str(lease)
    resp = requests.post(f"{endpoint}/v3/kv/put", json=body, timeout=timeout)
    resp.raise_for_status()
    return resp.json()


def wait_leader(cluster: EtcdCluster, timeout: float = 5) -> int:
    found: list[int] = []
    wait_until(lambda: found.append(cluster.leader_index()) or found[-1] is not None,
               timeout, "an etcd leader is elected")
    return found[-1]


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory):
    with EtcdCluster(3, tmp_path_factory.mktemp("etcd3")) as cluster:
        yield cluster


def test_single_member_starts_and_answers(tmp_path, etcd_binary):
    # Once per etcd version: the kit's helpers must work against 3.4 and 3.5 alike.
    with EtcdCluster(1, tmp_path, binary=etcd_binary) as cluster:
        (endpoint,) = cluster.endpoints
        assert requests.get(f"{endpoint}/version", timeout=2).json()["etcdserver"] \
            == cluster.version == etcd_version(etcd_binary)
        assert requests.get(f"{endpoint}/health", timeout=2).json()["health"] == "true"
        assert cluster.leader_index() == 0
        lease = int(requests.post(f"{endpoint}/v3/lease/grant", json={"TTL": 30},
                                  timeout=2).json()["ID"])
        put(endpoint, "/svc/a", "x", lease=lease)
        rev, present, got_lease = kv_get_serializable(endpoint, "/svc/a")
        assert (present, got_lease) == (True, lease) and rev >= 2
        assert kv_get_serializable(endpoint, "/svc/missing")[1:] == (False, None)
    assert not cluster.members[0].process.running
    cluster.stop()  # idempotent


def test_auth_helpers_confine_a_user_to_its_prefix(tmp_path, etcd_binary):
    with EtcdCluster(1, tmp_path, binary=etcd_binary) as cluster:
        cluster.enable_auth("root-pw")
        cluster.add_user("svc", "svc-pw", "/svc/", cluster.authenticate("root", "root-pw"))
        token = cluster.authenticate("svc", "svc-pw")
        cluster.call("/v3/kv/put", {"key": b64("/svc/a"), "value": b64("x")}, token=token)
        assert kv_get_serializable(cluster.endpoints[0], "/svc/a", token=token)[1]
        with pytest.raises(urllib.error.HTTPError):  # outside the prefix: permission denied
            cluster.call("/v3/kv/put", {"key": b64("/other"), "value": b64("x")}, token=token)
        with pytest.raises(urllib.error.HTTPError):  # no token at all
            kv_get_serializable(cluster.endpoints[0], "/svc/a")


def test_three_members_have_a_leader(cluster3):
    assert len(cluster3.endpoints) == 3
    assert wait_leader(cluster3) in (0, 1, 2)
    rev = int(put(cluster3.endpoints[0], "/svc/three", "v")["header"]["revision"])
    for m in cluster3.members:
        wait_until(lambda m=m: kv_get_serializable(m.endpoint, "/svc/three")[0] >= rev,
                   5, f"{m.name} applies revision {rev}", ignore=OSError)
        assert kv_get_serializable(m.endpoint, "/svc/three")[1]


def test_kill_and_restart_member(cluster3):
    victim = cluster3.members[(wait_leader(cluster3) + 1) % 3]
    other = next(m for m in cluster3.members if m is not victim)
    victim.kill()
    assert not victim.process.running and not victim.healthy()
    rev = int(put(other.endpoint, "/svc/while-down", "v")["header"]["revision"])
    victim.restart(timeout=20)
    wait_until(lambda: kv_get_serializable(victim.endpoint, "/svc/while-down")[0] >= rev,
               5, f"{victim.name} catches up", ignore=OSError)
    assert kv_get_serializable(victim.endpoint, "/svc/while-down")[1]


def test_freeze_makes_member_unresponsive(cluster3):
    member = cluster3.members[0]
    member.freeze()
    try:
        with pytest.raises(requests.exceptions.Timeout):
            requests.get(f"{member.endpoint}/health", timeout=0.5)
    finally:
        member.thaw()
    wait_until(member.healthy, 10, f"{member.name} is healthy after thaw")


@pytest.mark.skipif(not Blackhole.available(), reason="nftables needs root and nft")
@pytest.mark.parametrize("mode, error", [("drop", requests.exceptions.Timeout),
                                         ("reject", requests.exceptions.ConnectionError)])
def test_blackhole_cuts_one_member_off(cluster3, mode, error):
    target, bystander = cluster3.members[1], cluster3.members[2]
    with Blackhole(target.client_port, mode=mode) as hole:
        t0 = time.monotonic()
        with pytest.raises(error):
            requests.get(f"{target.endpoint}/health", timeout=0.5)
        assert time.monotonic() - t0 < 2
        assert requests.get(f"{bystander.endpoint}/health", timeout=2).ok
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    assert hole.table not in tables
    assert requests.get(f"{target.endpoint}/health", timeout=2).json()["health"] == "true"
