"""A small kubelet for end-to-end tests: starts a pod's containers as real
processes and plays its deletion the way the kubelet does (docs/design.md,
"Kubernetes facts"), recording a timeline on ``time.monotonic()``.

Deletion, per container and all containers in parallel:
  1. the grace timer starts (``grace_period`` = terminationGracePeriodSeconds);
  2. the container's preStop hook runs (``Exec`` or ``HttpGet``), bounded by
     what is left of the grace period;
  3. SIGTERM goes to the container's PID 1 right after its own hook returned
     (at once when it has none; when the hook overran the grace period,
     anyway, with a one-off 2 s extension);
  4. SIGKILL at the end of the grace period (or of the extension) for
     whatever is still running.

A native sidecar (an init container with ``restartPolicy: Always``,
Kubernetes 1.29+; ``Container(native_sidecar=True)``) starts before the
regular containers, which wait until its ``startup_probe`` passes; at the
deletion its preStop hook runs with the others', but its SIGTERM waits
until every regular container has exited (within the same grace period).

``EtcdWatch`` polls every etcd member's own view of a key (serializable
reads) every ~2 ms and records, per member, when it last listed the key and
when it first stopped listing it. CLOCK_MONOTONIC is system-wide on Linux,
so the sample apps' own timestamps (registrar_testing.events) compare with both.
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

#: The kubelet's minimum shutdown window after SIGTERM (and the extension
#: a container gets when its preStop hook overran the grace period).
MIN_GRACE = 2.0
#: How long teardown and reaping may take before we stop waiting.
_REAP_TIMEOUT = 5.0


# -- the pod spec -------------------------------------------------------------

@dataclass(frozen=True)
class Exec:
    """preStop exec: run ``argv`` and wait for it (in the container's
    environment; here on the host, with the container's env). ``delay``
    plays the container runtime's exec start-up (tens to hundreds of ms
    for a real ``runc exec``)."""
    argv: Sequence[str]
    delay: float = 0.0


@dataclass(frozen=True)
class HttpGet:
    """preStop httpGet: the kubelet sends it to the pod IP, not localhost."""
    port: int
    path: str = "/prestop"
    host: str = "127.0.0.1"
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"


@dataclass(frozen=True)
class Container:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    pre_stop: Exec | HttpGet | None = None
    #: Run as PID 1 of a PID namespace of its own (``unshare --pid --fork``),
    #: as in a real container: no default signal actions, orphans to reap.
    pid_namespace: bool = False
    #: An init container with restartPolicy: Always (see the module's docstring).
    native_sidecar: bool = False
    #: httpGet startupProbe: for a native sidecar, the regular containers
    #: start once it answers 2xx (polled every 50 ms, for at most 30 s).
    startup_probe: HttpGet | None = None


def pid_namespaces_available() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True,
                           timeout=10, check=False)
    return probe.returncode == 0


# -- the timeline -------------------------------------------------------------

@dataclass(frozen=True)
class Event:
    t: float  # time.monotonic()
    kind: str
    container: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


class Timeline:
    """Events in the order they were recorded (thread-safe)."""

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._lock = threading.Lock()

    def add(self, kind: str, container: str | None = None, t: float | None = None,
            **detail: Any) -> Event:
        event = Event(time.monotonic() if t is None else t, kind, container, detail)
        with self._lock:
            self._events.append(event)
        return event

    def find(self, kind: str, container: str | None = None) -> list[Event]:
        with self._lock:
            return [e for e in self._events
                    if e.kind == kind and (container is None or e.container == container)]

    def first(self, kind: str, container: str | None = None) -> Event | None:
        found = self.find(kind, container)
        return found[0] if found else None

    def one(self, kind: str, container: str | None = None) -> Event:
        found = self.find(kind, container)
        assert len(found) == 1, f"expected one {kind!r} for {container}, got {found}\n{self}"
        return found[0]

    @property
    def origin(self) -> float:
        """Where relative times count from: the deletion, else the first event."""
        with self._lock:
            events = list(self._events)
        return next((e.t for e in events if e.kind == "delete"),
                    min((e.t for e in events), default=0.0))

    def __str__(self) -> str:
        with self._lock:
            events = sorted(self._events, key=lambda e: e.t)
        if not events:
            return "(no events)"
        origin = self.origin
        lines = []
        for e in events:
            detail = " ".join(f"{k}={_short(v)}" for k, v in e.detail.items())
            lines.append(f"  {1000 * (e.t - origin):+9.1f}ms {e.container or '-':10} "
                         f"{e.kind} {detail}")
        return "\n".join(lines)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= 160 else text[:157] + "..."


# -- the pod ------------------------------------------------------------------

class _Running:
    """One started container."""

    def __init__(self, spec: Container, popen: subprocess.Popen, log_path: Path):
        self.spec = spec
        self.popen = popen
        self.log_path = log_path
        self.pid1 = popen.pid  # the process the kubelet signals (inside unshare when namespaced)
        self.exited = threading.Event()
        self.status: int | None = None  # as the kubelet reports it: 128+n when killed by n
        self.hook: subprocess.Popen | None = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class Pod:
    """Containers started together, deleted the kubelet's way.

    ``env`` is the pod-wide environment (POD_NAME, POD_IP, as the Downward
    API gives them); each container's output goes to ``workdir/<name>.log``.
    Use as a context manager: leaving it SIGKILLs whatever is left.
    """

    def __init__(self, name: str, containers: Sequence[Container], workdir: Path,
                 grace_period: float = 30.0, env: Mapping[str, str] | None = None):
        self.name = name
        self.specs = list(containers)
        self.workdir = Path(workdir)
        self.grace_period = grace_period
        self.env = {"POD_NAME": name, **(env or {})}
        self.timeline = Timeline()
        self.containers: dict[str, _Running] = {}
        self.watchers: list[EtcdWatch] = []
        self.deleted_at: float | None = None
        self.kill_at: dict[str, float] = {}  # when the kubelet SIGKILLs (or would have)

    # -- starting --------------------------------------------------------------

    def start(self) -> Pod:
        self.workdir.mkdir(parents=True, exist_ok=True)
        sidecars = [s for s in self.specs if s.native_sidecar]
        for spec in sidecars:  # in order, each once started, as init containers are
            self._start(spec)
            if spec.startup_probe is not None:
                self._wait_started(spec)
        for spec in self.specs:
            if not spec.native_sidecar:
                self._start(spec)
        return self

    def _wait_started(self, spec: Container, timeout: float = 30.0) -> None:
        probe = spec.startup_probe
        end = time.monotonic() + timeout
        while time.monotonic() < end and not self.containers[spec.name].exited.is_set():
            request = urllib.request.Request(probe.url, headers=dict(probe.headers))
            try:
                with urllib.request.urlopen(request, timeout=1) as resp:
                    if 200 <= resp.status < 400:
                        self.timeline.add("started", spec.name)
                        return
            except OSError:  # not listening yet, or an HTTP error status
                pass
            time.sleep(0.05)
        raise AssertionError(f"{spec.name}: its startupProbe {probe.url} never passed\n"
                             f"{self.logs()}")

    def _start(self, spec: Container) -> None:
        env = {**os.environ, **self.env, **spec.env, "PYTHONUNBUFFERED": "1"}
        argv = list(spec.argv)
        if spec.pid_namespace:
            argv = ["unshare", "--pid", "--fork", "--kill-child", "--", *argv]
        log_path = self.workdir / f"{spec.name}.log"
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        running = _Running(spec, popen, log_path)
        self.containers[spec.name] = running
        self.timeline.add("start", spec.name, pid=popen.pid)
        if spec.pid_namespace:
            running.pid1 = _wait_child(popen.pid)
        threading.Thread(target=self._wait_exit, args=(running,), daemon=True,
                         name=f"exit-{spec.name}").start()

    def _wait_exit(self, c: _Running) -> None:
        code = c.popen.wait()
        c.status = 128 - code if code < 0 else code
        self.timeline.add("exit", c.spec.name, status=c.status)
        c.exited.set()

    def __getitem__(self, name: str) -> _Running:
        return self.containers[name]

    def watch(self, watcher: EtcdWatch) -> EtcdWatch:
        """Attach a registry watcher: it polls fast from the deletion on."""
        self.watchers.append(watcher.start())
        return watcher

    def wait_ready(self, predicate: Callable[[], Any], timeout: float, what: str) -> None:
        """Poll ``predicate`` (/readyz answers 200, the registry lists the pod)
        until true; fail early when a container died."""
        end = time.monotonic() + timeout
        while True:
            try:
                if predicate():
                    self.timeline.add("ready", detail=what)
                    return
            except Exception:  # noqa: BLE001 - not ready yet
                pass
            dead = [n for n, c in self.containers.items() if c.exited.is_set()]
            if dead or time.monotonic() > end:
                why = f"{dead} exited" if dead else f"not within {timeout}s"
                raise AssertionError(f"pod {self.name} never ready ({what}): {why}\n{self.logs()}")
            time.sleep(0.02)

    # -- deleting --------------------------------------------------------------

    def delete(self) -> Timeline:
        """Play the deletion; return when every container has exited (or was
        SIGKILLed at the end of its grace period)."""
        self.deleted_at = self.timeline.add("delete", grace_period=self.grace_period).t
        for w in self.watchers:
            w.fast()
        deadline = self.deleted_at + self.grace_period
        threads = [threading.Thread(target=self._stop, args=(c, deadline), daemon=True,
                                    name=f"stop-{name}")
                   for name, c in self.containers.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.grace_period + MIN_GRACE + _REAP_TIMEOUT + 1)
        return self.timeline

    def _stop(self, c: _Running, deadline: float) -> None:
        name = c.spec.name
        if c.exited.is_set():
            return
        hook = c.spec.pre_stop
        if hook is not None:
            self._run_hook(c, hook, deadline)
        if c.spec.native_sidecar:  # its SIGTERM once the regular containers have gone
            for other in self.containers.values():
                if not other.spec.native_sidecar:
                    other.exited.wait(max(deadline - time.monotonic(), 0))
        now = time.monotonic()
        if now >= deadline:
            self.timeline.add("grace_extended", name, seconds=MIN_GRACE)
        kill_at = now + max(deadline - now, MIN_GRACE)
        self.kill_at[name] = kill_at
        if not c.exited.is_set():
            self.signal(name, signal.SIGTERM)
        if not c.exited.wait(max(kill_at - time.monotonic(), 0)):
            self.signal(name, signal.SIGKILL)
            c.exited.wait(_REAP_TIMEOUT)

    def _run_hook(self, c: _Running, hook: Exec | HttpGet, deadline: float) -> None:
        name = c.spec.name
        timeout = max(deadline - time.monotonic(), 0)
        if isinstance(hook, Exec):
            start = self.timeline.add("hook_start", name, exec=" ".join(hook.argv)).t
            env = {**os.environ, **self.env, **c.spec.env}
            time.sleep(min(hook.delay, timeout))
            timeout = max(deadline - time.monotonic(), 0)
            c.hook = subprocess.Popen(list(hook.argv), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      env=env, text=True, start_new_session=True)
            try:
                out, _ = c.hook.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                # The kubelet stops waiting but leaves the hook running.
                self.timeline.add("hook_timeout", name, seconds=time.monotonic() - start)
                return
            self.timeline.add("hook_end", name, exit_code=c.hook.returncode,
                              output=out.strip(), seconds=time.monotonic() - start)
            return
        start = self.timeline.add("hook_start", name, http=hook.url).t
        request = urllib.request.Request(hook.url, headers=dict(hook.headers))
        try:
            with urllib.request.urlopen(request, timeout=max(timeout, 0.001)) as resp:
                status, body = resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read().decode(errors="replace")
        except OSError as exc:  # URLError wraps a connect timeout, a read timeout is bare
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError):
                self.timeline.add("hook_timeout", name, seconds=time.monotonic() - start)
                return
            status, body = None, f"error: {reason}"
        self.timeline.add("hook_end", name, status=status, output=body.strip(),
                          seconds=time.monotonic() - start)

    def signal(self, name: str, sig: int) -> None:
        """Signal the container's PID 1, as the container runtime does."""
        c = self.containers[name]
        self.timeline.add(signal.Signals(sig).name, name)
        try:
            os.kill(c.pid1, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            _kill_tree(c.popen.pid)

    # -- inspecting and tearing down --------------------------------------------

    def exited(self, name: str) -> Event:
        return self.timeline.one("exit", name)

    def logs(self) -> str:
        return "\n".join(f"--- {n} ---\n{c.log()}" for n, c in self.containers.items())

    def report(self) -> str:
        """The timeline, every watcher and every container's output: what an
        assertion message should show."""
        parts = [f"timeline of pod {self.name} (ms from its deletion, else its start):",
                 str(self.timeline)]
        origin = self.timeline.origin
        parts += [w.describe(origin) for w in self.watchers]
        parts.append(self.logs())
        return "\n".join(parts)

    def kill(self) -> None:
        """SIGKILL and reap everything: containers, hooks, watchers."""
        for c in self.containers.values():
            for proc in (c.hook, c.popen):
                if proc is not None and proc.poll() is None:
                    _kill_tree(proc.pid)
        for c in self.containers.values():
            for proc in (c.hook, c.popen):
                if proc is not None:
                    try:
                        proc.wait(_REAP_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        pass
        for w in self.watchers:
            w.stop()

    def __enter__(self) -> Pod:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.kill()


def _wait_child(pid: int, timeout: float = 5.0) -> int:
    """The first child of ``pid`` (unshare's forked PID 1)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        kids = children(pid)
        if kids:
            return kids[0]
        time.sleep(0.002)
    raise RuntimeError(f"process {pid} never started its child")


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (a container runtime kills
    the whole cgroup; the app of a wrapper runs in a process group of its
    own)."""
    pending, seen = [pid], []
    while pending:  # collect first: a killed parent's children are reparented
        p = pending.pop()
        seen.append(p)
        pending += children(p)
    for p in seen:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def children(pid: int) -> list[int]:
    """The children of ``pid`` (every thread's), from /proc."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            continue
    return out


def process_state(pid: int) -> str | None:
    """The one-letter state of a process (R, S, Z...), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


# -- what the registry shows ----------------------------------------------------

@dataclass
class MemberView:
    """What one member showed of the key, over time."""
    endpoint: str
    first_listed: float | None = None  # response received
    last_listed_sent: float | None = None  # request sent (it was still listed then or later)
    gone_at: float | None = None  # response received: no longer listed
    relisted: int = 0  # listed again after it was gone
    polls: int = 0
    errors: int = 0
    last_error: str | None = None


class EtcdWatch:
    """Per etcd member, a thread that reads the member's own view of ``key``
    (a serializable range, on a kept-alive connection) every ``interval``
    seconds once fast() was called (every ``idle_interval`` before)."""

    def __init__(self, endpoints: Sequence[str], key: str, interval: float = 0.002,
                 idle_interval: float = 0.02, timeout: float = 0.5):
        self.key = key
        self.members = [MemberView(ep) for ep in endpoints]
        self.interval = interval
        self.idle_interval = idle_interval
        self.timeout = timeout
        self._fast = threading.Event()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._body = json.dumps({"key": base64.b64encode(key.encode()).decode(),
                                 "serializable": True, "keys_only": True})

    def start(self) -> EtcdWatch:
        if not self._threads:
            self._threads = [threading.Thread(target=self._poll, args=(m,), daemon=True,
                                              name=f"watch-{m.endpoint}") for m in self.members]
            for t in self._threads:
                t.start()
        return self

    def fast(self) -> None:
        self._fast.set()

    def stop(self) -> None:
        self._stopped.set()
        for t in self._threads:
            t.join(self.timeout + 1)

    def _poll(self, m: MemberView) -> None:
        parts = urlsplit(m.endpoint)
        conn: http.client.HTTPConnection | None = None
        while not self._stopped.is_set():
            sent = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(parts.hostname, parts.port,
                                                      timeout=self.timeout)
                conn.request("POST", "/v3/kv/range", self._body,
                             {"Content-Type": "application/json"})
                listed = bool(json.loads(conn.getresponse().read()).get("kvs"))
            except (OSError, ValueError, http.client.HTTPException) as exc:
                m.errors += 1
                m.last_error = repr(exc)
                if conn is not None:
                    conn.close()
                conn = None
            else:
                received = time.monotonic()
                m.polls += 1
                if listed:
                    if m.first_listed is None:
                        m.first_listed = received
                    elif m.gone_at is not None:
                        m.relisted += 1
                    m.last_listed_sent = sent
                elif m.first_listed is not None and m.gone_at is None:
                    m.gone_at = received
            self._stopped.wait(self.interval if self._fast.is_set() else self.idle_interval)
        if conn is not None:
            conn.close()

    # -- questions ------------------------------------------------------------

    def listed_everywhere(self) -> bool:
        return all(m.first_listed is not None and m.gone_at is None for m in self.members)

    def gone_everywhere(self) -> bool:
        return all(m.gone_at is not None for m in self.members)

    @property
    def gone_at(self) -> float | None:
        """When the last member was seen no longer listing the key."""
        if not self.gone_everywhere():
            return None
        return max(m.gone_at for m in self.members)  # type: ignore[type-var]

    @property
    def last_listed_sent(self) -> float | None:
        """The latest moment some member was asked and still listed the key."""
        times = [m.last_listed_sent for m in self.members if m.last_listed_sent is not None]
        return max(times) if times else None

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                raise AssertionError(f"timed out after {timeout}s waiting until {what}\n"
                                     f"{self.describe()}")
            time.sleep(0.005)

    def describe(self, origin: float = 0.0) -> str:
        def rel(t: float | None) -> str:
            return "never" if t is None else f"{1000 * (t - origin):+.1f}ms"

        lines = [f"etcd watch of {self.key}:"]
        for m in self.members:
            lines.append(f"  {m.endpoint}: listed {rel(m.first_listed)}, last listed (sent) "
                         f"{rel(m.last_listed_sent)}, gone {rel(m.gone_at)}, relisted "
                         f"{m.relisted}, {m.polls} polls, {m.errors} errors"
                         + (f" ({m.last_error})" if m.last_error else ""))
        return "\n".join(lines)


# -- the sample apps' events ----------------------------------------------------

def read_events(path: Path) -> list[dict[str, Any]]:
    """The JSON-lines events a sample app (registrar_testing.events) recorded."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def app_event(path: Path, name: str) -> dict[str, Any] | None:
    return next((e for e in read_events(path) if e["event"] == name), None)
