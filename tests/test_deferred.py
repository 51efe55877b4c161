"""The `registrar` command defers requests' character-set detector
(registrar/_deferred.py): a running agent never loads it, and anything that
does ask for it still gets the real one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from registrar_testing import wait_until
from registrar_testing.agents import Agent, etcd_setup


def _mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_a_running_agent_has_not_loaded_the_detector(etcd_cluster, tmp_path):
    setup = etcd_setup(etcd_cluster, "deferred")
    agent = Agent(tmp_path, "deferred", setup.backend)
    try:
        wait_until(lambda: agent.readyz() == 200 and setup.listed(), 20, "the agent registered")
        maps = _mapped(agent.proc.pid)
        assert "/_ssl." in maps, "requests (urllib3, ssl) is not loaded: the test proves nothing"
        assert "charset_normalizer" not in maps, "the detector's extension is mapped"
    finally:
        agent.terminate()


ASKED = """
import sys
from registrar._deferred import defer_charset_detection
assert defer_charset_detection()
import requests
assert "charset_normalizer.api" not in sys.modules, "loaded at import"
response = requests.models.Response()
response._content = "Grüße aus Köln, schöne Straße".encode("latin-1")
print(response.apparent_encoding)
assert "charset_normalizer.api" in sys.modules
import charset_normalizer
assert charset_normalizer.from_bytes is not None
assert sys.modules["requests.packages.chardet"] is sys.modules["charset_normalizer"]
assert not defer_charset_detection()  # already imported: nothing to do
"""

SUBMODULE_FIRST = """
import sys
from registrar._deferred import defer_charset_detection
assert defer_charset_detection()
import requests
from charset_normalizer.api import from_bytes  # a submodule before anything else
assert str(from_bytes("Grüße".encode("utf-8")).best()) == "Grüße"
import charset_normalizer
assert charset_normalizer.detect("Grüße aus Köln".encode("latin-1"))["encoding"]
"""


def test_the_detector_still_answers_once_asked():
    done = subprocess.run([sys.executable, "-c", ASKED], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "no encoding detected"


def test_a_submodule_imported_first_still_works():
    done = subprocess.run([sys.executable, "-c", SUBMODULE_FIRST], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
