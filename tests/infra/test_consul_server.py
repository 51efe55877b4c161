"""Smoke tests for the real-Consul launcher (registrar_testing.consul)."""
from __future__ import annotations

import uuid

import pytest
import requests

from registrar_testing import wait_until
from registrar_testing.consul import ConsulCluster, ConsulDev, passing_ids

TIMEOUT = 5  # per HTTP request


@pytest.fixture(scope="module")
def consul_dev(tmp_path_factory):
    with ConsulDev(tmp_path_factory.mktemp("consul-dev")) as dev:
        yield dev


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ConsulCluster(tmp_path_factory.mktemp("consul-cluster"), servers=3, clients=1) as c:
        yield c


@pytest.fixture(scope="module")
def acl_cluster(tmp_path_factory):
    with ConsulCluster(tmp_path_factory.mktemp("consul-acl"), acl=True) as c:
        yield c


def _register_ttl_service(addr: str, name: str, token: str | None = None) -> requests.Response:
    service_id = f"{name}-{uuid.uuid4().hex[:8]}"
    headers = {"X-Consul-Token": token} if token else {}
    r = requests.put(f"{addr}/v1/agent/service/register", headers=headers, timeout=TIMEOUT,
                     json={"ID": service_id, "Name": name, "Address": "10.0.0.1", "Port": 8080,
                           "Check": {"TTL": "10s", "DeregisterCriticalServiceAfter": "1m"}})
    if r.ok:
        p = requests.put(f"{addr}/v1/agent/check/pass/service:{service_id}", headers=headers,
                         timeout=TIMEOUT)
        assert p.status_code == 200, p.text
    return r


def test_dev_agent_has_leader(consul_dev):
    r = requests.get(f"{consul_dev.http_addr}/v1/status/leader", timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.json().startswith("127.0.0.1:")


def test_cluster_has_leader_and_all_members(cluster):
    leaders = {requests.get(f"{a}/v1/status/leader", timeout=TIMEOUT).json()
               for a in cluster.server_addrs}
    assert len(leaders) == 1 and leaders != {""}
    peers = requests.get(f"{cluster.server_addrs[0]}/v1/status/peers", timeout=TIMEOUT).json()
    assert len(peers) == 3
    members = requests.get(f"{cluster.client_addr}/v1/agent/members", timeout=TIMEOUT).json()
    assert {m["Name"]: m["Status"] for m in members} == {
        a.name: 1 for a in cluster.servers + cluster.clients}
    assert len({a.http_addr for a in cluster.servers + cluster.clients}) == 4


def test_ttl_service_at_client_is_passing_on_every_server(cluster):
    r = _register_ttl_service(cluster.client_addr, "smoke-web")
    assert r.status_code == 200, r.text
    for addr in cluster.server_addrs:
        wait_until(lambda addr=addr: passing_ids(addr, "smoke-web"), 10,
                   f"smoke-web is passing on {addr}", ignore=requests.RequestException)


def test_restarted_client_rejoins(cluster):
    client = cluster.clients[0]
    old_pid = client.process.pid
    client.restart(timeout=15)
    assert client.process.pid != old_pid
    names = {a.name for a in cluster.servers + cluster.clients}
    # The new process's own view: it has joined all the servers again.
    wait_until(lambda: {m["Name"] for m in requests.get(
        f"{client.http_addr}/v1/agent/members", timeout=TIMEOUT).json() if m["Status"] == 1}
        == names, 10, f"{client.name} sees every member alive", ignore=requests.RequestException)


def test_acl_anonymous_register_is_denied(acl_cluster):
    r = _register_ttl_service(acl_cluster.client_addr, "acl-web")
    assert r.status_code == 403, r.text
    assert "Permission denied" in r.text


def test_acl_management_token_registers_and_mints_tokens(acl_cluster):
    token = acl_cluster.management_token
    r = _register_ttl_service(acl_cluster.client_addr, "acl-web", token)
    assert r.status_code == 200, r.text
    for addr in acl_cluster.server_addrs:
        wait_until(lambda addr=addr: passing_ids(addr, "acl-web", token), 10,
                   f"acl-web is passing on {addr}", ignore=requests.RequestException)

    # A token limited to one service, minted with the management token.
    secret = acl_cluster.create_token('service "minted-web" { policy = "write" }')
    r = _register_ttl_service(acl_cluster.client_addr, "minted-web", secret)
    assert r.status_code == 200, r.text
    r = _register_ttl_service(acl_cluster.client_addr, "other-web", secret)
    assert r.status_code == 403, r.text
