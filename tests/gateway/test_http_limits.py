"""What a client may send the gateway and how slowly (docs/security.md, "Abuse: limits and
a noisy tenant"): header limits, slow headers (slowloris) and slow bodies, gRPC metadata.

The gateway runs in the in-process mesh with small limits and timeouts, so a test waits
about a second, not the defaults' ten."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY
from recmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from mesh.client import open_channel
from tests.inprocess import Mesh, inprocess_mesh, write_tenants

HEAD_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 0.5
LIMITS = {
    "http_head_timeout_s": HEAD_TIMEOUT_S,
    "http_body_timeout_s": BODY_TIMEOUT_S,
    "http_linger_s": 0.2,
    "http_max_field_bytes": 1024,
    "http_max_line_bytes": 1024,
    "http_max_headers": 20,
    "grpc_max_metadata_bytes": 2048,
}


@pytest.fixture(scope="module")
async def mesh(
    redis_url: str, artifacts_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mesh]:
    tenants = write_tenants(tmp_path_factory.mktemp("limits") / "tenants.json")
    async with inprocess_mesh(
        redis_url, artifacts_root, tenants, gateway_overrides=LIMITS
    ) as running:
        yield running


async def answer_of(reader: asyncio.StreamReader) -> bytes:
    """One HTTP answer (head and ``Content-Length`` body) read from ``reader``."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await asyncio.wait_for(reader.readexactly(length), 5.0)


async def closed(reader: asyncio.StreamReader, timeout_s: float) -> bool:
    """Whether the gateway closed the connection (end of stream or reset) within
    ``timeout_s`` without sending anything more."""
    try:
        rest = await asyncio.wait_for(reader.read(), timeout_s)
    except ConnectionResetError:
        return True
    return rest == b""


async def exchange(mesh: Mesh, raw: bytes) -> bytes:
    """Send ``raw`` on a new connection; the answer, after checking the gateway closed it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.http.port)
    writer.write(raw)
    await writer.drain()
    answer = await answer_of(reader)
    assert await closed(reader, 5.0)
    writer.close()
    return answer


def status(answer: bytes) -> int:
    """The status code of an answer (HTTP/1.0 or 1.1: a head aiohttp could not parse is
    answered in 1.0)."""
    return int(answer.split(b" ", 2)[1])


def refused(error: str) -> float:
    labels = {"listener": "api", "error": error}
    return REGISTRY.get_sample_value("recmesh_http_refused_total", labels) or 0.0


async def served(mesh: Mesh) -> int:
    """The status of a request on a connection of its own (the API keeps serving)."""
    answer = await exchange(
        mesh, b"GET /openapi.json HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    return status(answer)


async def test_an_oversized_header_is_refused_400_and_its_connection_closed(mesh: Mesh) -> None:
    before = refused("LineTooLong")
    head = b"GET /openapi.json HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n"
    assert status(await exchange(mesh, head)) == 400
    assert refused("LineTooLong") == before + 1  # one warning line, counted; no traceback
    long_line = b"GET /openapi.json?" + b"q" * 2000 + b" HTTP/1.1\r\nHost: t\r\n\r\n"
    assert status(await exchange(mesh, long_line)) == 400
    assert await served(mesh) == 200


async def test_too_many_headers_are_refused_400(mesh: Mesh) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(30))
    answer = await exchange(mesh, b"GET /openapi.json HTTP/1.1\r\nHost: t\r\n" + headers + b"\r\n")
    assert status(answer) == 400
    assert await served(mesh) == 200


async def test_a_slowloris_client_is_disconnected_while_others_are_served(mesh: Mesh) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.http.port)
    started = time.monotonic()
    writer.write(b"POST /v1/recommend HTTP/1.1\r\nHost: t\r\nX-Slow: ")

    async def trickle() -> None:
        # One byte of a header that never ends, every 100 ms, until the gateway hangs up.
        with contextlib.suppress(ConnectionError):
            while not writer.is_closing():
                await asyncio.sleep(0.1)
                writer.write(b"a")
                await writer.drain()

    sending = asyncio.create_task(trickle())
    statuses = [await served(mesh) for _ in range(3)]  # meanwhile, other connections
    hung_up = await closed(reader, HEAD_TIMEOUT_S + 3.0)  # without an answer
    elapsed = time.monotonic() - started
    sending.cancel()
    writer.close()
    assert statuses == [200, 200, 200]
    assert hung_up
    assert HEAD_TIMEOUT_S * 0.9 <= elapsed < HEAD_TIMEOUT_S + 1.0


async def test_a_slow_body_is_answered_408_and_its_connection_closed(mesh: Mesh) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mesh.http.port)
    started = time.monotonic()
    writer.write(
        b"POST /v1/recommend HTTP/1.1\r\nHost: t\r\nx-api-key: demo-key\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            while not writer.is_closing():
                await asyncio.sleep(0.1)
                writer.write(b" ")
                await writer.drain()

    sending = asyncio.create_task(trickle())
    answer = await answer_of(reader)
    answered = time.monotonic() - started
    hung_up = await closed(reader, 3.0)
    elapsed = time.monotonic() - started
    sending.cancel()
    writer.close()
    assert status(answer) == 408
    assert b'"field": "body"' in answer
    assert BODY_TIMEOUT_S * 0.9 <= answered < BODY_TIMEOUT_S + 0.5
    # Then at most the linger time (0.2 s) reading what still trickles in, and closed.
    assert hung_up and elapsed < BODY_TIMEOUT_S + 0.2 + 1.0


async def test_grpc_metadata_over_the_limit_fails_the_call(mesh: Mesh) -> None:
    async with open_channel(mesh.addr("gateway")) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        request = gateway_pb2.RecommendRequest(user_id="u1", num_items=3)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Recommend(
                request, metadata=(("x-api-key", "demo-key"), ("x-big", "a" * 4096)), timeout=5
            )
        assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        reply = await stub.Recommend(request, metadata=(("x-api-key", "demo-key"),), timeout=5)
        assert len(reply.items) == 3
