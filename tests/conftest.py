"""The real-server fixtures come from the testing kit (testing/)."""
from __future__ import annotations

import pytest

pytest_plugins = ["registrar_testing.fixtures"]


@pytest.fixture(autouse=True)
def _restore_logging():
    """In-process CLI runs install a root handler on the test's captured
    stderr; background threads (a kazoo client closing) must not log into
    it once the test is over."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
