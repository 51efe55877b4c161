"""Whether the servers still list our registration, known the moment they
stop (ConsulBackend uses it for ``registered``).

A check pass that the local agent accepts says nothing about the servers:
a client agent that leaves the cluster (it does on SIGTERM, e.g. during a
rolling restart of the agents' DaemonSet) has the servers drop its node and
every service on it within ~0.3 s, and goes on accepting passes for the
seconds its leave and restart take. Consumers read the servers, so the only
evidence that they list the pod is a server's answer.

One blocking query through the agent on our node's checks and our
service's (``/v1/health/node/<node>``), ``?stale``: any server answers from
its replica, and holds the query until a check on our node changes. That is
what decides whether ``?passing`` lists us: the service is there with its
checks, and none of them, nor the node's own (serfHealth, node
maintenance), is other than passing. A drop is known within milliseconds,
for one held request per pod (renewed every LISTING_WAIT) and at most one
answer per change on its node -- not per change of the service, which would
wake every instance of a large service at every other instance's
registration. While the node's checks keep changing (pods on it stopping
and starting in a rollout) the next query waits HOLD_OFF after an answer,
so that one answer covers every change of that time: each change otherwise
wakes every pod on the node, which doubled the requests per stopping pod at
the servers in a 200-pod rollout. The price: a drop that comes within
HOLD_OFF of another change on the node is seen up to HOLD_OFF late. A read
once per heartbeat would cost about as much as the watch at rest and lie
for up to a heartbeat interval (3.3 s by default).

Which answers count: the first read is consistent (the leader, which has
applied our registration: if it lacks us, we are gone); its index is the
baseline. A blocking answer comes from a server whose index has passed it,
or, when the wait ran out, from one that may lag: below the baseline it
proves nothing. An agent that refuses connections is not running: its node
is leaving or failed, and ``?passing`` drops it with it. Any other failure
(a timeout, no server known yet) proves nothing either way and is asked
again; the TTL bounds how long ``registered`` is believed without a landed
heartbeat (registration.py).
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from registrar.plugin import MemberDown, RegistrarError

from ._client import read_node_checks, request

if TYPE_CHECKING:
    from . import ConsulBackend

log = logging.getLogger(__name__)

#: Longest a server holds the watch's blocking query; bounds how long its
#: thread outlives close() (it opens nothing after).
LISTING_WAIT = 30.0
#: Pause after a failed read, doubling up to RETRY_MAX.
RETRY_FIRST, RETRY_MAX = 0.05, 1.0
#: Pause after an answer that found us still listed, before the next query.
HOLD_OFF = 0.5


class ListingWatch:
    """Clears ``backend.registered`` once the servers no longer list our
    registration as consumers read it (or the agent refuses connections).
    ``follow()`` after each registration, ``unfollow()`` before a removal;
    ``close()`` is final."""

    def __init__(self, backend: ConsulBackend):
        self.backend = backend
        self._lock = threading.Lock()
        self._generation = 0
        self._following = False
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._client = None

    def follow(self) -> None:
        """Watch the registration that has just been made (and read back)."""
        with self._lock:
            if self._closed or self.backend._node is None:
                return  # no node known (an ACL token that may not read it): nothing to watch
            self._generation += 1
            self._following = True
            if self._thread is None:
                self._client = self.backend._client_for(self.backend.address)
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f"listing-{self.backend.name}")
                self._thread.start()
        self._wake.set()

    def unfollow(self) -> None:
        """A registration or our own removal begins: a verdict on what was
        there before must not land on what comes."""
        with self._lock:
            self._generation += 1
            self._following = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._following = False
        self._wake.set()
        if self._client is not None:
            self._client.http.session.close()

    def _run(self) -> None:
        watched, baseline, index, pause = -1, 0, 0, RETRY_FIRST
        while True:
            with self._lock:
                if self._closed:
                    return
                generation, following = self._generation, self._following
            if not following:
                self._wake.wait()
                self._wake.clear()
                continue
            if generation != watched:  # a new registration: a new baseline, from the leader
                watched, baseline, index = generation, 0, 0
            try:
                new_index, checks = self._read(index)
            except MemberDown as exc:
                self._gone(generation, f"the agent refuses connections ({exc})")
                continue
            except RegistrarError as exc:
                log.debug("%s: listing watch: %s", self.backend.name, exc)
                self._wake.clear()
                self._wake.wait(pause)
                pause = min(pause * 2, RETRY_MAX)
                continue
            pause = RETRY_FIRST
            if not baseline or new_index >= baseline:
                why = self._unlisted(checks)
                if why:
                    self._gone(generation, why)
                    continue
            changed = bool(baseline) and new_index != index
            if not baseline:
                baseline = new_index
            # An index that went backwards (another server, a snapshot
            # restore) starts the wait over, as Consul's docs ask.
            index = new_index if new_index >= index else baseline
            if changed:
                self._wake.clear()
                self._wake.wait(HOLD_OFF)  # follow() or close() ends it early

    def _read(self, index: int) -> tuple[int, list[dict]]:
        b = self.backend
        return request(b.address, "read the servers' view of our node", lambda: read_node_checks(
            self._client, b._node, b.instance.id, index > 0, b.config.datacenter, index,
            LISTING_WAIT), b._token, b._source, self._client)

    def _unlisted(self, checks: list[dict]) -> str:
        """Why consumers would not list us, by these checks; "" if they would."""
        b = self.backend
        if not any(c.get("ServiceID") == b.instance.id for c in checks):
            return "the servers no longer list it on its node"
        if b.config.health_filter == "passing":
            failing = [f"{c.get('CheckID')} is {c.get('Status')}" for c in checks
                       if c.get("Status") != "passing"]
            if failing:
                return "the servers' ?passing view no longer lists it (" + ", ".join(failing) + ")"
        return ""

    def _gone(self, generation: int, why: str) -> None:
        b = self.backend
        with self._lock:
            if generation != self._generation:
                return  # registered again, or removed by us, meanwhile
            self._following = False
            b.registered = False
        log.warning("%s: %s is not listed as registered: %s; not ready until registered again "
                    "(at the next heartbeat)", b.name, b.instance.id, why,
                    extra={"backend": b.name})
