"""The conformance suite every backend passes against its real server.

A backend joins by subclassing :class:`BackendConformance` in a test module
and providing a ``harness`` fixture (a :class:`Harness`) bound to a real
three-member cluster (see testing/README.md). Checks of what the registry holds go through the
harness's own client, never through the code under test.
"""
from __future__ import annotations

import abc
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from registrar import Instance, Registrar
from registrar.discovery import backend_class
from registrar.plugin import Backend
from registrar.clock import Clock, Deadline
from registrar.errors import RegistrationRejected, RegistryUnavailable

from . import wait_until
from .faults import Blackhole
from .load import count_sends

#: Most requests one stopping pod may send to one member (issue 17).
REQUESTS_PER_MEMBER = 10


def registration_refusal(backend: Backend, secrets: tuple[str, ...] = ()) -> str:
    """The message of the RegistrationRejected that ``register()`` raises
    (the backend is closed after), checked to be one line and to carry none
    of ``secrets``: what a user sees when the registry refuses."""
    try:
        with pytest.raises(RegistrationRejected) as caught:
            backend.register()
    finally:
        backend.close()
    message = str(caught.value)
    assert "\n" not in message, message
    assert not any(secret and secret in message for secret in secrets), "a secret in the error"
    return message


class Harness(abc.ABC):
    """What the suite needs to know about one backend and its cluster."""

    #: The short TTL the suite configures (seconds).
    ttl: float
    #: How late the registry may reap an entry after its TTL (expiry sweeps).
    expiry_slack: float = 1.5

    @abc.abstractmethod
    def section(self, **overrides: Any) -> dict[str, Any]:
        """The backend's config section (with ``type``) for the cluster,
        using ``ttl``."""

    @abc.abstractmethod
    def views(self, instance: Instance) -> list[bool]:
        """Per cluster member, read independently of the backend: does
        that member list the instance?"""

    @abc.abstractmethod
    def lose_registration(self, backend: Backend) -> None:
        """Make the registry lose the entry the way it does in real life
        (lease revoked, session expired, agent forgot it)."""

    @abc.abstractmethod
    def crash(self, backend: Backend) -> None:
        """Leave the backend as a SIGKILLed process would: no deregistration,
        no heartbeats, no clean session close."""

    @abc.abstractmethod
    def member_ports(self) -> list[int]:
        """The client ports of every member the backend talks to."""

    def freeze_follower(self) -> contextlib.AbstractContextManager[tuple[int, int]]:
        """Freeze (SIGSTOP) a member that is not the leader; yields (the
        index of its observer, its client port); thaws it at exit and waits
        until it serves again. Backends whose harness cannot do it skip."""
        pytest.skip("this harness cannot freeze a member")

    _thaw = None

    @contextlib.contextmanager
    def frozen(self, member: Any, index: int, port: int,
               serving: Any) -> Iterator[tuple[int, int]]:
        """freeze_follower()'s body for a member of the test kit (an etcd
        member, a ZooKeeper server, a Consul agent: freeze() and thaw()),
        ``serving()`` true once it serves again."""
        member.freeze()
        self._thaw = member.thaw
        try:
            yield index, port
        finally:
            member.thaw()  # SIGCONT again is harmless
            self._thaw = None
            wait_until(serving, 30, "the thawed member serves again", interval=0.05,
                       ignore=Exception)

    def thaw(self) -> None:
        """Thaw the member frozen by freeze_follower() before the block ends."""
        if self._thaw is not None:
            self._thaw()

    def backend(self, instance: Instance, **overrides: Any) -> Backend:
        section = self.section(**overrides)
        cls = backend_class(section["type"])
        return cls(instance, cls.config_model.parse(section))

    def registrar(self, instance: Instance, **stop: Any) -> Registrar:
        return Registrar.from_config({
            "service": {"name": instance.service, "id": instance.id,
                        "address": instance.address, "port": instance.port,
                        "tags": list(instance.tags), "meta": dict(instance.meta)},
            "backends": [self.section()],
            "stop": {"grace_period": "20s", "propagation_timeout": "5s", **stop},
            "health": False})  # no app listens on the instance's port: register at once


