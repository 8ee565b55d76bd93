"""The one HTTP listener of the mesh (aiohttp, on the process's event loop): the gateway's
public API and every service's ``/metrics`` endpoint are both served by it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from prometheus_client import Counter

from mesh.telemetry import metrics_response

log = logging.getLogger(__name__)

REFUSED = Counter(
    "recmesh_http_refused_total",
    "Requests an HTTP listener refused before any route saw them (400: a request line or "
    "header over its limit, too many headers, not HTTP), by listener and parser error",
    ["listener", "error"],
)


class _ClientErrors(logging.Filter):
    """aiohttp logs every request its parser refuses with a traceback at ERROR level. A
    client decides how many of those there are, so each becomes one WARNING line without
    a traceback, and is counted in ``recmesh_http_refused_total``."""

    def __init__(self, listener: str) -> None:
        super().__init__()
        self._listener = listener

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, BadHttpMessage):
            REFUSED.labels(self._listener, type(error).__name__).inc()
            record.msg = f"refused a malformed request: {error.message}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class HttpListener:
    """Serves ``app`` on ``host:port``; ``port`` is the bound port once started (use 0 for
    a free one).

    Args:
        app: the routes.
        host / port: where to listen. ``SO_REUSEPORT`` is off, so a second process cannot
            silently share the port.
        shutdown_timeout_s: how long requests in flight when it stops get to finish.
        name: what the listener serves, in its start-up log line.
        limits: options of aiohttp's request handler that bound what a client may send
            and how slowly (``max_line_size``, ``max_field_size``, ``max_headers``,
            ``keepalive_timeout``, ``lingering_time``); aiohttp's defaults otherwise.
    """

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        *,
        shutdown_timeout_s: float = 0.0,
        name: str = "http",
        limits: Mapping[str, Any] | None = None,
    ) -> None:
        self.app = app
        self.limits = dict(limits or {})
        self.host = host
        self.port = port
        self.shutdown_timeout_s = shutdown_timeout_s
        self.name = name
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Bind and serve; set ``port`` to the bound port."""
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.shutdown_timeout_s,
            logger=self._logger(),
            **self.limits,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_port=False)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        log.info("listening", extra={"fields": {"listener": self.name, "http_port": self.port}})

    def _logger(self) -> logging.Logger:
        """The logger of aiohttp's protocol for this listener (see :class:`_ClientErrors`)."""
        logger = logging.getLogger(f"{__name__}.{self.name}")
        if not any(isinstance(f, _ClientErrors) for f in logger.filters):
            logger.addFilter(_ClientErrors(self.name))
        return logger

    async def stop(self) -> None:
        """Stop listening, close idle connections, give requests in flight up to
        ``shutdown_timeout_s`` to finish (their connections close after the response),
        then cancel what is left."""
        if self._runner is not None:
            await self._runner.cleanup()


def metrics_listener(host: str, port: int) -> HttpListener:
    """``GET /metrics`` (the default Prometheus registry) on its own port."""

    async def metrics(request: web.Request) -> web.Response:
        return metrics_response(request.headers.get("Accept", ""))

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return HttpListener(app, host, port, name="metrics")
