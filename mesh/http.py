"""The one HTTP listener of the mesh (aiohttp, on the process's event loop): the gateway's
public API and every service's ``/metrics`` endpoint are both served by it."""

from __future__ import annotations

import logging

from aiohttp import web

from mesh.telemetry import metrics_response

log = logging.getLogger(__name__)


class HttpListener:
    """Serves ``app`` on ``host:port``; ``port`` is the bound port once started (use 0 for
    a free one).

    Args:
        app: the routes.
        host / port: where to listen. ``SO_REUSEPORT`` is off, so a second process cannot
            silently share the port.
        shutdown_timeout_s: how long requests in flight when it stops get to finish.
        name: what the listener serves, in its start-up log line.
    """

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        *,
        shutdown_timeout_s: float = 0.0,
        name: str = "http",
    ) -> None:
        self.app = app
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
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_port=False)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        log.info("listening", extra={"fields": {"listener": self.name, "http_port": self.port}})

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
