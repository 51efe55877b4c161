"""The library examples of docs/library.md run as written, against a real etcd.

Every code block of the page whose first line names a file (``# app.py``,
``# /etc/registrar/agent.yaml``) is written to a temp dir, and each example
is started with its command from the page's ``sh`` blocks, as a user would
paste it. The only edits, in every file and command alike: ``0.0.0.0`` ->
``127.0.0.1`` (tests listen on loopback only), ``8080`` -> a free port, and
the config's absolute path -> the temp dir's copy. The etcd endpoints reach
the page's config through ``$ETCD_ENDPOINTS``, as the page says. Then, like
the kubelet: wait until every etcd member lists the instance and the app
answers, send SIGTERM, and check that the entry is gone, that the process
exited on its own, and that it logged the stop.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import sys
import urllib.request
from pathlib import Path

import pytest

from registrar_testing import free_port, wait_until
from registrar_testing.etcd import kv_get_serializable
from registrar_testing.process import ServerProcess

PAGE = Path(__file__).resolve().parent.parent / "docs" / "library.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
FILE_NAME = re.compile(r"#\s*(\S+\.(?:py|yaml))\s*$")

# (id, how its command line starts, the exit status after SIGTERM). Servers
# without a SIGTERM handler of their own (http.server, waitress) get the
# default action once registrar handed the signal on; uvicorn re-raises the
# SIGTERM it caught once its graceful shutdown is done; gunicorn's master
# exits 0.
EXAMPLES = [
    ("stdlib", "python hello.py", -signal.SIGTERM),
    ("flask-waitress", "python app.py", -signal.SIGTERM),
    ("flask-gunicorn", "gunicorn ", 0),
    ("fastapi-uvicorn", "uvicorn ", -signal.SIGTERM),
]


def library_section() -> str:
    """The page: it is the library's section of the docs."""
    return PAGE.read_text()


def files_and_commands(section: str) -> tuple[dict[str, str], list[str]]:
    """The section's named files ({name as written: text}) and the command
    lines of its sh blocks."""
    files, commands = {}, []
    for lang, body in FENCE.findall(section):
        first = body.split("\n", 1)[0]
        if lang in ("sh", "shell", "bash", "console"):
            commands += [line.strip() for line in body.splitlines()
                         if line.strip() and not line.lstrip().startswith("#")]
        elif match := FILE_NAME.fullmatch(first):
            assert match[1] not in files, f"{PAGE.name}: two blocks are named {match[1]}"
            files[match[1]] = body
    return files, commands


def test_the_section_has_every_tested_example():
    """Catches an example (or its command) dropped or renamed in the page,
    which would otherwise only shrink what the test below runs."""
    files, commands = files_and_commands(library_section())
    assert "/etc/registrar/agent.yaml" in files, sorted(files)
    for name, prefix, _ in EXAMPLES:
        assert any(c.startswith(prefix) for c in commands), f"{name}: no {prefix!r}: {commands}"


@pytest.mark.parametrize("name,prefix,status", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_registers_and_leaves_on_sigterm(name, prefix, status, tmp_path, etcd_cluster):
    files, commands = files_and_commands(library_section())
    command = next((c for c in commands if c.startswith(prefix)), None)
    if command is None:
        pytest.fail(f"{PAGE.name} has no command starting with {prefix!r}")
    port = free_port()
    edits = {"0.0.0.0": "127.0.0.1", "8080": str(port)}
    edits.update({path: str(tmp_path / Path(path).name)
                  for path in files if os.path.isabs(path)})

    def edit(text: str) -> str:
        for old, new in edits.items():
            text = text.replace(old, new)
        return text

    for path, text in files.items():
        (tmp_path / Path(path).name).write_text(edit(text))
    venv_bin = os.path.dirname(sys.executable)  # `python`, `gunicorn`, `uvicorn` as typed
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
           "ETCD_ENDPOINTS": ",".join(etcd_cluster.endpoints),
           "POD_NAME": f"readme-{name}", "POD_IP": "127.0.0.1", "PYTHONUNBUFFERED": "1",
           "XDG_RUNTIME_DIR": str(tmp_path)}  # gunicorn's control socket, else in ~/.gunicorn
    key = f"services/web/127.0.0.1:{port}"
    app = ServerProcess(name, shlex.split(edit(command)), tmp_path, env=env)
    app.start()
    try:
        def listed() -> list[bool]:
            return [kv_get_serializable(ep, key)[1] for ep in etcd_cluster.endpoints]

        wait_until(lambda: all(listed()) or not app.running, 15, "every etcd member lists it")
        assert app.running, f"{command} exited: {app.proc.returncode}\n{app.log_tail()}"
        try:
            wait_until(lambda: answers(port) or not app.running, 15, "the app answers")
        except TimeoutError as exc:
            pytest.fail(f"{exc}\n{app.log_tail()}")
        assert app.running, f"{command} exited: {app.proc.returncode}\n{app.log_tail()}"
        app.proc.send_signal(signal.SIGTERM)
        returncode = app.proc.wait(timeout=15)
        log = app.log_path.read_text(errors="replace")
        assert not any(listed()), f"still listed after the app exited: {listed()}\n{log}"
        assert returncode == status, f"exit status {returncode}, expected {status}\n{log}"
        assert "registered web as 127.0.0.1:" in log, log
        assert "stopping after SIGTERM" in log, log
        assert re.search(r"deregistered after SIGTERM .*confirmed 3/3", log), log
        assert "Traceback" not in log, log
    finally:
        try:
            os.killpg(app.pid, signal.SIGKILL)  # gunicorn's workers too, on a failure
        except ProcessLookupError:
            pass
        app.kill()


def answers(port: int) -> bool:
    """The app's GET / is 200 with the examples' greeting (FastAPI's in JSON)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as resp:
            return resp.status == 200 and resp.read().startswith((b"hello", b'"hello'))
    except OSError:
        return False
