"""Structured JSON logs: one object per line with service, tenant, request id, and the
trace and span ids of the current span (when tracing is on), so a line links to its trace.

Repeats are throttled (:class:`RepeatThrottle`): when a dependency fails, every request
logs the same warning, and formatting and writing thousands of identical lines a second
would take the CPU the requests need, degrading more of them.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable

from mesh.context import request_id_var, tenant_var
from mesh.tracing import current_ids


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line; extra ``fields`` in the record are merged in."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if tenant := tenant_var.get():
            entry["tenant"] = tenant
        if request_id := request_id_var.get():
            entry["request_id"] = request_id
        if ids := current_ids():
            entry["trace_id"], entry["span_id"] = ids
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class RepeatThrottle(logging.Filter):
    """Lets at most ``burst`` records of one message template through per ``window_s``.

    A template is the logger, level and unformatted message (``"quota unavailable: %s"``),
    so the same failure with different details counts as one. Records at ERROR and above
    always pass. The first record let through after some were dropped carries their count
    in its ``suppressed`` field, so no occurrence goes unaccounted.
    """

    def __init__(
        self, burst: int = 5, window_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._burst = burst
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[tuple[str, int, str], tuple[float, int, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        with self._lock:
            start, passed, dropped = self._windows.get(key, (now, 0, 0))
            if now - start >= self._window_s:
                start, passed = now, 0
            if passed >= self._burst:
                self._windows[key] = (start, passed, dropped + 1)
                return False
            self._windows[key] = (start, passed + 1, 0)
        if dropped:
            fields = getattr(record, "fields", None)
            record.fields = {**(fields if isinstance(fields, dict) else {}), "suppressed": dropped}
        return True


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send every logger's records to stderr as JSON lines tagged with ``service``, with
    repeats throttled (:class:`RepeatThrottle`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    handler.addFilter(RepeatThrottle())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
