"""Consul specifics on real agents: what the registration carries, maintenance
before deregistration, a same-id entry on another node, observer watchers, an
agent that restarts without its state, faults, environment handling, ACLs
(the token is never shown) and TLS."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
import yaml

from registrar import Instance, Registrar
from registrar.clock import Clock, Deadline
from registrar.config import StopConfig
from registrar.errors import ConfigError, RegistrationRejected, RegistryUnavailable
from registrar_consul import ConsulBackend, ConsulConfig
from registrar_testing import free_ports, wait_until
from registrar_testing.conformance import registration_refusal
from registrar_testing.load import count_sends
from registrar_testing.consul import (ConsulAgent, ConsulCluster, ConsulDev, consul_binary,
                                      passing_ids)


@pytest.fixture
def instance():
    tag = uuid.uuid4().hex[:8]
    return Instance(f"svc-{tag}", f"pod-{tag}", "10.1.2.3", 8443, tags=["grpc", "v2"],
                    meta={"zone": "a", "version": "7"})


def make(address, instance, observers=None, **kw) -> ConsulBackend:
    section = {"type": "consul", "address": address, "ttl": "2s", "timeout": "1s", **kw}
    if observers is not None:
        section["observers"] = observers
    return ConsulBackend(instance, ConsulConfig.parse(section), environ={})


def on_cluster(cluster, instance, **kw) -> ConsulBackend:
    return make(cluster.client_addr, instance, cluster.server_addrs, **kw)


def get(addr, path, token=None, **params):
    headers = {"X-Consul-Token": token} if token else {}
    r = requests.get(addr + path, params=params, headers=headers, timeout=5)
    r.raise_for_status()
    return r


def all_ids(addr, service, stale=True):
    """Every instance the server's replica (stale) or the leader holds,
    whatever its checks."""
    params = {"stale": ""} if stale else {}
    return {e["Service"]["ID"] for e in get(addr, f"/v1/health/service/{service}", **params).json()}


def persisted_check(agent, check_id):
    """The check definition as the (non -dev) agent persisted it on disk:
    the only place Consul 1.8 shows DeregisterCriticalServiceAfter."""
    for path in (agent.process.workdir / "data" / "checks").glob("*"):
        if not path.is_file():
            continue  # checks/state/ holds the TTL checks' last states
        doc = json.loads(path.read_text())
        if doc["Check"]["CheckID"] == check_id:
            return doc
    return None


# -- what gets registered ------------------------------------------------------

def test_registration_carries_the_instance_and_a_ttl_check(consul_cluster, instance):
    backend = on_cluster(consul_cluster, instance, deregister_critical_after="90s")
    try:
        backend.register()
        # Passing at once on the leader's view: the check starts passing.
        listed = get(consul_cluster.server_addrs[0], f"/v1/health/service/{instance.service}",
                     passing="").json()
        assert instance.id in {e["Service"]["ID"] for e in listed}
        svc = get(consul_cluster.client_addr, f"/v1/agent/service/{instance.id}").json()
        assert (svc["ID"], svc["Service"], svc["Address"], svc["Port"]) == \
            (instance.id, instance.service, "10.1.2.3", 8443)
        assert svc["Tags"] == ["grpc", "v2"] and svc["Meta"] == {"zone": "a", "version": "7"}
        check = get(consul_cluster.client_addr, "/v1/agent/checks").json()[backend.check_id]
        assert ((check["Type"], check["Status"], check["ServiceID"])
                == ("ttl", "passing", instance.id))
        chk_type = wait_until(
            lambda: (persisted_check(consul_cluster.clients[0], backend.check_id) or {})
            .get("ChkType"), 5, "the agent persisted the check")
        assert chk_type["TTL"] == 2 * 10**9
        assert chk_type["DeregisterCriticalServiceAfter"] == 90 * 10**9
        assert backend._node == consul_cluster.clients[0].name
    finally:
        backend.deregister()
        backend.close()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("REGISTRAR_CONSUL_REAPER") != "1",
                    reason="takes 60-95 s: set REGISTRAR_CONSUL_REAPER=1 to watch Consul reap")
def test_consul_reaps_a_crashed_instance_after_deregister_critical_after(consul_cluster, instance):
    # deregister_critical_after: 1m, Consul's minimum
    backend = on_cluster(consul_cluster, instance)
    backend.register()
    backend.close()  # crashed: no more heartbeats, no deregistration
    registered = time.monotonic()
    leader_view = consul_cluster.server_addrs[0]  # without ?stale: the leader's

    def passing():
        return instance.id in {e["Service"]["ID"] for e in get(
            leader_view, f"/v1/health/service/{instance.service}", passing="").json()}

    assert passing()
    wait_until(lambda: not passing(), 2 + 1.5, "the TTL check goes critical")
    critical = time.monotonic()
    # The agent's reaper runs every 30 s; it removes a service critical for 1m or more.
    reaped = wait_until(lambda: instance.id not in all_ids(leader_view, instance.service,
                                                           stale=False)
                        and time.monotonic(), 60 + 30 + 5, "Consul reaps it", interval=0.5)
    print(f"critical after {critical - registered:.1f}s, reaped {reaped - critical:.1f}s later")
    assert 60 <= reaped - critical <= 60 + 30 + 2


def test_drain_is_maintenance_mode_naming_the_pod(consul_cluster, instance):
    backend = on_cluster(consul_cluster, instance)
    leader_view = consul_cluster.server_addrs[0]  # without ?stale, reads go to the leader
    try:
        backend.register()
        backend.drain("SIGTERM")
        checks = get(consul_cluster.client_addr, "/v1/agent/checks").json()
        maint = checks[f"_service_maintenance:{instance.id}"]
        assert maint["Status"] == "critical"
        assert instance.id in maint["Notes"] and "SIGTERM" in maint["Notes"]
        # Out of the ?passing view, still in the catalog until deregister.
        assert instance.id not in {e["Service"]["ID"] for e in get(
            leader_view, f"/v1/health/service/{instance.service}", passing="").json()}
        assert instance.id in {e["Service"]["ID"] for e in get(
            leader_view, f"/v1/health/service/{instance.service}").json()}
        backend.register()  # registering again ends the maintenance
        assert f"_service_maintenance:{instance.id}" not in get(
            consul_cluster.client_addr, "/v1/agent/checks").json()
        removal = backend.deregister()
        assert isinstance(removal.removed_index, int) and removal.removed_index > 0
        assert backend.deregister() == removal  # idempotent, same answer
        assert instance.id not in all_ids(leader_view, instance.service, stale=False)
    finally:
        backend.close()


def test_maintenance_drops_it_from_passing_before_the_deregister_call(consul_cluster, instance):
    """Consumers parked in blocking ?passing queries (on the leader's view,
    and on each server's own replica with ?stale) see the instance go at the
    maintenance step: deregister() is held back until they all have (at
    most 2 s), and each saw it go at an index before the removal's."""
    backend = on_cluster(consul_cluster, instance)
    registrar = Registrar(instance, [backend],
                          stop=StopConfig(grace_period=10, propagation_timeout=5))
    registrar.start(wait=True, timeout=10)
    for addr in consul_cluster.server_addrs:
        wait_until(lambda addr=addr: instance.id in passing_ids(addr, instance.service), 5,
                   "listed")
    events: list[tuple[float, str]] = []
    dropped_at: dict[str, int] = {}
    all_dropped = threading.Event()
    drain, deregister = backend.drain, backend.deregister

    def held_deregister():
        all_dropped.wait(2.0)
        events.append((time.monotonic(), "deregister called"))
        return deregister()

    def noted_drain(reason):
        events.append((time.monotonic(), "drain called"))
        return drain(reason)

    backend.drain = noted_drain
    backend.deregister = held_deregister
    consumers = ([(consul_cluster.server_addrs[0], False)]
                 + [(a, True) for a in consul_cluster.server_addrs])

    def consumer(addr: str, stale: bool) -> None:
        name = f"{addr}{'?stale' if stale else ''}"
        params = {"passing": "", **({"stale": ""} if stale else {})}
        index, end = 0, time.monotonic() + 10
        while time.monotonic() < end:
            r = requests.get(f"{addr}/v1/health/service/{instance.service}", timeout=10,
                             params={**params, **({"index": index, "wait": "5s"} if index else {})})
            index = int(r.headers["X-Consul-Index"])
            if instance.id not in {e["Service"]["ID"] for e in r.json()}:
                events.append((time.monotonic(), f"gone at {name}"))
                dropped_at[name] = index
                if len(dropped_at) == len(consumers):
                    all_dropped.set()
                return

    threads = [threading.Thread(target=consumer, args=c) for c in consumers]
    for t in threads:
        t.start()
    time.sleep(0.2)  # every consumer is parked in its blocking query
    report = registrar.stop("test")
    for t in threads:
        t.join(timeout=10)
    assert report.ok, report.summary()
    order = [what for _, what in sorted(events)]
    assert order[0] == "drain called" and order[-1] == "deregister called", order
    assert len(order) == 2 + len(consumers), order
    removed = report.backends[0].position.removed_index
    assert all(index < removed for index in dropped_at.values()), (dropped_at, removed)


def test_same_id_on_another_node_does_not_hold_up_confirmation(consul_cluster, instance):
    # A StatefulSet pod's next incarnation, registered at another agent
    # (a server's) with the same id before the old one deregistered.
    other = make(consul_cluster.server_addrs[2], instance)
    ours = on_cluster(consul_cluster, instance)
    try:
        ours.register()
        other.register()
        assert ours._node != other._node
        ours.deregister()
        wait_until(lambda: not any(o.sees(instance) for o in ours.observers()), 5, "our entry gone")
        assert all(instance.id in passing_ids(a, instance.service)
                   for a in consul_cluster.server_addrs)
        assert all(o.sees(instance) for o in other.observers())
    finally:
        other.deregister()
        ours.close(), other.close()


def test_health_filter_any_waits_for_the_deregistration(consul_cluster, instance):
    backend = on_cluster(consul_cluster, instance, health_filter="any")
    try:
        backend.register()
        wait_until(lambda: all(o.sees(instance) for o in backend.observers()), 5, "seen")
        backend.drain("test")
        time.sleep(0.2)  # the maintenance has reached every server by now
        assert all(o.sees(instance) for o in backend.observers()), "maintenance is not removal"
        backend.deregister()
        wait_until(lambda: not any(o.sees(instance) for o in backend.observers()), 5, "gone")
        assert not any(instance.id in all_ids(a, instance.service)
                       for a in consul_cluster.server_addrs)
    finally:
        backend.close()


def test_wait_gone_holds_one_blocking_query_until_the_server_changes(consul_cluster, instance):
    backend = on_cluster(consul_cluster, instance)
    try:
        backend.register()
        observer = backend.observers()[0]
        wait_until(lambda: observer.sees(instance), 5, "seen")
        port = urlsplit(observer.address).port
        result: list[bool] = []
        with count_sends([port]) as sent:
            waiter = threading.Thread(target=lambda: result.append(observer.wait_gone(
                instance, None, Deadline.after(10, Clock()))))
            waiter.start()
            time.sleep(0.5)  # the blocking query is held meanwhile
            assert not result
            backend.deregister()
            waiter.join(10)
        assert result == [True]
        # One read, one blocking query answered by the change (a second if
        # the server applied the drain's and the removal's changes apart).
        assert sent[port] <= 3, dict(sent)
    finally:
        backend.close()


def test_a_dead_observer_is_a_typed_error(tmp_path, instance):
    with ConsulDev(tmp_path) as dev:
        backend = make(dev.http_addr, instance)
        backend.register()
        observer = backend.observers()[0]
        assert observer.sees(instance)
        dev.agent.kill()
        with pytest.raises(RegistryUnavailable):
            wait_until(lambda: observer.sees(instance) and None, 5, "the watcher notices")
        with pytest.raises(RegistryUnavailable, match="connection refused"):
            backend.heartbeat()
        backend.close()


def test_agent_without_servers_is_unavailable(tmp_path, instance):
    # The agent accepts the registration locally but cannot sync it: the
    # read-back gets Consul's 500 and the core will retry.
    with ConsulCluster(tmp_path, servers=1, clients=1) as cluster:
        cluster.servers[0].kill()
        backend = make(cluster.client_addr, instance)
        try:
            with pytest.raises(RegistryUnavailable, match="read back the registration at .*: 500"):
                backend.register()
            with pytest.raises(RegistryUnavailable, match=": 500"):
                backend.observers()[0].sees(instance)
        finally:
            backend.close()


# -- the local agent forgets us ------------------------------------------------

@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    with ConsulDev(tmp_path_factory.mktemp("consul-dev")) as agent:
        yield agent


def dev_registrar(dev, instance):
    return Registrar.from_config({
        "service": {"name": instance.service, "id": instance.id, "address": instance.address,
                    "port": instance.port},
        "backends": [{"type": "consul", "address": dev.http_addr, "ttl": "3s", "timeout": "500ms"}],
        "stop": {"grace_period": "10s", "propagation_timeout": "5s"},
        "health": False}).start(wait=True, timeout=10)  # no app listens: register at once


def restart(dev, keep_state: bool) -> None:
    """SIGKILL the agent and start it again on the same ports; without its
    data dir's services/ and checks/ it has forgotten every registration."""
    dev.agent.kill()
    if not keep_state:
        for sub in ("services", "checks"):
            shutil.rmtree(dev.agent.process.workdir / "data" / sub, ignore_errors=True)
    dev.agent.process.start()
    wait_until(dev.agent.ready, 10, "the agent is back", ignore=Exception)


def test_agent_restarted_without_its_state_gets_us_back_within_one_heartbeat(dev, instance):
    registrar = dev_registrar(dev, instance)
    try:
        assert instance.id in passing_ids(dev.http_addr, instance.service)
        restart(dev, keep_state=False)
        back = time.monotonic()
        wait_until(lambda: instance.id in passing_ids(dev.http_addr, instance.service),
                 1.0 * 1.1 + 1.0, "re-registered within one heartbeat interval (1s, +10% jitter)")
        took = time.monotonic() - back
        # The core counts the repair once heartbeat() has returned.
        wait_until(lambda: registrar.status(observe=False)["backends"][0]["repairs"] == 1, 1,
                 "the repair is counted")
    finally:
        report = registrar.stop()
    assert report.ok, report.summary()
    assert took < 2.1


def test_agent_down_reads_not_registered_at_once_and_registered_again_once_back(dev, instance):
    # A -dev agent given -data-dir (as ConsulDev does) and any client agent
    # persist API-registered services and TTL check states, and reload them.
    # While it is down nobody vouches that a server lists us (a client
    # agent's node fails, or has left): not registered, at once, not a TTL later.
    registrar = dev_registrar(dev, instance)
    try:
        dev.agent.kill()
        wait_until(lambda: not registrar.registered, 0.5, "not registered once the agent is down")
        dev.agent.process.start()
        wait_until(dev.agent.ready, 10, "the agent is back", ignore=Exception)
        wait_until(lambda: registrar.registered and instance.id in passing_ids(
            dev.http_addr, instance.service), 1.0 * 1.1 + 1.0,
            "registered and listed again within one heartbeat", ignore=Exception)
    finally:
        report = registrar.stop()
    assert report.ok, report.summary()


def test_heartbeat_of_a_never_registered_backend_registers(dev, instance):
    backend = make(dev.http_addr, instance)
    try:
        assert backend.heartbeat() is True
        assert backend.heartbeat() is False
    finally:
        backend.deregister()
        backend.close()


def stopped(pid: int) -> bool:
    """Every thread of the process is stopped. SIGSTOP returns before that:
    until the group stop completes, some threads of a loaded Go process
    still answer."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            states.append(stat.read_text().rpartition(")")[2].split()[0])
        except OSError:
            pass  # a thread that just ended
    return bool(states) and all(state in ("T", "t") for state in states)


def test_frozen_agent_times_out_as_unavailable(dev, instance):
    backend = make(dev.http_addr, instance, timeout="300ms")
    backend.register()
    dev.agent.freeze()
    try:
        wait_until(lambda: stopped(dev.agent.process.pid), 5, "the agent is stopped")
        began = time.monotonic()
        with pytest.raises(RegistryUnavailable, match="no answer in time"):
            backend.heartbeat()
        assert time.monotonic() - began < 1.0
    finally:
        dev.agent.thaw()
    backend.deregister()
    backend.close()


# -- configuration and the environment -----------------------------------------

def test_environment_gives_the_address_and_token_but_explicit_config_wins(dev, instance, tmp_path):
    cfg = ConsulConfig(type="consul")
    backend = ConsulBackend(instance, cfg,
                            environ={"CONSUL_HTTP_ADDR": dev.http_addr.split("//")[1],
                                     "CONSUL_HTTP_TOKEN": "from-env"})
    assert backend.address.endswith(dev.http_addr.split("//")[1]) and backend._token == "from-env"
    assert [o.address for o in backend.observers()] == [backend.address]
    backend.close()
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    explicit = ConsulBackend(instance, ConsulConfig(type="consul", address="http://10.0.0.9:8500",
                                                    token_file=str(token_file)),
                             environ={"CONSUL_HTTP_ADDR": "127.0.0.1:1",
                                      "CONSUL_HTTP_TOKEN": "env"})
    assert (explicit.address, explicit._token) == ("http://10.0.0.9:8500", "from-file")
    assert explicit._agent.token == "from-file"  # py-consul would have taken the env's
    explicit.close()
    with pytest.raises(ConfigError, match=r"^address: \$CONSUL_HTTP_ADDR: expected an address"):
        ConsulBackend(instance, cfg, environ={"CONSUL_HTTP_ADDR": "http://h:1/x"})
    with pytest.raises(ConfigError,
                       match=r"^token_file: \$CONSUL_HTTP_TOKEN_FILE: cannot read /nope"):
        ConsulBackend(instance, cfg, environ={"CONSUL_HTTP_TOKEN_FILE": "/nope"})


def test_datacenter_must_be_the_agents(dev, instance):
    right = make(dev.http_addr, instance, datacenter="dc1")
    try:
        right.register()
        assert right.observers()[0].sees(instance)  # reads name ?dc=dc1
        right.deregister()
    finally:
        right.close()
    wrong = make(dev.http_addr, instance, datacenter="dc2")
    with pytest.raises(RegistrationRejected, match="datacenter 'dc2' is not that of the agent"):
        wrong.register()
    wrong.close()
    assert instance.id not in all_ids(dev.http_addr, instance.service, stale=False)


@pytest.mark.parametrize("text,parsed", [
    ("http://10.0.0.1:8500", ("http", "10.0.0.1", 8500)),
    ("10.0.0.1:8600", ("http", "10.0.0.1", 8600)),
    ("https://consul.service", ("https", "consul.service", 8501)),
    ("http://[fd00::1]:8500/", ("http", "fd00::1", 8500)),
])
def test_addresses(text, parsed):
    from registrar_consul import parse_address

    assert parse_address(text) == parsed


@pytest.mark.parametrize("section,expected", [
    ({"address": "127.0.0.1:8500/v1"}, "address: expected an address like http://127.0.0.1:8500"),
    ({"observers": ["ftp://x:1"]}, "observers: expected an address like"),
    ({"deregister_critical_after": "30s"}, "deregister_critical_after: should be from 60s to 24h"),
    ({"token": "s3cr3t-token", "token_file": "/etc/hostname"},
     "give token or token_file, not both"),
    ({"token_file": "/nonexistent/t"}, "token_file: cannot read /nonexistent/t"),
    ({"token": 123456789}, "token: expected text (the value is not shown)"),
    ({"health_filter": "critical"},
     'health_filter: expected one of "passing", "any", got "critical"'),
    ({"tls": {"ca_file": "/nonexistent/ca.pem"}},
     'tls.ca_file: cannot read "/nonexistent/ca.pem": no such file'),
])
def test_config_errors_name_the_field_and_never_the_token(tmp_path, capsys, section, expected):
    from registrar import cli

    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"service": {"name": "web", "port": 80},
                                    "backends": [{"type": "consul", **section}]}))
    assert cli.main(["agent", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
    assert "s3cr3t" not in err and "123456789" not in err


# -- ACLs ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def acl(tmp_path_factory):
    with ConsulCluster(tmp_path_factory.mktemp("consul-acl"), servers=3, clients=1, acl=True) as c:
        yield c


def service_token(cluster, service):
    return cluster.create_token(f'service "{service}" {{ policy = "write" }}\n'
                                'node_prefix "" { policy = "read" }')


def test_acl_right_token_works_end_to_end(acl, instance, monkeypatch):
    token = service_token(acl, instance.service)
    # py-consul itself would let this one win over ours.
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", str(uuid.uuid4()))
    backend = ConsulBackend(instance, ConsulConfig(
        type="consul", address=acl.client_addr, observers=acl.server_addrs, ttl="2s", token=token))
    registrar = Registrar(instance, [backend],
                          stop=StopConfig(grace_period=10, propagation_timeout=5))
    registrar.start(wait=True, timeout=10)
    try:
        for addr in acl.server_addrs:
            wait_until(lambda addr=addr: instance.id in passing_ids(addr, instance.service,
                                                                   acl.management_token),
                       5, "listed on every server")
        assert backend.heartbeat() is False
        assert backend._node == acl.clients[0].name  # learnt from our check: no agent:read
    finally:
        report = registrar.stop("test")
    assert report.ok, report.summary()
    assert isinstance(report.backends[0].position.removed_index, int)
    assert not any(instance.id in passing_ids(a, instance.service, acl.management_token)
                   for a in acl.server_addrs)


def test_acl_a_frozen_agent_at_the_stop_the_pods_own_token_removes_it_through_the_servers(
        acl, instance):
    # Catalog deregistration of one's own service needs service:write on it,
    # which registering needed too: the pod's token is enough.
    token = service_token(acl, instance.service)
    backend = ConsulBackend(instance, ConsulConfig(
        type="consul", address=acl.client_addr, observers=acl.server_addrs, ttl="2s",
        timeout="500ms", token=token))
    registrar = Registrar(instance, [backend], stop=StopConfig(grace_period=10))
    registrar.start(wait=True, timeout=10)

    def listed(addr):
        return instance.id in {e["Service"]["ID"] for e in get(
            addr, f"/v1/health/service/{instance.service}", acl.management_token, stale="").json()}

    wait_until(lambda: all(listed(a) for a in acl.server_addrs), 5, "listed on every server")
    client = acl.clients[0]
    client.freeze()
    try:
        report = registrar.stop("test")
        assert report.backends[0].removed, report.summary()
        # Gone from every server while the agent is still frozen (once it
        # thaws, its queued calls race with a look taken then).
        assert not any(listed(a) for a in acl.server_addrs), report.summary()
    finally:
        client.thaw()
    # The thawed agent runs its queued calls (the drain's maintenance syncs
    # the service back, critical) and then the deregistration it was sent:
    # gone from the catalog too, not left to deregister_critical_after.
    time.sleep(0.5)
    wait_until(lambda: not any(listed(a) for a in acl.server_addrs), 5,
               "gone from every server after the agent thawed")


@pytest.mark.parametrize("which", ["unknown", "other service", "none"])
def test_acl_refusal_names_the_cause_never_the_token(acl, instance, which):
    token = {"unknown": str(uuid.uuid4()), "none": None,
             "other service": service_token(acl, "someone-else")}[which]
    message = registration_refusal(
        make(acl.client_addr, instance, acl.server_addrs, **({"token": token} if token else {})),
        (token,) if token else ())
    assert f"register {instance.service}/{instance.id} at {acl.client_addr}" in message
    expected = {"unknown": "Consul does not know the ACL token from the config (ACL not found)",
                "other service": "the ACL token from the config may not do this (Permission denied",
                "none": "no ACL token was given"}[which]
    assert expected in message, message
    if token:
        assert token not in message


def test_acl_token_that_cannot_read_the_entry_back_is_an_error(acl, instance):
    # Without node:read, ACLs filter the entry out of every read: observers
    # would take that for a removal. Registration says so instead.
    token = acl.create_token(f'service "{instance.service}" {{ policy = "write" }}')
    backend = make(acl.client_addr, instance, acl.server_addrs, token=token)
    try:
        with pytest.raises(RegistryUnavailable, match="node:read") as caught:
            backend.register()
        assert token not in str(caught.value)
    finally:
        backend.deregister()
        backend.close()


def test_acl_deregister_and_drain_of_an_unknown_id_succeed(acl, instance):
    # With ACLs, Consul 1.8 answers 500 "Unknown service" where it answers
    # 200 (deregister) or 404 (maintenance) without them.
    backend = make(acl.client_addr, instance, acl.server_addrs,
                   token=service_token(acl, instance.service))
    try:
        backend.drain("test")
        removal = backend.deregister()
        assert isinstance(removal.removed_index, int)
        assert not any(o.sees(instance, since=removal) for o in backend.observers())
    finally:
        backend.close()


def test_acl_agent_process_with_a_wrong_token_exits_without_showing_it(acl, tmp_path, instance):
    wrong = str(uuid.uuid4())
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({
        "service": {"name": instance.service, "port": 8080},
        "backends": [{"type": "consul", "address": acl.client_addr, "observers": acl.server_addrs,
                      "ttl": "2s", "timeout": "1s"}],
        "control": {"listen": None}, "stop": {"grace_period": "10s", "safety_margin": "1s"},
        "health": False}))  # no app listens here: register at once
    env = {**os.environ, "POD_NAME": instance.id, "POD_IP": "10.1.2.3", "CONSUL_HTTP_TOKEN": wrong}
    proc = subprocess.run([sys.executable, "-m", "registrar", "agent", "--config", str(path),
                           "--log-level", "debug"], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 1, proc.stderr
    assert "registration rejected" in proc.stderr
    assert ("Consul does not know the ACL token from CONSUL_HTTP_TOKEN (ACL not found)"
            in proc.stderr)
    assert wrong not in proc.stderr + proc.stdout


# -- TLS ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_agent(tmp_path_factory):
    """A -dev agent serving HTTPS with certificates from `consul tls`, and
    requiring client certificates."""
    d = tmp_path_factory.mktemp("consul-tls")
    binary = consul_binary()
    for args in (["ca", "create"], ["cert", "create", "-server", "-dc", "dc1"],
                 ["cert", "create", "-client", "-dc", "dc1"]):
        subprocess.run([binary, "tls", *args], cwd=d, check=True, capture_output=True, timeout=30)
    http, https, lan, wan, rpc = free_ports(5)
    (d / "tls.json").write_text(json.dumps({
        "ports": {"https": https}, "ca_file": str(d / "consul-agent-ca.pem"),
        "cert_file": str(d / "dc1-server-consul-0.pem"),
        "key_file": str(d / "dc1-server-consul-0-key.pem"),
        "verify_incoming_https": True}))
    argv = [binary, "agent", "-dev", "-node=consul-tls", "-bind=127.0.0.1", "-client=127.0.0.1",
            "-dns-port=-1", "-grpc-port=-1", f"-http-port={http}", f"-serf-lan-port={lan}",
            f"-serf-wan-port={wan}", f"-server-port={rpc}", f"-config-file={d / 'tls.json'}"]
    agent = ConsulAgent("consul-tls", d / "agent", argv, http)
    agent.start()
    try:
        wait_until(agent.ready, 10, "the TLS agent is ready", ignore=Exception)
        yield d, f"https://127.0.0.1:{https}"
    finally:
        agent.kill()


def test_tls_with_ca_and_client_certificate(tls_agent, instance):
    d, url = tls_agent
    tls = {"ca_file": str(d / "consul-agent-ca.pem"),
           "cert_file": str(d / "dc1-client-consul-0.pem"),
           "key_file": str(d / "dc1-client-consul-0-key.pem")}
    backend = make(url, instance, tls=tls)
    try:
        backend.register()
        assert backend.observers()[0].sees(instance)
        assert backend.heartbeat() is False
        backend.drain("test")
        backend.deregister()
        wait_until(lambda: not backend.observers()[0].sees(instance), 5, "gone")
    finally:
        backend.close()
    unverified = make(url, instance, tls={**tls, "ca_file": None})
    with pytest.raises(RegistrationRejected, match="certificate verify failed"):
        unverified.register()
    unverified.close()
    no_client_cert = make(url, instance, tls={"ca_file": tls["ca_file"]})
    with pytest.raises(RegistrationRejected, match="refused our client certificate"):
        no_client_cert.register()
    no_client_cert.close()
