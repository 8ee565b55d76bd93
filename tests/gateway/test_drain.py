"""SIGTERM drain of the HTTP API: keep answering with ``Connection: close``, then stop
listening and let requests in flight finish."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from mesh.http import HttpListener
from tests.inprocess import Mesh, inprocess_mesh, write_tenants

DEMO = {"x-api-key": "demo-key"}


@pytest.fixture
async def mesh(redis_url: str, artifacts_root: Path, tmp_path: Path) -> AsyncIterator[Mesh]:
    """A mesh of its own: the test stops its gateway."""
    async with inprocess_mesh(
        redis_url, artifacts_root, write_tenants(tmp_path / "tenants.json")
    ) as running:
        yield running


async def recommend(session: aiohttp.ClientSession, mesh: Mesh) -> tuple[int, str]:
    """Status and ``Connection`` header of one recommendation."""
    async with session.post(
        mesh.http_url + "/v1/recommend", json={"user_id": "u1"}, headers=DEMO
    ) as response:
        await response.read()
        return response.status, response.headers.get("Connection", "").lower()


async def test_draining_gateway_answers_with_connection_close_until_it_stops(mesh: Mesh) -> None:
    gateway = mesh.servers["gateway"]
    draining, release = asyncio.Event(), asyncio.Event()

    async def hold_the_drain_open() -> None:
        draining.set()
        await release.wait()

    gateway.service.drains.append(hold_the_drain_open)  # after the gateway's own hook
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        assert await recommend(session, mesh) == (200, "")  # HTTP/1.1: keep-alive
        stopping = asyncio.create_task(gateway.stop())
        try:
            await draining.wait()
            # Sent on the keep-alive connection opened before the drain: still answered.
            assert await recommend(session, mesh) == (200, "close")
            async with session.get(mesh.http_url + "/healthz") as response:
                assert response.status == 503
                assert (await response.json())["draining"] is True
                assert response.headers["Connection"] == "close"
        finally:
            release.set()
            await stopping
        with pytest.raises(aiohttp.ClientConnectorError):
            await recommend(session, mesh)


def slow_app(entered: asyncio.Event, release: asyncio.Event) -> web.Application:
    """``/slow`` answers once ``release`` is set; ``/fast`` at once."""

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.Response(text="done")

    async def fast(request: web.Request) -> web.Response:
        return web.Response(text="fast")

    app = web.Application()
    app.add_routes([web.get("/slow", slow), web.get("/fast", fast)])
    return app


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as response:
        return response.status, await response.text()


async def test_stopping_listener_lets_the_request_in_flight_finish() -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    listener = HttpListener(slow_app(entered, release), "127.0.0.1", 0, shutdown_timeout_s=30)
    await listener.start()
    url = f"http://127.0.0.1:{listener.port}"
    async with (
        aiohttp.ClientSession() as session,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as probe,
    ):
        in_flight = asyncio.create_task(get(session, url + "/slow"))
        await entered.wait()
        stopping = asyncio.create_task(listener.stop())
        async with asyncio.timeout(10):
            while True:  # until the listener no longer takes new connections
                try:
                    await get(probe, url + "/fast")
                except aiohttp.ClientConnectionError:
                    break
                await asyncio.sleep(0.01)
        assert not stopping.done()
        release.set()
        assert await in_flight == (200, "done")
        await stopping


async def test_stopping_listener_cancels_requests_after_the_shutdown_timeout() -> None:
    entered, never = asyncio.Event(), asyncio.Event()
    listener = HttpListener(slow_app(entered, never), "127.0.0.1", 0, shutdown_timeout_s=0.05)
    await listener.start()
    async with aiohttp.ClientSession() as session:
        in_flight = asyncio.create_task(get(session, f"http://127.0.0.1:{listener.port}/slow"))
        await entered.wait()
        await asyncio.wait_for(listener.stop(), timeout=10)  # aiohttp's default is 60 s
        with pytest.raises(aiohttp.ClientConnectionError):
            await in_flight
