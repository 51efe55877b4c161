"""Logging set-up for the command line: text or one JSON object a line."""
from __future__ import annotations

import json
import logging
import sys
import threading
import time
import warnings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Quiet:
    """Warnings that anyone who reaches a port can cause (refused tokens,
    bad requests, failed handshakes): each kind logged the first time, then
    at most once an ``interval``, saying how many were left out meanwhile."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0):
        self.logger = logger
        self.interval = interval
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}
        self._hidden: dict[str, int] = {}

    def warn(self, kind: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(kind, 0.0):
                self._hidden[kind] = self._hidden.get(kind, 0) + 1
                return
            hidden = self._hidden.pop(kind, 0)
            self._next[kind] = now + self.interval
        more = f" ({hidden} more since the last such line)" if hidden else ""
        self.logger.warning("%s%s", message, more)


class TextFormatter(logging.Formatter):
    """``2026-11-26T19:52:56.682+00:00 INFO logger: message``: local time
    with its UTC offset (logging's default asctime has no zone, so lines
    from pods in different zones, or around a DST change, cannot be put in
    order)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        offset = time.strftime("%z", time.localtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}{offset[:3]}:{offset[3:]}"


#: What every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message",
                                                                               "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg (+ exc), and the
    structured fields the call passed with ``extra=`` (backend, observer,
    trigger, seconds...), so a log pipeline can filter on them."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # APScheduler logs every job run at INFO; keep it to problems.
    logging.getLogger("apscheduler").setLevel(max(root.level, logging.WARNING))
    # Warnings go through the log (one line, JSON too), not raw to stderr;
    # urllib3's for every request made with tls.verify: false, once per host.
    warnings.showwarning = _show_warning
    warnings.filterwarnings("once", message="Unverified HTTPS request")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    logging.getLogger("py.warnings").warning("%s: %s", category.__name__,
                                             str(message).split(". ", 1)[0])
