"""Daemon threads with a Future: what the core runs backend calls in."""
from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


def spawn(fn: Callable[..., Any], *args: Any, name: str) -> Future:
    """Run fn in a daemon thread: a call stuck on a dead registry must never
    keep the process from exiting before SIGKILL."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiter
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def settled(future: Future, timeout: float) -> bool:
    """Whether the future finished (result or exception) within timeout."""
    try:
        future.exception(timeout=max(timeout, 0))
        return True
    except TimeoutError:
        return False
