"""The container image, for real: podman runs the image that `./dev image`
(scripts/image.sh) built from the Dockerfile. `registrar run` is PID 1 of a
container on the host network, wrapping a tiny HTTP app, against the
session's real etcd cluster on 127.0.0.1; `podman stop` must take the pod out
of every etcd member before the app sees its SIGTERM. docs/install.md's two
recipes for an app's image are built as written on the image's own base.

Skips when podman or the image is absent, except under CI (CI=true), where
`.ci/run` builds the image first and a missing image is a failure."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from registrar import __version__
from registrar_testing import free_port, wait_until
from registrar_testing.etcd import kv_get_serializable

IMAGE = f"registrar:{__version__}"
# crun fails on this machine's hybrid cgroups; podman's default ulimits exceed the hard limits.
PODMAN_OPTS = ["--runtime", "runc", "--ulimit", "nofile=1024:1024",
               "--ulimit", "nproc=1024:1024"]
POD_IP = "10.20.30.40"  # only the address written into etcd; nothing connects to it

# The wrapped app. On SIGTERM it reads every etcd member's own view of its key
# (the JSON gateway, on loopback: the container shares the host's network) and
# writes what it saw: the wrapper must have removed the key everywhere before
# signalling it. SIGUSR1 (which the wrapper forwards) writes the same record
# while registered: the check that the app's view of etcd is right. It also
# records its parent pid (1: registrar is PID 1) and leaves an orphan that
# only PID 1 can reap.
APP = r'''
import base64, http.server, json, os, signal, sys, threading, time, urllib.request

out, key, endpoints = sys.argv[1], os.environ["APP_KEY"], os.environ["APP_ETCD"].split(",")

def present(endpoint):
    body = json.dumps({"key": base64.b64encode(key.encode()).decode(),
                       "serializable": True}).encode()
    req = urllib.request.Request(endpoint + "/v3/kv/range", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=2) as resp:
        return bool(json.load(resp).get("kvs"))

def record(name):
    seen = {ep: present(ep) for ep in endpoints}
    with open(out + "/" + name + ".tmp", "w") as f:
        json.dump({"present": seen, "ppid": os.getppid()}, f)
    os.rename(out + "/" + name + ".tmp", out + "/" + name + ".json")

def on_sigterm(signum, frame):
    record("sigterm")
    threading.Thread(target=server.shutdown).start()

child = os.fork()
if child == 0:          # the orphan: its parent exits at once, so it is reparented to PID 1
    if os.fork() == 0:
        os._exit(0)
    os._exit(0)
os.waitpid(child, 0)

signal.signal(signal.SIGTERM, on_sigterm)
signal.signal(signal.SIGUSR1, lambda signum, frame: record("sigusr1"))
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["APP_PORT"])),
                                         http.server.SimpleHTTPRequestHandler)
with open(out + "/started", "w") as f:
    f.write(str(os.getppid()))
server.serve_forever()
'''


def podman(*args: str, timeout: float = 60, check: bool = True,
           input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                          check=check, input=input)


@pytest.fixture(scope="module")
def image() -> str:
    """The image's name, once podman and the image are there (see module docstring)."""
    why = None
    if shutil.which("podman") is None:
        why = "podman is not installed"
    elif podman("image", "exists", IMAGE, check=False).returncode != 0:
        why = f"image {IMAGE} is absent"
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}: .ci/run must run ./dev image before the tests")
        pytest.skip(f"{why}: build it with ./dev image")
    return IMAGE


def test_version(image):
    done = podman("run", "--rm", *PODMAN_OPTS, image, "--version")
    assert done.stdout.strip() == f"registrar {__version__}"


