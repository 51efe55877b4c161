"""Library mode, default configuration: Registrar.from_config(...).start()
registers only once the app accepts connections on service.port, as the
agent and the wrapper do. uvicorn runs the lifespan that calls start()
before it binds; a pod listed before its app listens loses requests."""
from __future__ import annotations

import socket
import uuid

import pytest

from registrar import Registrar
from registrar.errors import RegistryUnavailable
from registrar_testing import free_port, wait_until
from registrar_testing.etcd import kv_get_serializable


def config(cluster, port: int, **extra):
    tag = uuid.uuid4().hex[:8]
    return {"service": {"name": f"lib-{tag}", "id": f"pod-{tag}", "address": "127.0.0.1",
                        "port": port},
            "backends": [{"type": "etcd", "endpoints": cluster.endpoints, "timeout": "500ms"}],
            "stop": {"grace_period": "10s", "propagation_timeout": "5s"}, **extra}


def listed(cluster, registrar) -> list[bool]:
    key = f"services/{registrar.instance.service}/{registrar.instance.hostport}"
    return [kv_get_serializable(ep, key)[1] for ep in cluster.endpoints]


def test_start_registers_only_once_the_app_listens(etcd_cluster):
    port = free_port()
    registrar = Registrar.from_config(config(etcd_cluster, port)).start()
    try:
        # The gate has probed the closed port (and said why it waits) ...
        wait_until(lambda: registrar.readiness()[1].startswith(
            f"waiting for the app: 127.0.0.1:{port}: "), 5, "readiness names the gate")
        with pytest.raises(RegistryUnavailable, match="waiting for the app"):
            registrar.wait_registered(timeout=0.3)
        assert listed(etcd_cluster, registrar) == [False] * 3  # ... and registered nothing
        with socket.create_server(("127.0.0.1", port)):
            registrar.wait_registered(timeout=10)
            assert listed(etcd_cluster, registrar) == [True] * 3
            report = registrar.stop()
        assert report.ok, report.summary()
        assert listed(etcd_cluster, registrar) == [False] * 3
    finally:
        registrar.stop()


def test_health_false_or_gate_false_registers_at_once(etcd_cluster):
    for build, start in [(config(etcd_cluster, free_port(), health=False), {}),
                         (config(etcd_cluster, free_port()), {"gate": False})]:
        registrar = Registrar.from_config(build).start(wait=True, timeout=10, **start)
        try:
            assert listed(etcd_cluster, registrar) == [True] * 3  # nothing listens there
        finally:
            assert registrar.stop().ok


def test_a_stop_before_the_app_listened_ends_the_wait_and_leaves_nothing(etcd_cluster):
    registrar = Registrar.from_config(config(etcd_cluster, free_port())).start()
    wait_until(lambda: "waiting for the app" in registrar.readiness()[1], 5, "gate waiting")
    report = registrar.stop()
    assert listed(etcd_cluster, registrar) == [False] * 3
    assert report.ok, report.summary()
    assert registrar.gate.passed is False  # the gate's thread ended without registering


def test_the_library_keeps_apscheduler_quiet(caplog):
    """Issue 25 (7): every library example printed APScheduler's
    "Scheduler started" and "Added job" at INFO; the CLI silenced them, the
    library did not. An app that set that logger's level keeps it."""
    import logging

    from registrar import Instance, Registrar
    from registrar_testing.memory import MemoryBackend, MemoryRegistry

    logging.getLogger("apscheduler").setLevel(logging.NOTSET)
    caplog.set_level(logging.INFO)
    instance = Instance.create("quiet", 8080, id="q-1", address="127.0.0.1")
    r = Registrar(instance, [MemoryBackend(instance, registry=MemoryRegistry())])
    r.start(wait=True, timeout=5, gate=False)
    r.stop("test")
    assert not [rec for rec in caplog.records if rec.name.startswith("apscheduler")
                and rec.levelno < logging.WARNING], caplog.text