class BackendConformance:
    """Subclass in a module that defines a ``harness`` fixture."""

    @pytest.fixture
    def instance(self) -> Instance:
        tag = uuid.uuid4().hex[:8]
        return Instance(f"svc-{tag}", f"pod-{tag}", "10.9.8.7", 8080,
                        tags=["conformance"], meta={"version": "1"})

    @pytest.fixture
    def backend(self, harness: Harness, instance: Instance):
        backend = harness.backend(instance)
        yield backend
        try:
            backend.deregister()
        except Exception:  # noqa: BLE001 - the test may have broken the registry on purpose
            pass
        backend.close()

    def test_registered_entry_is_visible_to_every_member(self, harness, backend, instance):
        backend.register()
        wait_until(lambda: all(harness.views(instance)), 5, "every member lists the instance")
        assert all(o.sees(instance) for o in backend.observers())
        assert len(backend.observers()) == len(harness.views(instance))

    def test_register_is_idempotent(self, harness, backend, instance):
        backend.register()
        backend.register()
        wait_until(lambda: all(harness.views(instance)), 5, "every member lists the instance")
        assert backend.heartbeat() is False  # nothing to repair

    def test_heartbeats_keep_it_alive_well_past_its_ttl(self, harness, instance):
        registrar = harness.registrar(instance)
        registrar.start(wait=True, timeout=10)
        try:
            wait_until(lambda: all(harness.views(instance)), 5, "every member lists the instance")
            end = time.monotonic() + 2.5 * harness.ttl
            while time.monotonic() < end:
                assert all(harness.views(instance)), "the entry lapsed while heartbeats ran"
                time.sleep(0.1)
            status = registrar.status(observe=False)["backends"][0]
            assert status["heartbeat_failures"] == 0 and status["repairs"] == 0
        finally:
            assert registrar.stop().ok

    @pytest.mark.slow
    def test_entry_disappears_within_its_ttl_after_a_crash(self, harness, backend, instance):
        backend.register()
        wait_until(lambda: all(harness.views(instance)), 5, "every member lists the instance")
        crashed_at = time.monotonic()
        harness.crash(backend)
        time.sleep(harness.ttl / 2)
        assert any(harness.views(instance)), "removed long before its TTL: not by expiry"
        wait_until(lambda: not any(harness.views(instance)),
                 harness.ttl + harness.expiry_slack, "the crashed entry expires")
        assert time.monotonic() - crashed_at <= harness.ttl + harness.expiry_slack

    def test_heartbeat_repairs_a_lost_registration(self, harness, backend, instance):
        backend.register()
        wait_until(lambda: all(harness.views(instance)), 5, "every member lists the instance")
        harness.lose_registration(backend)
        wait_until(lambda: not any(harness.views(instance)), harness.ttl + harness.expiry_slack,
                 "the registry lost the entry")
        assert wait_until(lambda: backend.heartbeat(), 5, "a heartbeat repairs") is True
        wait_until(lambda: all(harness.views(instance)), 5, "the entry is back on every member")
        assert backend.heartbeat() is False

    def test_deregister_is_idempotent(self, harness, backend, instance):
        backend.register()
        wait_until(lambda: all(harness.views(instance)), 5, "every member lists the instance")
        backend.deregister()
        backend.deregister()
        wait_until(lambda: not any(harness.views(instance)), 5, "every member dropped it")
        fresh = harness.backend(instance)  # never registered anything
        try:
            fresh.drain("conformance test")
            fresh.deregister()
        finally:
            fresh.close()

    def test_registered_flag_and_observers_follow_the_contract(self, harness, backend, instance):
        observers = backend.observers()
        assert observers and [id(o) for o in backend.observers()] == [id(o) for o in observers]
        assert backend.registered is False
        backend.register()
        assert backend.registered is True
        position = backend.deregister()
        assert backend.registered is False
        wait_until(lambda: not any(o.sees(instance, since=position) for o in observers), 5,
                   "every observer confirms the removal at its position")

    def test_removal_is_seen_by_every_member_before_stop_returns(self, harness, instance):
        registrar = harness.registrar(instance)
        registrar.start(wait=True, timeout=10)
        wait_until(lambda: all(harness.views(instance)), 5, "every member lists the instance")
        report = registrar.stop("test")
        # Read at once, before anything could catch up after the fact.
        views = harness.views(instance)
        assert views == [False] * len(views)
        assert report.ok, report.summary()
        (b,) = report.backends
        assert b.removed and b.confirmed
        assert len(b.observers_confirmed) == len(views) and not b.observers_unconfirmed

    def test_drain_keeps_the_entry_until_deregister(self, harness, backend, instance):
        backend.register()
        wait_until(lambda: all(harness.views(instance)), 5, "every member lists the instance")
        backend.drain("conformance test")
        backend.deregister()
        wait_until(lambda: not any(harness.views(instance)), 5, "every member dropped it")

    def test_unreachable_registry_is_a_typed_error(self, harness, instance):
        with Blackhole(harness.member_ports(), mode="reject") if Blackhole.available() else _skip():
            backend = harness.backend(instance)
            try:
                with pytest.raises(RegistryUnavailable):
                    backend.register()
                with pytest.raises(RegistryUnavailable):
                    backend.observers()[0].sees(instance)
            finally:
                backend.close()

    def test_stop_returns_by_the_deadline_when_every_member_is_blackholed(self, harness, instance):
        if not Blackhole.available():
            pytest.skip("nftables is not usable here")
        registrar = harness.registrar(instance)
        registrar.start(wait=True, timeout=10)
        with Blackhole(harness.member_ports(), mode="drop"):
            began = time.monotonic()
            report = registrar.stop("test", Deadline.after(1.5, Clock()))
            elapsed = time.monotonic() - began
        assert elapsed < 1.5 + 0.3, f"stop() took {elapsed:.2f}s against a 1.5s deadline"
        assert not report.ok
        # The entry expires by itself: never left behind past its TTL.
        wait_until(lambda: not any(harness.views(instance)),
                 harness.ttl + harness.expiry_slack + 2, "the orphaned entry expires")


    def test_a_stop_costs_few_requests_per_member_on_a_healthy_cluster(self, harness, instance):
        registrar = harness.registrar(instance)
        registrar.start(wait=True, timeout=10)
        wait_until(lambda: all(harness.views(instance)), 5, "every member lists the instance")
        ports = harness.member_ports()
        with count_sends(ports) as sent:
            report = registrar.stop("test")
        assert report.ok, report.summary()
        assert max(sent.values()) <= REQUESTS_PER_MEMBER, dict(sent)

    def test_a_lagging_member_confirms_once_caught_up_at_a_bounded_cost(self, harness, backend,
                                                                         instance):
        backend.register()
        wait_until(lambda: all(harness.views(instance)), 5, "every member lists the instance")
        observers = backend.observers()
        assert all(o.sees(instance) for o in observers)
        with harness.freeze_follower() as (index, port):
            # As the stop sequence does: our own call may have gone to the frozen
            # member, so a failed drain does not stop the removal, and the
            # deregistration is asked again until it lands.
            try:
                backend.drain("conformance test")
            except RegistryUnavailable:
                pass
            position = _retried(backend.deregister, 10)
            others = [o for i, o in enumerate(observers) if i != index]
            assert all(_confirm(o, instance, position, 5) for o in others)
            lag = 1.5
            thaw = threading.Timer(lag, harness.thaw)
            with count_sends([port]) as sent:
                began = time.monotonic()
                thaw.start()
                try:
                    confirmed = _confirm(observers[index], instance, position, 15)
                finally:
                    thaw.join()
                waited = time.monotonic() - began
        assert confirmed, "the member never confirmed after it was thawed"
        assert waited >= lag - 0.05, "a frozen member cannot have confirmed"
        # However long it lagged: a watch, a blocking query, a few pings.
        assert sent[port] <= REQUESTS_PER_MEMBER, dict(sent)


def _retried(call: Callable[[], Any], seconds: float) -> Any:
    """``call()``, asked again after RegistryUnavailable for up to ``seconds``."""
    deadline = Deadline.after(seconds, Clock())
    while True:
        try:
            return call()
        except RegistryUnavailable:
            if deadline.expired:
                raise
            time.sleep(0.05)


def _confirm(observer, instance: Instance, position: Any, seconds: float) -> bool:
    """What the stop sequence does with one observer: wait_gone(), asked
    again after a transient error, until ``seconds`` have passed."""
    deadline = Deadline.after(seconds, Clock())
    try:
        return _retried(lambda: observer.wait_gone(instance, position, deadline), seconds)
    except RegistryUnavailable:
        return False


def _skip():
    pytest.skip("nftables is not usable here")