def test_runs_as_a_non_root_user(image):
    user = podman("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()
    assert user == "10001:10001"  # numeric: Kubernetes' runAsNonRoot can check it
    done = podman("run", "--rm", *PODMAN_OPTS, "--entrypoint", "id", image)
    assert done.stdout.startswith("uid=10001(registrar) gid=10001(registrar)")


def test_image_holds_no_sources_and_no_pip(image):
    done = podman("run", "--rm", *PODMAN_OPTS, "--entrypoint", "python3", image, "-c",
                  "import importlib.util as u, os, registrar;"
                  "print(registrar.__file__, u.find_spec('pip'), os.path.exists('/src'))")
    path, pip, src = done.stdout.split()
    assert path.startswith("/opt/registrar/lib/") and pip == "None" and src == "False"


def test_run_as_pid1_deregisters_before_the_app_gets_sigterm(image, tmp_path, etcd_cluster):
    service, port = f"image-{uuid.uuid4().hex[:8]}", free_port()
    key = f"services/{service}/{POD_IP}:{port}"
    work = tmp_path / "work"
    work.mkdir()
    work.chmod(0o777)  # the container's uid 10001 writes the app's records here
    (work / "app.py").write_text(APP)
    (work / "agent.yaml").write_text(yaml.safe_dump({
        "service": {"name": service, "port": port},
        "backends": [{"type": "etcd", "endpoints": etcd_cluster.endpoints,
                      "ttl": "5s", "timeout": "1s"}],
        "stop": {"grace_period": "20s", "safety_margin": "1s"},
        "control": {"listen": f"127.0.0.1:{free_port()}"},
    }))  # health: default, registered once the app accepts connections on its port
    name = f"registrar-test-{uuid.uuid4().hex[:8]}"
    env = {"POD_NAME": "image-pod", "POD_IP": POD_IP, "APP_KEY": key, "APP_PORT": str(port),
           "APP_ETCD": ",".join(etcd_cluster.endpoints)}
    argv = ["podman", "run", "--rm", "--name", name, *PODMAN_OPTS, "--network", "host",
            "--read-only",  # as readOnlyRootFilesystem: registrar writes nothing of its own
            "--volume", f"{work}:/work"]
    for k, v in env.items():
        argv += ["--env", f"{k}={v}"]
    argv += [image, "run", "--config", "/work/agent.yaml", "--", "python3", "/work/app.py",
             "/work"]

    def views():
        return [kv_get_serializable(ep, key)[1] for ep in etcd_cluster.endpoints]

    container = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
    try:
        wait_until(lambda: all(views()) or container.poll() is not None, 30,
                   "every etcd member lists the container's app")
        assert container.poll() is None, "the container exited before registering"
        assert (work / "started").read_text() == "1", "the app's parent is not PID 1"
        # The orphan was reparented to registrar (PID 1), which must have reaped it.
        zombies = "grep -l '^State:[[:space:]]*Z' /proc/[0-9]*/status || true"
        wait_until(lambda: podman("exec", name, "sh", "-c", zombies).stdout == "", 10,
                   "no zombie left in the container")
        # Forwarded to the app: its own view of etcd lists it on every member.
        podman("kill", "--signal", "USR1", name)
        wait_until(lambda: (work / "sigusr1.json").exists(), 10, "the app's SIGUSR1 record")
        registered = json.loads((work / "sigusr1.json").read_text())
        assert all(registered["present"].values()), registered
        podman("stop", "--time", "20", name, timeout=30)
        out, err = container.communicate(timeout=30)
    finally:
        podman("rm", "--force", "--ignore", name, check=False)
        if container.poll() is None:
            container.kill()
            container.communicate(timeout=10)
    seen = json.loads((work / "sigterm.json").read_text())
    assert seen["ppid"] == 1
    assert not any(seen["present"].values()), f"the app got SIGTERM while listed: {seen}"
    assert views() == [False] * len(etcd_cluster.endpoints)
    assert container.returncode == 0, err
    assert "deregistered after SIGTERM" in err, err
    assert "Warning" not in err, err  # e.g. tzlocal's, on a base without /etc/localtime


# -- into an app's image: docs/install.md's recipes, as written there ------------------

INSTALL_DOC = Path(__file__).resolve().parent.parent / "docs" / "install.md"
BASE_LABEL = "org.opencontainers.image.base.name"


@pytest.fixture(scope="module")
def base(image) -> str:
    """The base the image was built on, as its label names it: the recipes'
    rule is about that base (./dev image makes it; `docker build` pulls it)."""
    name = podman("image", "inspect", "--format", f'{{{{index .Labels "{BASE_LABEL}"}}}}',
                  image).stdout.strip()
    assert name, f"{image} has no {BASE_LABEL} label: build it again (./dev image)"
    if podman("image", "exists", name, check=False).returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{image}'s base {name} is absent")
        pytest.skip(f"{image}'s base {name} is absent")
    return name


def recipes() -> dict[str, str]:
    """The Containerfiles of docs/install.md: copy the venv, install from the wheels."""
    blocks = re.findall(r"^```dockerfile\n(.*?)^```", INSTALL_DOC.read_text(),
                        re.MULTILINE | re.DOTALL)
    assert len(blocks) == 2, blocks
    copy, wheels = blocks
    assert "COPY --from=registrar:" in copy and "--no-index" in wheels
    return {"copy": copy, "wheels": wheels}


def test_the_image_holds_wheels_for_each_python_it_promises(image):
    names = podman("run", "--rm", *PODMAN_OPTS, "--entrypoint", "ls", image,
                   "/opt/registrar-wheels").stdout.split()
    ours = {n.split("-")[0] for n in names if n.startswith("registrar")}
    assert ours == {"registrar", "registrar_etcd", "registrar_zookeeper", "registrar_consul"}
    assert all(n.endswith(f"-{__version__}-py3-none-any.whl")
               for n in names if n.startswith("registrar"))
    compiled = {n.split("-")[0] for n in names if not n.endswith("-any.whl")}
    assert "msgspec" in compiled
    for dist in compiled:
        tags = {n.split("-")[2] for n in names if n.startswith(f"{dist}-")}
        assert {"cp311", "cp312", "cp313", "cp314"} <= tags, (dist, tags)


@pytest.mark.parametrize("recipe", ["copy", "wheels"])
def test_the_recipe_into_an_app_image_on_the_images_base(image, base, recipe, tmp_path):
    """Built with no network (the wheels recipe needs no index), FROM the
    registrar image's base; then registrar runs in it: --version, and check
    on a config given on standard input (the etcd backend found by its entry
    point)."""
    text = recipes()[recipe]
    lines = text.splitlines()
    froms = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    assert len(froms) == 1, text
    lines[froms[0]] = f"FROM {base}"
    assert f"registrar:{__version__}" in text  # the image under test
    (tmp_path / "Containerfile").write_text("\n".join(lines) + "\n")
    tag = f"localhost/registrar-test-app:{recipe}-{uuid.uuid4().hex[:8]}"
    try:
        built = podman("build", *PODMAN_OPTS, "--network", "none", "--quiet", "--tag", tag,
                       "--file", str(tmp_path / "Containerfile"), str(tmp_path), timeout=300,
                       check=False)
        assert built.returncode == 0, built.stderr
        version = podman("run", "--rm", *PODMAN_OPTS, tag, "registrar", "--version")
        assert version.stdout == f"registrar {__version__}\n"
        config = yaml.safe_dump({"service": {"name": "app", "port": 8080},
                                 "backends": [{"type": "etcd",
                                               "endpoints": ["http://127.0.0.1:2379"]}]})
        check = podman("run", "--rm", "-i", *PODMAN_OPTS, "--env", "POD_NAME=app-0",
                       "--env", f"POD_IP={POD_IP}", tag, "registrar", "check", "-c", "-",
                       input=config, check=False)
        assert check.returncode == 0, check.stderr
        assert check.stderr == f"standard input: valid: app/app-0 at {POD_IP}:8080 on etcd\n"
    finally:
        podman("rmi", "--force", tag, check=False)
