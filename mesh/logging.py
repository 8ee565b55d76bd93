"""Structured JSON logs: one object per line with service, tenant, request id, and the
trace and span ids of the current span (when tracing is on), so a line links to its trace."""

from __future__ import annotations

import json
import logging
import sys
import time

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


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send every logger's records to stderr as JSON lines tagged with ``service``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
